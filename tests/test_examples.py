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
