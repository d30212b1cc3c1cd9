"""Sharded full fine-tuning (FSDP2) on two CPU processes (gloo): the evaluator's GRPO loop takes the same
steps as one process, its sharded checkpoints resume exactly, and its final model loads anywhere; SFT under
configs/accelerate_fsdp.yaml trains as plain data parallelism does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_distributed import HARNESS, free_port, launch

pytestmark = pytest.mark.slow


def one_process(options: dict, output_dir):
    """The 2-process run's steps in one process: both questions of each step, the length reward of
    tests/distributed_run.py."""
    from finger_reward.trainers.grpo import GRPORecipe, build_trainer

    def length_reward(completions, **kwargs):
        return [len(c) / 10 for c in completions]

    recipe = GRPORecipe(**options, output_dir=str(output_dir), per_device_train_batch_size=2)
    return build_trainer(recipe, reward_funcs=[length_reward]).train()


def test_sharded_run_equals_one_process_and_resumes_exactly(tmp_path, tiny_model_dir):
    from transformers import AutoModelForImageTextToText

    from finger_reward.synthetic import make_world

    world = make_world(tmp_path / "world", num_scenes=1)
    options = dict(model=str(tiny_model_dir), data=str(world.instruct_path), num_generations=4, max_completion_length=8,
                   max_steps=3, learning_rate=1e-3, logging_steps=1, save_steps=2, max_frames=4, seed=0)

    # Two processes, one question each per step, every layer sharded, activations recomputed.
    sharded = launch("grpo-evaluator", tmp_path, json.dumps({**options, "output_dir": str(tmp_path / "sharded"),
                                                             "fsdp": True, "gradient_checkpointing": True}),
                     "grpo-rank{}.pt")
    # One process taking both questions of each step: the same questions, the same samples (each question's
    # completions have a seed of their own), so the same losses and weights up to float rounding.
    alone = one_process(options, tmp_path / "alone")

    assert [row["completion"] for row in sharded[0]["completions"]] == [row["completion"] for row in alone.completions]
    for ours, theirs in zip(sharded[0]["log"], alone.log_history, strict=True):
        assert ours.keys() == theirs.keys()
        for key in ("loss", "reward", "kl", "grad_norm"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), key
    weights = dict(alone.model.named_parameters())
    moved = 0
    for name, value in sharded[0]["weights"].items():
        assert_close_but_key_biases(name, value, weights[name].detach())
        torch.testing.assert_close(value, sharded[1]["weights"][name], atol=0, rtol=0)
        moved += not torch.equal(value, sharded[0]["start"][name])
    assert moved > len(weights) // 2

    # The final model is an ordinary checkpoint, whole, loadable without torchrun.
    final = AutoModelForImageTextToText.from_pretrained(tmp_path / "sharded")
    for name, value in final.state_dict().items():
        if name in sharded[0]["weights"]:
            torch.testing.assert_close(value, sharded[0]["weights"][name], atol=0, rtol=0)
    # Checkpoints hold each process's shards (DCP), not a gathered copy or optimizer.pt.
    checkpoint = tmp_path / "sharded" / "checkpoint-2"
    assert len(list((checkpoint / "sharded").glob("*.distcp"))) == 2
    assert not (checkpoint / "optimizer.pt").exists() and not (checkpoint / "model.safetensors").exists()

    # A sharded run resumed from checkpoint-2 ends where the straight sharded run ended.
    checkpoint.rename(tmp_path / "checkpoint-2")
    resumed = launch("grpo-evaluator", tmp_path, json.dumps({**options, "output_dir": str(tmp_path / "resumed"),
                                                             "fsdp": True, "gradient_checkpointing": True,
                                                             "resume_from_checkpoint": str(tmp_path / "checkpoint-2")}),
                     "grpo-rank{}.pt")
    for name, want in sharded[0]["weights"].items():
        torch.testing.assert_close(resumed[0]["weights"][name], want, atol=1e-6, rtol=0, msg=name)
    assert [row["step"] for row in resumed[0]["log"]] == [1, 2, 3]


def test_fsdp_recipe_errors_name_the_fix(tiny_model_dir, monkeypatch):
    from finger_reward.trainers.grpo import GRPORecipe

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="torchrun --nproc_per_node N"):
        GRPORecipe(model=str(tiny_model_dir), data="x.jsonl", fsdp=True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert GRPORecipe(model=str(tiny_model_dir), data="x.jsonl", fsdp=True).fsdp


def test_sharded_lora_run_equals_one_process(tmp_path, tiny_model_dir):
    """LoRA over a sharded base (the reference: adapters off), against one process taking both questions."""
    from safetensors.torch import load_file

    from finger_reward.synthetic import make_world

    world = make_world(tmp_path / "world", num_scenes=1)
    held_out = tmp_path / "world" / "held_out.jsonl"  # evaluated on process 0 with the shards gathered
    held_out.write_text("".join(world.instruct_path.read_text().splitlines(keepends=True)[:6]))
    options = dict(model=str(tiny_model_dir), data=str(world.instruct_path), num_generations=4, max_completion_length=8,
                   max_steps=2, learning_rate=1e-2, logging_steps=1, save_steps=0, max_frames=4, seed=1, lora=True,
                   lora_r=4, lora_alpha=8, lora_target_modules="all-linear", eval_data=str(held_out))
    sharded = launch("grpo-evaluator", tmp_path, json.dumps({**options, "output_dir": str(tmp_path / "sharded"), "fsdp": True}),
                     "grpo-rank{}.pt")
    alone = one_process(options, tmp_path / "alone")
    assert [row["completion"] for row in sharded[0]["completions"]] == [row["completion"] for row in alone.completions]
    for ours, theirs in zip(sharded[0]["log"][:2], alone.log_history[:2], strict=True):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-4, abs=1e-6)
        assert ours["kl"] == pytest.approx(theirs["kl"], rel=1e-4, abs=1e-7)
    sharded_eval, alone_eval = (numbers(json.loads((tmp_path / run / "eval.json").read_text())) for run in ("sharded", "alone"))
    assert sharded_eval.keys() == alone_eval.keys() and sharded_eval
    for key, value in alone_eval.items():
        assert sharded_eval[key] == pytest.approx(value, abs=1e-5), key
    weights = dict(alone.model.named_parameters())
    assert sharded[0]["weights"].keys() == {n for n, p in weights.items() if p.requires_grad}
    for name, value in sharded[0]["weights"].items():
        torch.testing.assert_close(value, weights[name].detach(), atol=1e-6, rtol=0, msg=name)
    assert any(n.endswith("lora_B.default.weight") and v.abs().max() > 0 for n, v in sharded[0]["weights"].items())
    adapter = load_file(tmp_path / "sharded" / "adapter_model.safetensors")  # written whole, as peft reads it
    assert adapter and all("lora_" in name for name in adapter)


def accelerate_launch(loop: str, work, flags: list[str]) -> None:
    """trainers/sft.py on two CPU processes under `accelerate launch --config_file configs/accelerate_fsdp.yaml`."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(root / "configs" / "accelerate_fsdp.yaml"),
           "--num_processes", "2", "--mixed_precision", "no", "--main_process_ip", "127.0.0.1",
           "--main_process_port", str(free_port()), str(HARNESS), loop, str(work), json.dumps(flags)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=root)
    assert done.returncode == 0, done.stderr[-4000:]


def test_sft_with_the_accelerate_fsdp_config_equals_data_parallel(tmp_path, tiny_model_dir):
    """The shipped accelerate config shards SFT (sharded checkpoints) and trains exactly as plain data
    parallelism on the same two processes: same losses, same final weights (lm_head included)."""
    from safetensors.torch import load_file

    from finger_reward.synthetic import make_world

    world = make_world(tmp_path / "world", num_scenes=1)
    flags = ["--model", str(tiny_model_dir), "--data", str(world.instruct_path), "--max_steps", "2", "--save_steps", "1",
             "--max_frames", "4", "--logging_steps", "1", "--per_device_train_batch_size", "1", "--learning_rate", "1e-3"]
    accelerate_launch("sft-fsdp", tmp_path, flags + ["--output_dir", str(tmp_path / "sharded")])
    accelerate_launch("sft", tmp_path, flags + ["--output_dir", str(tmp_path / "plain")])

    assert (tmp_path / "sharded" / "checkpoint-1" / "pytorch_model_fsdp_0").is_dir()
    assert (tmp_path / "plain" / "checkpoint-1" / "model.safetensors").is_file()
    logs = [json.loads((tmp_path / run / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
            for run in ("sharded", "plain")]
    for ours, theirs in zip(*logs, strict=True):
        for key in ("loss", "grad_norm"):
            if key in theirs:
                assert ours[key] == pytest.approx(theirs[key], rel=1e-4), key
    sharded, plain = (load_file(tmp_path / run / "model.safetensors") for run in ("sharded", "plain"))
    start = load_file(Path(tiny_model_dir) / "model.safetensors")
    assert sharded.keys() == plain.keys()
    for name in plain:
        assert_close_but_key_biases(name, sharded[name], plain[name])
    assert not torch.equal(sharded["lm_head.weight"], start["lm_head.weight"])
    assert (tmp_path / "sharded" / "processor_config.json").is_file()


def numbers(tree, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a JSON tree, by path."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in numbers(sub, f"{prefix}/{key}").items()}
    if isinstance(tree, list):
        return {k: v for i, sub in enumerate(tree) for k, v in numbers(sub, f"{prefix}/{i}").items()}
    return {prefix: float(tree)} if isinstance(tree, (int, float)) and not isinstance(tree, bool) else {}


def assert_close_but_key_biases(name: str, ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Two runs of the same steps agree to 1e-6 (a step moves a weight by about the learning rate, 1e-3), except
    the key biases, to 1e-4: softmax ignores a shift of all of a query's scores, so their gradient is rounding
    noise, which AdamW's normalisation blows up to a step of its own. The vision tower's fused qkv bias holds
    its key bias as the middle third."""
    if name.endswith("k_proj.bias"):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0, msg=name)
    elif name.endswith("qkv.bias"):
        for part, (a, b) in enumerate(zip(ours.chunk(3), theirs.chunk(3))):
            torch.testing.assert_close(a, b, atol=1e-4 if part == 1 else 1e-6, rtol=0, msg=f"{name} [{'qkv'[part]}]")
    else:
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0, msg=name)
