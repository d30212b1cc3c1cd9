"""Exact resumption for the trainers' own loops: where checkpoints are, the random generators, the logs.

A run killed after checkpoint-N and resumed from it ends as a run that never stopped: weights,
optimizer, learning-rate schedule, data position and every random generator come back, and the
metrics written after step N are dropped from the log before the resumed run appends its own.
"""

from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

LATEST = ("last", "latest", "true")
CHECKPOINT_PREFIX = "checkpoint"


def resolve_checkpoint(checkpoint: str | Path | bool, output_dir: str | Path) -> Path:
    """A checkpoint directory: the newest checkpoint-N in `output_dir` for True / "last", else `checkpoint` itself."""
    if checkpoint is True or str(checkpoint).lower() in LATEST:
        found = sorted((p for p in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}-*") if p.is_dir()
                        and p.name.rsplit("-", 1)[-1].isdigit()), key=lambda p: int(p.name.rsplit("-", 1)[-1]))
        if not found:
            raise ValueError(f"resume_from_checkpoint={checkpoint!r} but {output_dir} holds no {CHECKPOINT_PREFIX}-N folder")
        return found[-1]
    path = Path(checkpoint)
    if not path.is_dir():
        raise ValueError(f"resume_from_checkpoint: {path} is not a directory; pass a {CHECKPOINT_PREFIX}-N folder or 'last'")
    return path


def rng_state() -> dict:
    """Every global random generator (HF Trainer's rng_state.pth keys)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.random.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.random.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.random.set_rng_state_all(state["cuda"])


def loop_state_file(checkpoint: Path, rank: int) -> Path:
    """Where process `rank` keeps its own loop state (optimizer, generators, data position) in a checkpoint."""
    return checkpoint / "loop_state" / f"rank{rank}.pt"


def save_loop_state(checkpoint: Path, rank: int, state: dict) -> None:
    path = loop_state_file(checkpoint, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


def load_loop_state(checkpoint: Path, rank: int) -> dict:
    path = loop_state_file(checkpoint, rank)
    if not path.is_file():
        saved = sorted(p.name for p in (checkpoint / "loop_state").glob("rank*.pt"))
        raise ValueError(f"{checkpoint} has no loop state for process {rank} (it holds {saved or 'none'}): resume "
                         "from a checkpoint of this trainer, with as many processes as the run that saved it")
    return torch.load(path, weights_only=False)


def save_training(checkpoint: Path, rank: int, model, history: list[dict], parts: dict) -> None:
    """This process's part of a checkpoint: its LoRA (peft), the history so far, every global generator, and the
    state of each of `parts` (optimizer, scheduler, data order: anything with state_dict; torch or Python
    random generators)."""
    from peft.utils import get_peft_model_state_dict

    save_loop_state(checkpoint, rank, {"lora": get_peft_model_state_dict(model), "history": history, "rng": rng_state(),
                                       **{name: _state_of(part) for name, part in parts.items()}})


def resume_training(checkpoint: str | Path | bool, output_dir: str | Path, rank: int, model, parts: dict) -> list[dict]:
    """Restore what `save_training` wrote (the LoRA into `model`, each part in place); returns the history."""
    from peft import set_peft_model_state_dict

    path = resolve_checkpoint(checkpoint, output_dir)
    state = load_loop_state(path, rank)
    set_peft_model_state_dict(model, state["lora"])
    for name, part in parts.items():
        _restore(part, state[name])
    set_rng_state(state["rng"])
    logger.info("resumed from %s at step %d", path, state["history"][-1]["step"] if state["history"] else 0)
    return list(state["history"])


def start_log(path: Path, history: list[dict]) -> None:
    """A JSONL log holding exactly `history`: a fresh run empties it, a resumed one drops lines written later
    (by step number: a history may start at step 0, Flow-GRPO's held-out evaluation of the base model)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if history and path.is_file():
        rewind_log(path, history[-1]["step"])
    else:
        path.write_text("".join(json.dumps(record) + "\n" for record in history), encoding="utf-8")


def _state_of(part):
    if isinstance(part, torch.Generator):
        return part.get_state()
    if isinstance(part, random.Random):
        return part.getstate()
    return part.state_dict()


def _restore(part, state) -> None:
    if isinstance(part, torch.Generator):
        part.set_state(state)
    elif isinstance(part, random.Random):
        part.setstate(state)
    else:
        part.load_state_dict(state)


def rewind_log(path: Path, step: int) -> None:
    """Keep the lines of a JSONL log whose "step" is at most `step` (a torn last line goes too)."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if line_step(line) <= step]
    if len(kept) < len(lines):
        logger.info("%s: dropped %d line(s) written after step %d", path, len(lines) - len(kept), step)
        path.write_text("".join(kept), encoding="utf-8")


def line_step(line: str) -> float:
    """The "step" of a log line; infinity for a line cut short by a kill."""
    try:
        return json.loads(line)["step"] if line.endswith("\n") else math.inf
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf
