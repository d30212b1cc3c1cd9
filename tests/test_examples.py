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
