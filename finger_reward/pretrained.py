"""Named checkpoints and the scoring settings a checkpoint carries.

A trained evaluator is only right when it is asked the way it was trained (answer or reason mode,
the same frame rate and pixel budget), so the trainers write those settings next to the weights
(`finger_reward.json`) and `FingerReward.from_pretrained` uses them unless told otherwise.
`"tiny"` names the tiny evaluator shipped with the package (see its model card, README.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finger_reward.errors import FingerError

TINY_EVALUATOR = Path(__file__).parent / "models" / "tiny-evaluator"
SCORING_FILE = "finger_reward.json"
SCORING_KEYS = ("mode", "fps", "max_frames", "max_pixels")


def resolve(model: Any) -> Any:
    """`"tiny"` -> the shipped tiny evaluator's directory (unless a local "tiny" path exists); else unchanged."""
    if isinstance(model, str) and model == "tiny" and not Path(model).exists():
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
    return values


def write_scoring_defaults(out_dir: str | Path, **values) -> Path:
    """Record how the checkpoint in `out_dir` was trained to be asked (mode, fps, max_frames, max_pixels)."""
    unknown = set(values) - set(SCORING_KEYS)
    if unknown:
        raise ValueError(f"unknown scoring settings {sorted(unknown)}; expected among {SCORING_KEYS}")
    path = Path(out_dir) / SCORING_FILE
    path.write_text(json.dumps(values, indent=2) + "\n", encoding="utf-8")
    return path
