"""What a question-generating LLM is told: dimension definitions, key points, in-context examples.

The default lives in `configs/questions.yaml` (shipped as `finger_reward.configs`); users point
to their own copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from finger_reward.errors import QuestionError
from finger_reward.questions.record import DIMENSIONS, Question


@dataclass(frozen=True)
class DimensionSpec:
    """One assessment dimension as the LLM sees it."""

    name: str
    definition: str
    key_points: tuple[str, ...]


@dataclass(frozen=True)
class QuestionConfig:
    """The parts of a question-generation prompt, plus the per-dimension cap."""

    task: str
    entity_instructions: str
    output_format: str
    dimensions: dict[str, DimensionSpec]
    examples: tuple[dict, ...] = ()
    max_per_dimension: int = 4
    source: str = field(default="", compare=False)

    def example_questions(self, example: dict) -> list[Question]:
        return [Question.from_dict({"prompt": example["prompt"], **q}) for q in example["questions"]]


def load_question_config(path: str | Path | None = None) -> QuestionConfig:
    """Load a question config from YAML; None loads the packaged `configs/questions.yaml`."""
    import yaml

    source = Path(path) if path is not None else resources.files("finger_reward.configs") / "questions.yaml"
    if path is not None and not Path(path).is_file():
        raise QuestionError(f"question config {path} not found")
    raw = yaml.safe_load(source.read_text(encoding="utf-8")) or {}
    where = str(source)
    missing = [k for k in ("task", "entity_instructions", "output_format", "dimensions") if k not in raw]
    if missing:
        raise QuestionError(f"{where}: missing key(s) {', '.join(missing)}")
    dims = raw["dimensions"]
    if set(dims) != set(DIMENSIONS):
        raise QuestionError(f"{where}: 'dimensions' must define exactly {', '.join(DIMENSIONS)}; got {', '.join(dims)}")
    config = QuestionConfig(
        task=raw["task"].strip(),
        entity_instructions=raw["entity_instructions"].strip(),
        output_format=raw["output_format"].strip(),
        dimensions={d: DimensionSpec(dims[d]["name"], dims[d]["definition"], tuple(dims[d]["key_points"]))
                    for d in DIMENSIONS},
        examples=tuple(raw.get("examples") or ()),
        max_per_dimension=int(raw.get("max_per_dimension", 4)),
        source=where,
    )
    if config.max_per_dimension < 1:
        raise QuestionError(f"{where}: max_per_dimension must be at least 1")
    for number, example in enumerate(config.examples, start=1):
        try:
            config.example_questions(example)
        except (KeyError, TypeError, QuestionError) as err:
            raise QuestionError(f"{where}: example {number}: {err}") from None
    return config
