"""The runnable examples stay runnable: each is run end to end on the tiny models."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.slow
def test_trl_grpo_prompt_rewriter(tmp_path):
    done = subprocess.run([sys.executable, str(EXAMPLES / "trl_grpo_prompt_rewriter.py"), "--steps", "2", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rewards = [float(x) for x in re.findall(r"step \d+: FingER reward ([0-9.]+)", done.stdout)]
    assert len(rewards) == 2 and all(0 < r < 1 for r in rewards)


@pytest.mark.slow
def test_verl_reward_loop_example(tmp_path):
    pytest.importorskip("verl", reason="needs the verl extra: pip install 'finger-reward[verl]'")
    done = subprocess.run([sys.executable, str(EXAMPLES / "verl_reward_loop.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = re.findall(r"^\s*(\d+)\s+(\S+\.mp4)\s+([0-9.]+)((?:\s+[0-9.]+){5})\s*$", done.stdout, re.M)
    videos = sorted(p.name for p in (tmp_path / "world" / "videos").glob("*.mp4"))
    assert len(videos) == 6  # one scene: a clean clip and one per defect
    assert [int(r[0]) for r in rows] == list(range(len(videos))) and sorted(r[1] for r in rows) == videos
    assert all(0 < float(x) < 1 for r in rows for x in [r[2], *r[3].split()])
    assert re.search(rf"^FingER service requests for this step: 1 \({len(videos)} videos\)$", done.stdout, re.M)


@pytest.mark.slow
def test_diffusion_dpo_wan_example(tmp_path):
    import math

    done = subprocess.run([sys.executable, str(EXAMPLES / "diffusion_dpo_wan.py"), "--steps", "2", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    pairs = [(float(c), float(r)) for c, r in
             re.findall(r"^pair: chosen ([0-9.]+) \(seed \d+\) vs rejected ([0-9.]+) \(seed \d+\): ", done.stdout, re.M)]
    assert pairs and all(0 < r <= c < 1 for c, r in pairs)
    losses = [float(x) for x in re.findall(r"^step \d+: DPO loss ([0-9.]+)", done.stdout, re.M)]
    assert len(losses) == 2 and losses[0] == pytest.approx(math.log(2), abs=1e-3)
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "after_dpo.mp4").stat().st_size > 0


@pytest.mark.slow
def test_flow_grpo_wan_example(tmp_path):
    done = subprocess.run([sys.executable, str(EXAMPLES / "flow_grpo_wan.py"), "--steps", "2", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = re.findall(r"^step (\d+): reward mean ([0-9.]+) \| (.*) \| kl", done.stdout, re.M)
    assert [int(s[0]) for s in steps] == [1, 2]
    for _, mean, dims in steps:
        values = dict(item.split("=") for item in dims.split())
        assert 0 < float(mean) < 1 and len(values) == 5 and all(0 < float(v) < 1 for v in values.values())
    assert re.search(r"^videos scored by the service: 16$", done.stdout, re.M)  # 2 steps x 2 groups x 4 videos
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()
