"""The generator loops with two processes (torchrun, gloo on CPU, loopback rendezvous), as `accelerate launch
--num_processes N` runs them on N GPUs: gradients are averaged, so every process ends with the same LoRA."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from finger_reward.synthetic import write_video

HARNESS = Path(__file__).with_name("distributed_run.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(loop: str, work: Path, extra: str, result: str = "rank{}.pt") -> list[dict]:
    """Two processes of tests/distributed_run.py; returns what each rank saved (`result` names its file)."""
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(HARNESS), loop, str(work), extra]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-4000:]
    return [torch.load(work / result.format(rank), weights_only=False) for rank in (0, 1)]


def assert_same_lora(ranks: list[dict]) -> None:
    first, second = ranks[0]["lora"], ranks[1]["lora"]
    assert first.keys() == second.keys() and first
    for name in first:
        torch.testing.assert_close(first[name], second[name], atol=0, rtol=0, msg=f"{name} differs between processes")
    assert any("lora_B" in name and first[name].abs().max() > 0 for name in first)  # it trained (B starts at 0)


@pytest.mark.slow
def test_diffusion_dpo_on_two_processes_keeps_one_lora(tmp_path):
    rng = np.random.default_rng(0)
    lines = []
    for i in range(4):  # each process caches and trains on its two pairs
        frames = np.zeros((5, 32, 32, 3), np.uint8)
        for t in range(5):
            frames[t, 8:20, 4 + 4 * t:16 + 4 * t] = (220, 30, 30)
        write_video(frames, tmp_path / f"w{i}.mp4")
        write_video(rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8), tmp_path / f"l{i}.mp4")
        lines.append(json.dumps({"prompt": "a red square moves", "chosen": f"w{i}.mp4", "rejected": f"l{i}.mp4"}))
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    ranks = launch("dpo", tmp_path, str(tmp_path / "pairs.jsonl"))
    assert_same_lora(ranks)
    for rank in ranks:  # the logged loss is averaged over processes: every process logs the same
        assert rank["history"][0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
        assert [h["loss"] for h in rank["history"]] == [h["loss"] for h in ranks[0]["history"]]
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.slow
def test_flow_grpo_on_two_processes_samples_apart_and_keeps_one_lora(tmp_path, tiny_model_dir):
    (tmp_path / "prompts.txt").write_text("a red circle moves left\na dog runs across the road\n", encoding="utf-8")
    ranks = launch("grpo", tmp_path, str(tiny_model_dir))
    assert_same_lora(ranks)
    first, second = ([h["reward_mean"] for h in rank["history"]] for rank in ranks)
    assert all(math.isfinite(r) for r in first + second)
    assert first != second  # each process samples its own groups (seed + rank)
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.slow
def test_evaluator_grpo_on_two_processes_splits_questions_and_resumes_exactly(tmp_path, tiny_model_dir):
    from finger_reward.synthetic import make_world

    world = make_world(tmp_path / "world", num_scenes=1)
    options = dict(model=str(tiny_model_dir), data=str(world.instruct_path), num_generations=2, max_completion_length=8,
                   max_steps=3, learning_rate=1e-3, logging_steps=1, save_steps=2, max_frames=4, seed=0)
    straight = launch("grpo-evaluator", tmp_path, json.dumps({**options, "output_dir": str(tmp_path / "a")}),
                      "grpo-rank{}.pt")
    for name in straight[0]["weights"]:
        torch.testing.assert_close(straight[0]["weights"][name], straight[1]["weights"][name], atol=0, rtol=0)
    assert any(not torch.equal(straight[0]["weights"][n], straight[0]["start"][n]) for n in straight[0]["weights"])
    out = tmp_path / "a"
    rows = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 2 * 2  # steps x processes x G
    for step in range(3):  # the two processes answered different questions at every step
        asked = {(row["video"], row["question"]) for row in rows if row["step"] == step}
        assert len(asked) == 2
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2, 3] and straight[0]["log"] == straight[1]["log"]
    assert sorted(p.name for p in (out / "checkpoint-2").glob("rng_state*")) == ["rng_state_0.pth", "rng_state_1.pth"]

    # Kill-free resume: a second run of 2 processes from checkpoint-2 ends where the straight run ended.
    (tmp_path / "a" / "checkpoint-2").rename(tmp_path / "checkpoint-2")
    resumed = launch("grpo-evaluator", tmp_path, json.dumps({**options, "output_dir": str(tmp_path / "b"),
                                                             "resume_from_checkpoint": str(tmp_path / "checkpoint-2")}),
                     "grpo-rank{}.pt")
    for name, want in straight[0]["weights"].items():
        torch.testing.assert_close(resumed[0]["weights"][name], want, atol=1e-6, rtol=0)
    assert [row["step"] for row in resumed[0]["log"]] == [1, 2, 3]
