"""Training rewards for the evaluator itself (GRPO), as pure functions in TRL's reward shape.

Each reward is `name(completions, <column>=..., **kwargs) -> list[float]`: TRL calls it as
`f(prompts=, completions=, completion_ids=, <every dataset column>=, trainer_state=, log_extra=,
log_metric=)` and logs it under `rewards/<name>/`; extra keyword arguments are ignored. A
completion is a string or a list of chat messages (the assistant contents are joined). Every
reward reads completions through `parse_completion`, the one parser of the contract
`<reason>...</reason><answer>...</answer>`, so evaluation and reward cannot drift apart.

Question rows (FingER Yes/No) and preference rows (VQ-Insight's two videos, a value in column
`preferred`) may be mixed: `accuracy_reward` returns None on preference rows and
`preference_reward` None on question rows (TRL's "not applicable"; trainers sum with nansum).

    trainer = GRPOTrainer(model=..., reward_funcs=[accuracy_reward, format_reward], ...)  # FingER Eq. 9
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from finger_reward.prompts import ANSWER_CLOSE, ANSWER_OPEN, REASON_CLOSE, REASON_OPEN
from finger_reward.scoring import RATING_LEVELS

_TAGS = (REASON_OPEN, REASON_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
_LAYOUT = re.compile(
    rf"\s*{re.escape(REASON_OPEN)}(.*){re.escape(REASON_CLOSE)}\s*{re.escape(ANSWER_OPEN)}(.*){re.escape(ANSWER_CLOSE)}\s*",
    re.DOTALL,
)
_YES_NO_WORD = re.compile(r"\b(yes|no)\b", re.IGNORECASE)
_VIDEO = re.compile(r"(?:video\s*)?([ab12])\.?", re.IGNORECASE)
_SCORE_ITEM = re.compile(r"\s*([A-Za-z_][\w ]*?)\s*:\s*([-+]?(?:\d+\.?\d*|\.\d+))\s*")


@dataclass(frozen=True)
class ParsedCompletion:
    """One completion read against the contract `<reason>...</reason><answer>...</answer>`.

    `reason` / `answer`: the stripped text inside the tag when that tag occurs exactly once
    (opening and closing), else None. `well_formed`: each of the four tags occurs exactly once,
    reason before answer, a non-empty reason, only whitespace outside the tags.
    """

    reason: str | None
    answer: str | None
    well_formed: bool

    @property
    def exact(self) -> bool:
        """FingER's format (Sec. 3.3.3, Eq. 11): well formed, answer Yes/No (any case), and no
        Yes/No word (any case, whole words) outside the answer tag."""
        return (
            self.well_formed
            and self.answer is not None
            and self.answer.lower() in ("yes", "no")
            and not _YES_NO_WORD.search(self.reason or "")
        )


def completion_text(completion: Any) -> str:
    """A TRL completion as text: a string, or chat messages whose assistant contents are joined."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence):
        parts = [m.get("content") or "" for m in completion if isinstance(m, Mapping) and m.get("role", "assistant") == "assistant"]
        return "".join(p if isinstance(p, str) else "".join(b.get("text", "") for b in p if isinstance(b, Mapping)) for p in parts)
    raise TypeError(f"a completion must be a string or a list of chat messages, got {type(completion).__name__}")


def _inside(text: str, open_tag: str, close_tag: str) -> str | None:
    if text.count(open_tag) != 1 or text.count(close_tag) != 1:
        return None
    start, end = text.index(open_tag) + len(open_tag), text.index(close_tag)
    return text[start:end].strip() if start <= end else None


def parse_completion(text: Any) -> ParsedCompletion:
    """Parse one completion (string or chat messages); see `ParsedCompletion`."""
    text = completion_text(text)
    reason, answer = _inside(text, REASON_OPEN, REASON_CLOSE), _inside(text, ANSWER_OPEN, ANSWER_CLOSE)
    once = all(text.count(tag) == 1 for tag in _TAGS)
    well_formed = once and bool(reason) and _LAYOUT.fullmatch(text) is not None
    return ParsedCompletion(reason=reason, answer=answer, well_formed=well_formed)


def _column(name: str, values: Any, completions: Sequence, reward: str) -> list:
    if values is None:
        raise KeyError(
            f"{reward} needs the dataset column {name!r} (one value per prompt); add it to the dataset, "
            "TRL passes every column to reward functions by name"
        )
    values = list(values)
    if len(values) != len(completions):
        raise ValueError(f"{reward}: {len(completions)} completions but {len(values)} values in column {name!r}")
    return values


def _normalise(value: Any, allowed: Sequence[str], column: str) -> str:
    if isinstance(value, str) and value.strip().lower() in [a.lower() for a in allowed]:
        return value.strip().lower()
    raise ValueError(f"column {column!r} must hold one of {', '.join(allowed)} (any case), got {value!r}")


def accuracy_reward(completions: Sequence, answer: Sequence[str | None] | None = None,
                    preferred: Sequence[str | None] | None = None, log_extra=None, **kwargs) -> list[float | None]:
    """FingER Eq. 10: 1.0 when the text inside the one `<answer>` tag equals the ground truth
    (column `answer`, "Yes"/"No"; case-insensitive, whitespace-trimmed), else 0.0. An answer
    outside the tag, or two answer tags, scores 0. The parsed answers go to TRL's completions
    table as `parsed_answer` when `log_extra` is given.

    Preference rows (a value in column `preferred`: VQ-Insight's two-video comparison, judged by
    `preference_reward`) get None, TRL's "not applicable", so question and preference rows mix;
    their `answer`, if any, is not read."""
    questions = _question_rows(completions, preferred, "accuracy_reward")
    truth: list[str | None] = [None] * len(completions)
    if questions:  # a batch of preference rows alone needs no answer column
        values = _column("answer", answer, completions, "accuracy_reward")
        for i in questions:
            truth[i] = _normalise(values[i], ("Yes", "No"), "answer")
    parsed = [parse_completion(c).answer for c in completions]
    if log_extra is not None:
        log_extra("parsed_answer", parsed)
    return [None if t is None else float(p is not None and p.lower() == t) for p, t in zip(parsed, truth)]


def _question_rows(completions: Sequence, preferred: Sequence | None, reward: str) -> list[int]:
    """Indices of the rows that are not preference rows (no value in column `preferred`)."""
    if preferred is None:
        return list(range(len(completions)))
    return [i for i, value in enumerate(_column("preferred", preferred, completions, reward)) if value is None]


def format_reward(completions: Sequence, preferred: Sequence[str | None] | None = None, **kwargs) -> list[float]:
    """FingER Eq. 11: 1.0 iff the completion is exactly `<reason>...</reason>` then
    `<answer>Yes|No</answer>` (whitespace allowed around and between), each tag once, with a
    non-empty reason and no word Yes/No (any case) outside the answer tag; else 0.0.

    Strict by design, as the paper says: a reason saying "no blur" fails the format. A preference
    row (a value in column `preferred`: VQ-Insight's two-video comparison) answers with a video
    instead: 1.0 iff well formed with exactly "A" or "B" in the answer tag, the token that
    `FingerReward.compare` reads; its reason may name the videos. Rows whose `preferred` is None
    keep the Yes/No format, so question and preference rows can be mixed."""
    if preferred is None:
        return [float(parse_completion(c).exact) for c in completions]
    kinds = _column("preferred", preferred, completions, "format_reward")
    return [float(parse_completion(c).exact) if kind is None else float(_choice_exact(parse_completion(c)))
            for c, kind in zip(completions, kinds)]


def _choice_exact(parsed: ParsedCompletion) -> bool:
    return parsed.well_formed and parsed.answer in ("A", "B")


def length_reward(
    completions: Sequence, completion_ids: Sequence[Sequence[int]] | None = None, *,
    low: int = 320, high: int = 512, gamma: float = 0.1, **kwargs,
) -> list[float]:
    """VQ-Insight Eq. 5 (length control): `gamma` if `low < len(o_i) < high`, else 0.

    Strict bounds as in Eq. 5 (the prose names the interval [l_min, l_max]; the equation is
    exclusive); defaults l_min=320, l_max=512, gamma=0.1 as in the paper. len(o_i) counts the
    whole completion: its token ids when TRL passes `completion_ids`, else its whitespace words."""
    if not low < high:
        raise ValueError(f"length_reward needs low < high, got low={low}, high={high}")
    if completion_ids is not None:
        lengths = [len(ids) for ids in _column("completion_ids", completion_ids, completions, "length_reward")]
    else:
        lengths = [len(completion_text(c).split()) for c in completions]
    return [float(gamma) if low < n < high else 0.0 for n in lengths]


def temporal_reward(
    completions: Sequence, w_seq: Sequence[float] | None = None, w_rand: Sequence[float] | None = None, *,
    alpha: float = 0.3, mu: float = 0.8, **kwargs,
) -> list[float]:
    """VQ-Insight Eq. 4 (temporal modelling): `alpha` if `w_seq > mu * w_rand`, else 0, per response i.

    `w_seq[i]`: the probability of the correct answer after the i-th response on the clip with its
    frames in order; `w_rand[i]`: the same after the i-th response sampled on the clip with its
    frames shuffled. The GRPO trainer computes both (`GRPORecipe.temporal_shuffle`,
    `finger_reward.temporal`) and passes them as these keyword columns. Defaults alpha=0.3,
    mu=0.8 as in the paper; the comparison is strict, as Eq. 4 writes it."""
    ordered = [float(p) for p in _column("w_seq", w_seq, completions, "temporal_reward")]
    shuffled = [float(p) for p in _column("w_rand", w_rand, completions, "temporal_reward")]
    bad = [p for p in ordered + shuffled if not 0.0 <= p <= 1.0]  # also catches NaN
    if bad:
        raise ValueError(f"temporal_reward needs probabilities w_seq, w_rand in [0, 1], got {bad[:3]}")
    return [float(alpha) if seq > mu * rand else 0.0 for seq, rand in zip(ordered, shuffled)]


def parse_dimension_scores(answer: str | None) -> dict[str, float] | None:
    """Scores stated in an answer tag as `dimension: score` items, one per line (or separated by
    `,` / `;`), e.g. "visual_quality: 0.8\\ntext_alignment: 0.6". None when any item is malformed
    or a dimension is repeated."""
    if not answer:
        return None
    scores = {}
    for item in filter(str.strip, re.split(r"[\n,;]", answer)):
        match = _SCORE_ITEM.fullmatch(item)
        if match is None or match[1] in scores:
            return None
        scores[match[1]] = float(match[2])
    return scores or None


def multi_dimension_reward(completions: Sequence, dimension_scores: Sequence[Mapping[str, float]] | None = None,
                           *, dimension_weight: float | str = 1.0, **kwargs) -> list[float]:
    """VQ-Insight Eq. 6 (multi-dimension scoring): `1 - sum_j lambda_j |v_pred_j - v_gt_j|`.

    lambda_j = `dimension_weight` for every dimension: 1.0 by default, as the paper sets it
    ("lambda_i in Eq. 6 is set to 1", Implementation Details), so with M dimensions the reward
    lies in [1 - M, 1]; "mean" gives lambda_j = 1/M (1 - mean l1 distance, in [0, 1]).

    Column `dimension_scores`: one mapping {dimension: score} per prompt, scores on [0, 1]
    (rescale MOS first, e.g. (mos - 1) / 4 for 1-5). The completion states its scores inside
    the answer tag (see `parse_dimension_scores`); when they are unparseable, miss a
    ground-truth dimension or lie outside [0, 1] it gets the lowest reward Eq. 6 can give,
    `1 - sum_j lambda_j` (every distance 1), so no malformed answer beats a wrong one."""
    truths = _column("dimension_scores", dimension_scores, completions, "multi_dimension_reward")
    rewards = []
    for completion, truth in zip(completions, truths):
        if not isinstance(truth, Mapping) or not truth or not all(0.0 <= float(v) <= 1.0 for v in truth.values()):
            raise ValueError(f"column 'dimension_scores' must hold non-empty {{dimension: score in [0, 1]}}, got {truth!r}")
        weight = _dimension_weight(dimension_weight, len(truth))
        pred = parse_dimension_scores(parse_completion(completion).answer) or {}
        values = [pred.get(dim, math.nan) for dim in truth]
        if not all(0.0 <= v <= 1.0 for v in values):  # missing (NaN) or out of range
            rewards.append(1.0 - weight * len(truth))
            continue
        rewards.append(1.0 - weight * sum(abs(v - float(truth[d])) for v, d in zip(values, truth)))
    return rewards


def _dimension_weight(value: float | str, dimensions: int) -> float:
    if value == "mean":
        return 1.0 / dimensions
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"dimension_weight must be a positive number (VQ-Insight: 1) or 'mean' (1/M), got {value!r}")
    return float(value)


def _video_choice(text: str | None) -> str | None:
    match = _VIDEO.fullmatch(text.strip()) if text else None
    return None if match is None else {"a": "A", "1": "A", "b": "B", "2": "B"}[match[1].lower()]


def preference_reward(completions: Sequence, preferred: Sequence[str | None] | None = None,
                      answer: Sequence[str | None] | None = None, **kwargs) -> list[float | None]:
    """VQ-Insight Eq. 7 (preference comparison): 1.0 when the answer tag names the preferred
    video, else 0.0. Column `preferred`: "A"/"B" (also "Video A", "video1"/"video2"); the answer
    tag holds "A", "Video A", "video a." and the like; anything else scores 0.

    Question rows (`preferred` None, or no `preferred` column beside an `answer` column: a batch
    of FingER questions alone) get None, TRL's "not applicable", so question and preference rows
    mix. Without either column it raises, naming `preferred`."""
    if preferred is None and answer is not None:
        _column("answer", answer, completions, "preference_reward")  # the lengths must still agree
        return [None] * len(completions)
    values = _column("preferred", preferred, completions, "preference_reward")
    rewards: list[float | None] = []
    for completion, value in zip(completions, values):
        if value is None:
            rewards.append(None)
            continue
        truth = _video_choice(value) if isinstance(value, str) else None
        if truth is None:
            raise ValueError(f"column 'preferred' must name video A or B ('A', 'Video B', 'video1', ...) or be None "
                             f"on a question row, got {value!r}")
        rewards.append(float(_video_choice(parse_completion(completion).answer) == truth))
    return rewards


def rating_reward(completions: Sequence, rating: Sequence[str] | None = None, *, format_weight: float = 0.5,
                  **kwargs) -> list[float]:
    """Q-Save Sec. 4 (RL warm-up): R = R_acc + lambda * R_fmt with lambda = `format_weight` = 0.5.

    R_acc = 1 when the answer tag holds the level in column `rating` (one of Bad, Poor, Fair,
    Good, Excellent; case-insensitive). R_fmt = 1 when the completion is well formed (a non-empty
    reason, then an answer tag holding one of the five levels): the paper's "<think> tag with
    rationale" in this project's tags. So the reward is one of 0, 0.5, 1, 1.5."""
    truths = [_normalise(r, RATING_LEVELS, "rating") for r in _column("rating", rating, completions, "rating_reward")]
    levels = [level.lower() for level in RATING_LEVELS]
    rewards = []
    for completion, truth in zip(completions, truths):
        parsed = parse_completion(completion)
        answer = parsed.answer.lower() if parsed.answer is not None else None
        fmt = parsed.well_formed and answer in levels
        rewards.append(float(answer == truth) + format_weight * float(fmt))
    return rewards
