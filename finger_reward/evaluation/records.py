"""What an evaluation benchmark holds: answered questions, rated videos or preference pairs."""

from __future__ import annotations

from dataclasses import dataclass

from finger_reward.errors import FingerError
from finger_reward.questions.record import Question

BENCHMARK_KINDS = ("questions", "ratings", "pairs")
ANSWERS = ("Yes", "No")
PAIR_LABELS = (1, -1, 0)


class BenchmarkError(FingerError):
    """A benchmark file has a bad line, row or entry; the message names the file, where and the field."""

    def __init__(self, where: str, field: str | None, problem: str):
        self.where, self.field, self.problem = where, field, problem
        super().__init__(f"{where}: field {field!r}: {problem}" if field else f"{where}: {problem}")


@dataclass(frozen=True)
class AnsweredQuestion:
    """FingER-test style: one human-answered Yes/No question about one video."""

    question: Question
    video: str
    answer: str

    def __post_init__(self):
        if self.answer not in ANSWERS:
            raise ValueError(f"answer must be 'Yes' or 'No', got {self.answer!r}")

    @property
    def good(self) -> bool:
        """True when the human answer is the one that means a better video (Eq. 2's polarity)."""
        return (self.answer == "Yes") == self.question.positive


@dataclass(frozen=True)
class RatedVideo:
    """One video with human scores: "overall" and/or dimension ids, on the benchmark's own scale."""

    video: str
    prompt: str
    human: dict[str, float]
    model: str | None = None  # the generator that made it, when the layout says


@dataclass(frozen=True)
class VideoPair:
    """A human preference between two videos of one prompt: 1 = A preferred, -1 = B preferred, 0 = tie."""

    prompt: str
    video_a: str
    video_b: str
    label: int
    dimension: str = "overall"
    vote: str | None = None  # GenAI-Bench's own four-way vote (leftvote/rightvote/tievote/bothbad_vote), when it has one

    def __post_init__(self):
        if self.label not in PAIR_LABELS or isinstance(self.label, bool):
            raise ValueError(f"label must be 1 (A preferred), -1 (B preferred) or 0 (tie), got {self.label!r}")


@dataclass(frozen=True)
class Benchmark:
    """A loaded benchmark: its name, its kind, its records and which public form it came from."""

    name: str
    kind: str
    items: tuple
    note: str = ""

    def __post_init__(self):
        if self.kind not in BENCHMARK_KINDS:
            raise ValueError(f"kind must be one of {', '.join(BENCHMARK_KINDS)}, got {self.kind!r}")

    def __len__(self) -> int:
        return len(self.items)
