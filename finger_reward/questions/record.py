"""The entity-level question record (FingER Sec. 3.1) and the five dimension identifiers."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from finger_reward.errors import QuestionError

DIMENSIONS = (
    "visual_quality",
    "temporal_consistency",
    "dynamic_degree",
    "text_alignment",
    "factual_consistency",
)

QUESTION_FIELDS = ("prompt", "dimension", "entity", "question", "positive")


@dataclass(frozen=True)
class Question:
    """One Yes/No question about an entity of a prompt, in one dimension.

    `positive` is the paper's q_stat (Eq. 2): True when "Yes" means a better video.
    """

    prompt: str
    dimension: str
    entity: str
    question: str
    positive: bool

    def __post_init__(self):
        if self.dimension not in DIMENSIONS:
            raise QuestionError(f"unknown dimension {self.dimension!r}; expected one of {', '.join(DIMENSIONS)}")
        for field in ("prompt", "entity", "question"):
            value = getattr(self, field)
            if not isinstance(value, str) or (field != "entity" and not value.strip()):
                raise QuestionError(f"field {field!r} must be a non-empty string, got {value!r}")
        if not isinstance(self.positive, bool):
            raise QuestionError(f"field 'positive' must be true or false, got {self.positive!r}")

    @classmethod
    def from_dict(cls, record: dict) -> "Question":
        """Build from a mapping with the five fields (extra keys such as answer or video are ignored)."""
        if not isinstance(record, dict):
            raise QuestionError(f"expected a JSON object, got {type(record).__name__}")
        missing = [f for f in QUESTION_FIELDS if f not in record]
        if missing:
            raise QuestionError(f"missing field(s) {', '.join(missing)}")
        positive = record["positive"]
        if positive in (0, 1) and not isinstance(positive, bool):
            positive = bool(positive)  # the paper writes q_stat as 0/1
        return cls(**{f: record[f] for f in QUESTION_FIELDS[:-1]}, positive=positive)

    def to_dict(self) -> dict:
        return asdict(self)
