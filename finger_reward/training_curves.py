"""Training curves of the project's trainers as one PNG: rewards, losses, KL and the rest against step.

Reads what the trainers write in their output_dir: `metrics.jsonl` (Flow-GRPO, Diffusion-DPO),
`log.jsonl` (the evaluator's GRPO) or HF Trainer's `trainer_state.json` (SFT; also found in the
newest checkpoint-N). `finger-reward plot-training RUN_DIR --out curves.png`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from finger_reward.errors import FingerError
from finger_reward.figures import figure, png
from finger_reward.jsonl import read_jsonl

LOG_FILES = ("metrics.jsonl", "log.jsonl", "trainer_state.json")
# Bookkeeping, not curves.
_SKIPPED = {"step", "epoch", "lr", "learning_rate", "total_flos", "train_runtime", "train_samples_per_second",
            "train_steps_per_second", "train_loss"}
# Default order: what tells whether training works first.
_FIRST = ("reward", "reward_mean", "loss", "policy_loss", "kl", "implicit_accuracy", "rewards/margin")


def find_log(path: str | Path) -> Path:
    """The training log in a run directory (or `path` itself when it is a file)."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is neither a training log nor a run directory")
    for name in LOG_FILES:
        if (path / name).is_file():
            return path / name
    checkpoints = sorted(path.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[-1]))
    if checkpoints:
        return checkpoints[-1]
    raise FileNotFoundError(f"{path} holds none of {', '.join(LOG_FILES)} (nor a checkpoint-N/trainer_state.json)")


def read_training_log(path: str | Path) -> list[dict]:
    """One dict per logged step, each with its "step"; a torn last line of a running job is skipped."""
    log = find_log(path)
    if log.suffix == ".json":
        rows = json.loads(log.read_text(encoding="utf-8")).get("log_history", [])
    else:
        rows = [row for _, row in read_jsonl(log, torn_tail="skip", objects=True)]
    rows = [row for row in rows if isinstance(row.get("step"), (int, float))]
    if not rows:
        raise FingerError(f"{log} has no logged steps yet")
    return rows


def curve_keys(rows: list[dict], keys: list[str] | None = None) -> list[str]:
    """The metrics to plot: `keys` as given (each must be logged), else every numeric metric logged at two or
    more steps: rewards, losses and KL first, then other rewards (per dimension), then the rest alphabetically
    (timings and bookkeeping left out)."""
    counts: dict[str, int] = {}
    for row in rows:
        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                counts[key] = counts.get(key, 0) + 1
    if keys is not None:
        missing = [key for key in keys if key not in counts]
        if missing:
            raise FingerError(f"not logged: {', '.join(missing)}; logged metrics: {', '.join(sorted(counts))}")
        return list(keys)
    found = [key for key, n in counts.items() if n >= 2 and key not in _SKIPPED and not key.startswith("time/")]
    rest = sorted(set(found) - set(_FIRST), key=lambda key: (not key.startswith("reward"), key))  # per-dimension rewards next
    return [key for key in _FIRST if key in found] + rest


def plot_training(path: str | Path, out: str | Path, *, keys: list[str] | None = None,
                  title: str | None = None) -> list[str]:
    """Write a PNG with one panel per metric against step; returns the metrics plotted."""
    rows = read_training_log(path)
    names = curve_keys(rows, keys)
    if not names:
        raise FingerError(f"{find_log(path)}: no metric is logged at two or more steps yet")
    fig, axes = figure(len(names), columns=4, size=(3.6, 2.6))
    for ax, name in zip(axes, names):
        points = [(row["step"], row[name]) for row in rows if isinstance(row.get(name), (int, float))]
        ax.plot(*zip(*points), color="#3b7dd8", marker="." if len(points) < 50 else None, linewidth=1.2)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(title or str(find_log(path)), fontsize=10)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(png(fig))
    return names
