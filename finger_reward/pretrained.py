"""Named checkpoints and the scoring settings a checkpoint carries.

A trained evaluator is only right when it is asked the way it was trained (answer or reason mode,
the same frame rate and pixel budget, SlowFast frames or plain ones), so the trainers write those
settings next to the weights (`finger_reward.json`) and `FingerReward.from_pretrained` uses them
unless told otherwise. `slowfast` is Q-Save's SlowFast threshold, or null for plain sampling.
`"tiny"` names the tiny evaluator shipped with the package (see its model card, README.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finger_reward.errors import FingerError

if TYPE_CHECKING:
    from finger_reward.video import SlowFast

TINY_EVALUATOR = Path(__file__).parent / "models" / "tiny-evaluator"
SCORING_FILE = "finger_reward.json"
SCORING_KEYS = ("mode", "fps", "max_frames", "max_pixels", "slowfast")
SLOWFAST_THRESHOLD = 0.9  # Q-Save Sec. 4.2.1: the threshold a bare `--slowfast` or `slowfast: true` means


def resolve(model: Any) -> Any:
    """`"tiny"` -> the shipped tiny evaluator's directory, always; anything else unchanged.

    A local folder named tiny is reached as "./tiny", so a stray folder never shadows the shipped model.
    """
    if isinstance(model, str) and model == "tiny":
        if not (TINY_EVALUATOR / "config.json").is_file():
            raise FingerError(f"the tiny evaluator is missing from {TINY_EVALUATOR}; "
                              "rebuild it with: python -m finger_reward.trainers.tiny_evaluator --install")
        return str(TINY_EVALUATOR)
    return model


def scoring_defaults(model: Any) -> dict:
    """The settings in `<checkpoint>/finger_reward.json` (empty for a hub id or a loaded model)."""
    path = Path(model) / SCORING_FILE if isinstance(model, (str, Path)) else None
    if path is None or not path.is_file():
        return {}
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise FingerError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(values, dict):
        raise FingerError(f"{path}: expected an object with keys among {SCORING_KEYS}, got {type(values).__name__}")
    unknown = set(values) - set(SCORING_KEYS)
    if unknown:
        raise FingerError(f"{path}: expected an object with keys among {SCORING_KEYS}, got {sorted(unknown)}")
    if "slowfast" in values:
        try:
            slowfast_threshold(values["slowfast"])
        except ValueError as err:
            raise FingerError(f"{path}: {err}") from None
    return values


def write_scoring_defaults(out_dir: str | Path, **values) -> Path:
    """Record how the checkpoint in `out_dir` was trained to be asked (mode, fps, max_frames, max_pixels, slowfast)."""
    unknown = set(values) - set(SCORING_KEYS)
    if unknown:
        raise ValueError(f"unknown scoring settings {sorted(unknown)}; expected among {SCORING_KEYS}")
    if "slowfast" in values:
        slowfast_threshold(values["slowfast"])
    path = Path(out_dir) / SCORING_FILE
    path.write_text(json.dumps(values, indent=2) + "\n", encoding="utf-8")
    return path


def slowfast_threshold(value: Any) -> float | None:
    """A SlowFast setting as configs and finger_reward.json carry it: a threshold in (0, 1], or None (plain frames).

    0 is refused rather than read as "off": it would make nearly every frame fast.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"slowfast={value!r} must be a SlowFast patch similarity threshold in (0, 1] "
                         "(Q-Save: 0.9), or null for plain frame sampling")
    return float(value)


def as_slowfast(threshold: float | None) -> "SlowFast | None":
    """`FingerReward`'s `slowfast` option for a threshold (None stays None: plain sampling)."""
    from finger_reward.video import SlowFast

    return None if threshold is None else SlowFast(threshold=slowfast_threshold(threshold))
