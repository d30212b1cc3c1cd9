"""The question-generator interface and what every generator does to its output.

A generator is any object with `generate_questions(prompts) -> dict[prompt, list[Question]]`
(template.py, llm.py). Prompts it could not serve are reported together in one
`GenerationError` after all prompts were tried, with the results of the others attached.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

from finger_reward.errors import QuestionError
from finger_reward.questions.bank import QuestionBank
from finger_reward.questions.record import DIMENSIONS, Question


@runtime_checkable
class QuestionGenerator(Protocol):
    def generate_questions(self, prompts: Sequence[str]) -> dict[str, list[Question]]: ...


class GenerationError(QuestionError):
    """Some prompts got no usable questions; `failures` says why per prompt, `results` has the rest."""

    def __init__(self, failures: dict[str, str], results: dict[str, list[Question]]):
        self.failures, self.results = failures, results
        lines = "\n".join(f"  {_short(p)!r}: {why}" for p, why in failures.items())
        super().__init__(f"no questions for {len(failures)} prompt(s):\n{lines}")


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _key(question: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", question.lower()).strip()


def tidy(questions: Iterable[Question], max_per_dimension: int) -> list[Question]:
    """Drop duplicate questions (ignoring case and punctuation) and keep at most N per dimension."""
    seen, kept, per_dim = set(), [], dict.fromkeys(DIMENSIONS, 0)
    for q in questions:
        key = (q.prompt, _key(q.question))
        if key in seen or per_dim[q.dimension] >= max_per_dimension:
            continue
        seen.add(key)
        per_dim[q.dimension] += 1
        kept.append(q)
    return kept


def fill_bank(bank: QuestionBank, prompts: Iterable[str], generator: QuestionGenerator) -> dict[str, str]:
    """Generate questions for the prompts the bank lacks (each new prompt asked once) and add them.

    Returns the prompts that failed, with why; the bank keeps whatever succeeded.
    """
    missing = list(dict.fromkeys(p for p in prompts if p not in bank))
    if not missing:
        return {}
    try:
        results, failures = generator.generate_questions(missing), {}
    except GenerationError as err:
        results, failures = err.results, err.failures
    for questions in results.values():
        bank.add(questions)
    return failures
