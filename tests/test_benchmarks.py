"""The benchmark scripts run end to end on their tiny configurations (the GPU figures come from the same code)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run_script(name: str, *args: str) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(BENCHMARKS / name), *args], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_engine_benchmark_matches_the_plain_loop_and_reports_a_ratio():
    out = run_script("engine.py", "--config", "tiny", "--videos", "2", "--size", "64", "--seconds", "2")
    gaps = [float(g) for g in re.findall(r"max \|dP\(Yes\)\| engine vs plain = ([0-9.e+-]+)", out)]
    ratios = [float(r) for r in re.findall(r"engine / plain: ([0-9.]+)x", out)]
    assert len(gaps) == 2 and max(gaps) < 1e-4, out
    assert len(ratios) == 2 and min(ratios) > 1, out  # packed questions beat one forward per question even here


@pytest.mark.slow
def test_diffusers_loops_benchmark_reports_step_time_and_memory():
    out = run_script("diffusers_loops.py", "--config", "tiny", "--steps", "2")
    for loop in ("diffusion-dpo", "flow-grpo"):
        line = next((line for line in out.splitlines() if line.startswith(f"{loop}:")), None)
        assert line is not None, out
        first, steady = re.search(r"first step ([0-9.]+) s, then ([0-9.]+) s/step", line).groups()
        peak = float(re.search(r"peak memory ([0-9.]+) GiB", line).group(1))
        assert float(first) > 0 and float(steady) > 0 and peak > 0, line
    assert "sampling+scoring" in out and "8 pair(s)/step" in out


@pytest.mark.parametrize("config", ["wan1.3b", "ltx"])
def test_the_large_configs_refuse_to_run_without_a_gpu(config):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    done = subprocess.run([sys.executable, str(BENCHMARKS / "diffusers_loops.py"), "--config", config],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "needs a CUDA GPU" in done.stderr


@pytest.mark.slow
def test_vllm_parity_benchmark_agrees_with_the_stand_in_server():
    """The tiny evaluator served by tests/logprob_server.py under the documented flags scores as local scoring does."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from finger_reward.engine.server_inputs import vllm_flags
    from finger_reward.pretrained import TINY_EVALUATOR
    from tests.logprob_server import LogprobServer, server_options

    model = AutoModelForImageTextToText.from_pretrained(TINY_EVALUATOR).eval()
    processor = AutoProcessor.from_pretrained(TINY_EVALUATOR)
    vocab = len(processor.tokenizer)  # every Yes/No spelling in the top K: Eq. 1 exactly
    settings = server_options(vllm_flags(fps=2.0, max_pixels=200704, top_logprobs=vocab))
    with LogprobServer(model, processor, **settings) as server:
        out = run_script("vllm_parity.py", "--base-url", server.url, "--model-dir", "tiny", "--served-model", "tiny",
                         "--scenes", "1", "--top-logprobs", str(vocab))
    gaps = dict(re.findall(r"(answer|reason): max \|P\(Yes\)\| local vs server = ([0-9.e+-]+)", out))
    assert set(gaps) == {"answer", "reason"}, out
    assert float(gaps["answer"]) <= 1e-4 and float(gaps["reason"]) <= 1e-4, out
    assert "reasons that differ: 0" in out, out
    reread = int(re.search(r"answers read after re-sent text \(left out above\): (\d+)", out).group(1))
    compared = int(re.search(r"reason: .* over (\d+) of 60 questions", out).group(1))
    assert compared + reread == 60 and compared >= 40, out  # most answers come from the reason's own generation
    if reread:  # closed as the server closes them: the same text, tokenized as one
        assert float(re.search(r"max \|P\(Yes\)\| among them ([0-9.e+-]+)", out).group(1)) <= 1e-4, out


def test_service_soak_runs_a_real_server_under_mixed_load():
    """A few seconds of `--soak`: a real `finger-reward serve` process, good, corrupt and malformed requests."""
    out = run_script("service.py", "--soak", "3", "--soak-clients", "4")
    assert "good: scored" in out and "corrupt: bad video failed alone" in out and "malformed: HTTP 400" in out, out
    assert "unexpected" not in out and "Error" not in out, out  # every request ended as its kind should
    assert re.search(r"server memory after warm-up: RSS \d+ MB .* at the end: RSS \d+ MB", out), out


@pytest.mark.slow
def test_grpo_rollout_benchmark_reports_both_paths_and_a_ratio():
    """Shared-prefill GRPO sampling against generate on G repeated prompts, tiny model, a few tokens."""
    out = run_script("grpo_rollout.py", "--config", "tiny", "--size", "56", "--seconds", "2", "--max-new-tokens", "4",
                     "--generations", "4", "--repeats", "1")
    rows = dict(re.findall(r"(generate x G|shared prefill): ([0-9.]+) s/group, (?:\d+) tokens written", out))
    assert set(rows) == {"generate x G", "shared prefill"} and all(float(v) > 0 for v in rows.values()), out
    written = [int(n) for n in re.findall(r"(\d+) tokens written", out)]
    assert len(written) == 2 and all(0 < n <= 4 * 4 for n in written), out  # G rows x at most 4 tokens
    ratio = float(re.search(r"shared prefill / generate x G: ([0-9.]+)x", out).group(1))
    assert ratio > 0, out


@pytest.mark.slow
def test_grpo_step_benchmark_shares_the_clip_without_changing_log_probabilities():
    out = run_script("grpo_step.py", "--config", "tiny", "--size", "56", "--seconds", "2", "--completion", "4",
                     "--generations", "4", "--forward-batch-size", "2", "--repeats", "1")
    rows = dict(re.findall(r"(clip per row|clip per forward): ([0-9.]+) s/group", out))
    assert set(rows) == {"clip per row", "clip per forward"} and all(float(v) > 0 for v in rows.values()), out
    assert float(re.search(r"max \|d log p\| clip per forward vs per row = ([0-9.e+-]+)", out).group(1)) < 1e-5, out
    assert float(re.search(r"clip per forward / clip per row: ([0-9.]+)x", out).group(1)) > 0, out


def test_grpo_memory_counts_the_7b_on_the_meta_device():
    """7B counted without weights: sharding divides every per-parameter state by the GPU count, and the
    activation count changes with the completions per forward (it is counted, not a constant)."""
    def table(*args):
        out = run_script("grpo_memory.py", *args)
        return {m.group(1).strip(): (float(m.group(2)), float(m.group(3)))
                for m in re.finditer(r"^(.{48}) +([0-9.]+) +([0-9.]+)", out, re.M)}

    eight, one_row = table("--gpus", "8"), table("--gpus", "4", "--forward-batch-size", "1")
    per_row = table("--gpus", "8", "--no-share-video")
    assert 8.2 < eight["parameters (billions)"][0] < 8.4  # Qwen2.5-VL-7B: 8.29B with its vision tower
    for name in ("weights, fp32", "gradients, fp32", "AdamW states, fp32"):
        plain, sharded = eight[name]
        assert sharded == pytest.approx(plain / 8, abs=0.1) and one_row[name][1] == pytest.approx(plain / 4, abs=0.1)
    assert per_row["activations, 4 completion(s) per forward"][0] == pytest.approx(
        4 * one_row["activations, 1 completion(s) per forward"][0], rel=0.02)
    # Sharing the clip over a forward's rows: the vision tower's activations are one row's, the decoder's four.
    assert eight["of which vision tower"] == one_row["of which vision tower"]
    assert eight["of which decoder"][0] == pytest.approx(4 * one_row["of which decoder"][0], rel=0.02)
    assert eight["PEAK PER GPU"][1] < 80 < eight["PEAK PER GPU"][0]  # fits an 80 GB GPU only when sharded
