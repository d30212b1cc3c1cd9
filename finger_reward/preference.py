"""VQ-Insight's preference comparison: two videos of one prompt, "which is better in DIMENSION?".

Training rows (`PreferenceRecord`, `load_preference`): FingER-Instruct lines with two video
columns, `video` (Video A) and `video_b` (Video B), and `preferred` ("A"/"B"), trained with
`rewards.preference_reward` (Eq. 7). `load_training_records` reads question lines, preference
lines or a mix of both (VQ-Insight trains on a mix), for SFT, GRPO and the cool-off alike. Scoring results (`Comparison`): P(A better) per FingER
dimension from the restricted softmax over the single-token spellings of "A" and "B" (Eq. 1 with
A/B in place of Yes/No), read at the answer position of the two-video prompt
(`prompts.build_pair_messages`).

Frame budget: each video of a pair is sampled as a video scored alone (same fps, same per-frame
pixel budget `max_pixels`, since the detail a comparison of visual quality rests on must not
shrink), but with at most `max_frames // 2` frames (`pair_max_frames`), so a pair never has more
frames than one video scored alone may. At the default 2 fps and 48 frames, clips up to 12 s keep
every sampled frame; longer ones are thinned evenly, and the model is told the lower frame rate.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from finger_reward import prompts
from finger_reward.instruct import _parse_row as parse_instruct_row
from finger_reward.instruct import InstructError, check_reason, read_records, resolve_video
from finger_reward.questions.record import DIMENSIONS
from finger_reward.scoring import overall_score

CHOICES = prompts.PAIR_LABELS  # ("A", "B")


def pair_max_frames(max_frames: int) -> int:
    """Frames per video of a pair: half the single-video cap (at least 1), so the pair stays within `max_frames`."""
    return max(1, max_frames // 2)


def pair_video_name(video, which: int, pair: int, pairs: int = 1) -> str:
    """How errors name a video of a pair: "video_a (path)", "video_b (in-memory ndarray) of pair #3"."""
    if isinstance(video, (str, os.PathLike)):
        what = str(video)
    else:
        what = f"in-memory {type(getattr(video, 'frames', video)).__name__}"
    return f"video_{'ab'[which]} ({what})" + (f" of pair #{pair}" if pairs > 1 else "")


# ---- training rows --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreferenceRecord:
    """One preference example: Video A (`video`), Video B (`video_b`), which is better in `dimension`, and why.

    `answer` is the preferred label, so a reason-mode completion reads
    `<reason>...</reason><answer>A</answer>` as for a Yes/No question.
    """

    prompt: str
    dimension: str
    video: str
    video_b: str
    preferred: str
    reason: str = ""
    source: str = field(default="", compare=False)

    def __post_init__(self):
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise InstructError(f"field 'prompt' must be a non-empty string, got {self.prompt!r}")
        if self.dimension not in DIMENSIONS:
            raise InstructError(f"field 'dimension' must be one of {', '.join(DIMENSIONS)}, got {self.dimension!r}")
        for name in ("video", "video_b"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise InstructError(f"field {name!r} must be a non-empty path, got {value!r}")
        if self.preferred not in CHOICES:
            raise InstructError(f"field 'preferred' must be 'A' (video) or 'B' (video_b), got {self.preferred!r}")
        if not isinstance(self.reason, str):
            raise InstructError(f"field 'reason' must be a string, got {type(self.reason).__name__}")

    @property
    def question(self) -> str:
        return prompts.pair_question(self.dimension, self.prompt)

    @property
    def answer(self) -> str:
        return self.preferred

    @property
    def videos(self) -> tuple[str, str]:
        return self.video, self.video_b

    @classmethod
    def from_dict(cls, row: dict, *, source: str = "") -> "PreferenceRecord":
        """Build from a JSON object; `preferred` may be "A"/"B", "Video A", "video_b" and the like (any case)."""
        if not isinstance(row, dict):
            raise InstructError(f"expected a JSON object, got {type(row).__name__}")
        missing = [key for key in ("prompt", "dimension", "video", "video_b", "preferred") if key not in row]
        if missing:
            raise InstructError(f"missing field(s) {', '.join(missing)} (a preference line holds prompt, dimension, "
                                "video, video_b and preferred)")
        reason = row.get("reason")
        return cls(prompt=row["prompt"], dimension=row["dimension"], video=row["video"], video_b=row["video_b"],
                   preferred=_choice(row["preferred"]), reason="" if reason is None else reason,
                   source=source or row.get("source", ""))

    def to_dict(self) -> dict:
        return asdict(self)


def _choice(value) -> str | object:
    """"A" or "B" for the spellings of a video label; anything else unchanged, for `__post_init__` to refuse."""
    if isinstance(value, str):
        text = value.strip().lower().replace("_", " ")
        for label, spellings in (("A", ("a", "video a", "videoa")), ("B", ("b", "video b", "videob"))):
            if text in spellings:
                return label
    return value


def load_preference(path: str | Path, *, mode: str | None = None,
                    video_root: str | Path | None = None) -> list[PreferenceRecord]:
    """Read preference JSONL; a bad line raises `InstructError` naming the file, line and field.

    Relative video paths are resolved against `video_root` (default: the JSONL's folder) and must
    exist. With `mode="reason"` every line needs a non-empty reason (reason-mode SFT learns it).
    """
    return _load(path, mode, video_root, pairs_only=True)


def is_preference_row(row) -> bool:
    """Whether a training JSONL line is a preference line: a JSON object with a `video_b` column."""
    return isinstance(row, dict) and "video_b" in row


def load_training_records(path: str | Path, *, mode: str | None = None,
                          video_root: str | Path | None = None) -> list:
    """FingER-Instruct question lines (`InstructRecord`), preference lines (with `video_b`:
    `PreferenceRecord`) or a mix of both, in file order, as VQ-Insight trains on a mix.

    Every line is checked as `instruct.load_instruct` checks a question line (errors name the file,
    line and field; videos resolved against `video_root`, default the file's folder, and must
    exist; with `mode="reason"` a non-empty reason on every line).
    """
    return _load(path, mode, video_root, pairs_only=False)


def _load(path: str | Path, mode: str | None, video_root: str | Path | None, *, pairs_only: bool) -> list:
    def parse_row(row, where: str, root: Path, mode: str | None):
        if pairs_only or is_preference_row(row):
            return _preference_row(row, where, root, mode)
        return parse_instruct_row(row, where, root, mode)

    return read_records(path, parse_row, mode=mode, video_root=video_root, what="training file")


def _preference_row(row: dict, where: str, root: Path, mode: str | None) -> PreferenceRecord:
    record = PreferenceRecord.from_dict(row, source=where)
    resolved = {name: resolve_video(getattr(record, name), root, name) for name in ("video", "video_b")}
    check_reason(record.reason, mode)
    return PreferenceRecord(**{**record.to_dict(), **resolved, "source": where})


def record_kind(record) -> str:
    """"preference" (two videos), "rating" (Q-Save five levels) or "question" (FingER Yes/No)."""
    if isinstance(record, PreferenceRecord):
        return "preference"
    return "rating" if getattr(record, "rating", None) is not None else "question"


def check_reward_kinds(reward_funcs: Sequence, records: Sequence, *, data: str | Path | None = None) -> None:
    """Refuse, before training, a reward that no record can use: `accuracy_reward` without a Yes/No
    question, `preference_reward` without a preference pair. Each returns None (not applicable) on
    the other kind's rows, so such a run would train nothing on that reward, silently. And
    `rating_reward`, which needs a rating on every record, with one missing (not mid-run)."""
    from finger_reward.rewards import accuracy_reward, preference_reward, rating_reward

    if rating_reward in reward_funcs:
        unrated = [r.source or r.video for r in records if getattr(r, "rating", None) is None]
        if unrated:
            raise ValueError(f"rating_reward needs a 'rating' (or 'mos') on every record; {len(unrated)} have none, "
                             f"first: {unrated[0]}")
    kinds = {record_kind(r) for r in records}
    needs = {accuracy_reward: ("question", "Yes/No question lines (question fields, video, answer)"),
             preference_reward: ("preference", "preference lines (video, video_b, preferred)")}
    for func in reward_funcs:
        kind, lines = needs.get(func, (None, ""))
        if kind is not None and kind not in kinds:
            raise ValueError(f"{func.__name__} is a reward but {data or 'the training data'} holds no {lines}; it would "
                             f"be None (not applicable) on every row. Remove it from reward_funcs or add such lines")


def log_fields(record) -> dict:
    """A training record's fields in the GRPO rollout log: the question fields (or, for a preference
    record, prompt, dimension, question and `preferred`), absolute video path(s), the answer, and a
    rating question's `rating` and `mos`."""
    if isinstance(record, PreferenceRecord):
        return {"prompt": record.prompt, "dimension": record.dimension, "question": record.question,
                "video": os.path.abspath(record.video), "video_b": os.path.abspath(record.video_b),
                "preferred": record.preferred, "answer": record.answer}
    rating = {"rating": record.rating, "mos": record.mos} if record.rating is not None else {}  # Q-Save's level
    return {**record.as_question().to_dict(), "video": os.path.abspath(record.video), "answer": record.answer, **rating}


# ---- scoring results ------------------------------------------------------------------------------


def p_first_better(probs_ab: torch.Tensor, probs_ba: torch.Tensor | None = None) -> torch.Tensor:
    """P(the video shown first in `probs_ab` is better), per question, from [P(A), P(B)] rows (Q, 2).

    With `probs_ba`, the same questions asked with the videos swapped, the two orders are averaged:
    (P_AB(A) + P_BA(B)) / 2, which cancels a preference for a position and makes swapping the
    videos give exactly 1 - p.
    """
    first = probs_ab[..., 0]
    if probs_ba is None:
        return first
    if probs_ba.shape != probs_ab.shape:
        raise ValueError(f"the two orders answered different questions: {tuple(probs_ab.shape)} and {tuple(probs_ba.shape)}")
    return (first + probs_ba[..., 1]) / 2


@dataclass(frozen=True)
class Comparison:
    """`FingerReward.compare`'s result for one pair.

    `dimensions`: P(Video A better) per dimension asked; `overall`: their Eq. 4 weighted sum (the
    reward's weights). `both_orders`: whether each probability averages the orders (A, B) and
    (B, A). `reasons` (reason mode): per dimension, the model's reason for each order asked.
    """

    video_a: str
    video_b: str
    prompt: str
    dimensions: dict[str, float]
    overall: float
    both_orders: bool
    reasons: dict[str, list[str]] | None = None

    @property
    def preferred(self) -> str | None:
        """"A" or "B" by `overall`; None for an exact tie or NaN."""
        if math.isnan(self.overall) or self.overall == 0.5:
            return None
        return "A" if self.overall > 0.5 else "B"

    def to_dict(self) -> dict:
        return {**asdict(self), "preferred": self.preferred}


def comparison(video_a: str, video_b: str, prompt: str, dimensions: Sequence[str], p_a: torch.Tensor, *,
               weights: Mapping[str, float] | None = None, both_orders: bool = False,
               reasons: dict[str, list[str]] | None = None) -> Comparison:
    """A `Comparison` from P(A better) per asked dimension (`p_first_better`)."""
    if len(dimensions) != len(p_a):
        raise ValueError(f"{len(p_a)} probabilities for {len(dimensions)} dimensions")
    per_dim = {dim: float(p) for dim, p in zip(dimensions, p_a.tolist())}
    return Comparison(video_a, video_b, prompt, per_dim, overall_score(per_dim, weights), both_orders, reasons)
