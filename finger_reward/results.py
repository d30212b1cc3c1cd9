"""Result records: per question, per dimension and overall scores of one video."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from finger_reward import scoring
from finger_reward.questions import Question


@dataclass(frozen=True)
class QuestionScore:
    """One answered question: Eq. 1 probabilities, Eq. 2 entity score, hard answer, reason."""

    dimension: str
    entity: str
    question: str
    positive: bool
    p_yes: float
    p_no: float
    score: float
    answer: str
    reason: str | None = None
    # From a server's top-K log-probabilities: "yes"/"no" when that whole set was outside the top K,
    # "partial" when some spellings of either were.
    missing_variant: str | None = None


@dataclass(frozen=True)
class VideoScore:
    """FingER's scores of one video against its prompt.

    `overall` and `dimensions` use the answer probabilities (Eq. 1-4); `hard_overall` and
    `hard_dimensions` use the hard Yes/No answers instead (the paper's "w/o prob").
    A video that could not be scored has `error` set and NaN scores. `sampled` says what the
    model was given: {"frames", "fps", "height", "width"} of the sampled clip.
    """

    video: str
    prompt: str
    overall: float
    dimensions: dict[str, float] = field(default_factory=dict)
    questions: list[QuestionScore] = field(default_factory=list)
    hard_overall: float = math.nan
    hard_dimensions: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    sampled: dict | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "VideoScore":
        """Inverse of `to_dict` (as sent by the service)."""
        questions = [QuestionScore(**q) for q in data.get("questions", [])]
        return cls(**{**data, "questions": questions, "overall": _float(data["overall"]),
                      "hard_overall": _float(data.get("hard_overall"))})

    @classmethod
    def failed(cls, video: str, prompt: str, error: Exception | str) -> "VideoScore":
        return cls(video=video, prompt=prompt, overall=math.nan, error=str(error))


def json_safe(value):
    """NaN (a failed or undefined score) becomes None, so the JSON is strict and any client reads it."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _float(value) -> float:
    return math.nan if value is None else float(value)


def score_video(
    video: str,
    prompt: str,
    questions: list[Question],
    probs: torch.Tensor,
    reasons: list[str] | None = None,
    *,
    aggregate: str = "mean",
    weights: dict[str, float] | None = None,
    missing_variants: list[str | None] | None = None,
) -> VideoScore:
    """Apply Eq. 2-4 to a video's [P(Yes), P(No)] rows, with and without probabilities."""
    positive = [q.positive for q in questions]
    dims = [q.dimension for q in questions]
    soft = scoring.entity_scores(probs, positive)
    hard = scoring.entity_scores(scoring.hard_answers(probs), positive)
    dim_scores = scoring.dimension_scores(soft, dims, aggregate)
    hard_dim_scores = scoring.dimension_scores(hard, dims, aggregate)
    per_question = [
        QuestionScore(
            dimension=q.dimension, entity=q.entity, question=q.question, positive=q.positive,
            p_yes=float(p[0]), p_no=float(p[1]), score=float(s),
            answer="Yes" if h[0] > 0 else "No", reason=None if reasons is None else reasons[i],
            missing_variant=None if missing_variants is None else missing_variants[i],
        )
        for i, (q, p, s, h) in enumerate(zip(questions, probs, soft, scoring.hard_answers(probs)))
    ]
    return VideoScore(
        video=video, prompt=prompt,
        overall=scoring.overall_score(dim_scores, weights), dimensions=dim_scores, questions=per_question,
        hard_overall=scoring.overall_score(hard_dim_scores, weights), hard_dimensions=hard_dim_scores,
    )
