"""Training curves of the project's trainers as one PNG: rewards, losses, KL and the rest against step.

Reads what the trainers write in their output_dir: `metrics.jsonl` (Flow-GRPO, Diffusion-DPO),
`log.jsonl` (the evaluator's GRPO) or HF Trainer's `trainer_state.json` (SFT; also found in the
newest checkpoint-N). `finger-reward plot-training RUN_DIR --out curves.png`.

Held-out metrics (Flow-GRPO's `eval/...`: fixed prompts, fixed seeds, deterministic samples) are
drawn in the panel of the training metric they measure, beside it: `eval/reward_mean` with
`reward_mean`, `eval/<dimension>` with `reward/<dimension>`.
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
HELD_OUT = "eval/"
_TRAIN_COLOR, _HELD_OUT_COLOR = "#3b7dd8", "#e07b39"


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
    found = [key for key in found if training_partner(key, found) is None]  # drawn in its partner's panel
    rest = sorted(set(found) - set(_FIRST), key=lambda key: (not key.startswith("reward"), key))  # per-dimension rewards next
    return [key for key in _FIRST if key in found] + rest


def training_partner(key: str, logged) -> str | None:
    """The training metric a held-out metric is drawn beside: eval/X -> X if logged, else reward/X if logged
    (eval/reward_mean -> reward_mean, eval/text_alignment -> reward/text_alignment); None for any other key."""
    if not key.startswith(HELD_OUT):
        return None
    name = key[len(HELD_OUT):]
    return next((partner for partner in (name, f"reward/{name}") if partner in logged), None)


def panel_lines(rows: list[dict], names: list[str]) -> list[list[tuple[str, list, list]]]:
    """Per panel, its lines as (label, steps, values): the metric itself, then its held-out partner where logged."""
    logged = {key for row in rows for key in row}
    held_out = {training_partner(key, logged): key for key in logged if training_partner(key, logged)}
    panels = []
    for name in names:
        keys = [("training", name), ("held-out", held_out[name])] if name in held_out else [(name, name)]
        lines = []
        for label, key in keys:
            points = [(row["step"], row[key]) for row in rows if _number(row.get(key))]
            if points:
                lines.append((label, [step for step, _ in points], [value for _, value in points]))
        panels.append(lines)
    return panels


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def plot_training(path: str | Path, out: str | Path, *, keys: list[str] | None = None,
                  title: str | None = None) -> list[str]:
    """Write a PNG with one panel per metric against step; returns the metrics plotted."""
    fig, names = training_figure(path, keys=keys, title=title)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(png(fig))
    return names


def training_figure(path: str | Path, *, keys: list[str] | None = None, title: str | None = None):
    """The figure `plot_training` saves and the metrics on it: one panel per metric, whole steps on the x axis
    (a run of three steps has no tick at step 1.5)."""
    from matplotlib.ticker import MaxNLocator

    rows = read_training_log(path)
    names = curve_keys(rows, keys)
    if not names:
        raise FingerError(f"{find_log(path)}: no metric is logged at two or more steps yet")
    fig, axes = figure(len(names), columns=4, size=(3.6, 2.6))
    for ax, name, lines in zip(axes, names, panel_lines(rows, names)):
        for label, steps, values in lines:
            held_out = label == "held-out"
            ax.plot(steps, values, color=_HELD_OUT_COLOR if held_out else _TRAIN_COLOR, label=label, linewidth=1.2,
                    marker="o" if held_out else "." if len(steps) < 50 else None, markersize=3 if held_out else None)
        if len(lines) > 1:
            ax.legend(fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(title or str(find_log(path)), fontsize=10)
    return fig, names
