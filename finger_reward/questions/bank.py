"""The question bank: each prompt's questions, loaded from and saved to JSONL (one question per line)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from finger_reward.errors import QuestionError
from finger_reward.jsonl import JsonlError, read_jsonl
from finger_reward.questions.record import Question


class QuestionBank:
    """Maps a prompt to its questions, in insertion order, without duplicates."""

    def __init__(self, questions: Iterable[Question] = ()):
        self._by_prompt: dict[str, list[Question]] = {}
        self.add(questions)

    def add(self, questions: Iterable[Question]) -> None:
        for q in questions:
            if not isinstance(q, Question):
                raise QuestionError(f"expected Question records, got {type(q).__name__}")
            bucket = self._by_prompt.setdefault(q.prompt, [])
            if q not in bucket:
                bucket.append(q)

    def questions_for(self, prompt: str) -> list[Question]:
        """The prompt's questions; a prompt the bank does not hold is an error naming it."""
        questions = self._by_prompt.get(prompt)
        if not questions:
            shown = prompt if len(prompt) <= 120 else prompt[:117] + "..."
            raise QuestionError(f"no questions for prompt {shown!r} in the question bank ({len(self)} prompts)")
        return list(questions)

    def __contains__(self, prompt: object) -> bool:
        return prompt in self._by_prompt

    def __len__(self) -> int:
        return len(self._by_prompt)

    def __iter__(self):
        return (q for bucket in self._by_prompt.values() for q in bucket)

    @property
    def prompts(self) -> list[str]:
        return list(self._by_prompt)

    @classmethod
    def from_jsonl(cls, path: str | Path) -> "QuestionBank":
        """Load a bank; a bad line raises `QuestionError` with the file and line number."""
        path = Path(path)
        if not path.is_file():
            raise QuestionError(f"question bank {path} not found")
        bank, where = cls(), str(path)
        try:
            for where, record in read_jsonl(path):
                bank.add([Question.from_dict(record)])
        except JsonlError as err:
            raise QuestionError(str(err)) from None
        except QuestionError as err:
            raise QuestionError(f"{where}: {err}") from None
        return bank

    def to_jsonl(self, path: str | Path) -> Path:
        path = Path(path)
        path.unlink(missing_ok=True)
        return append_jsonl(path, self)


def append_jsonl(path: str | Path, questions: Iterable[Question]) -> Path:
    """Append questions to a bank file, one JSON object per line (creating the file and its folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as out:
        for q in questions:
            out.write(json.dumps(q.to_dict(), ensure_ascii=False) + "\n")
    return path


def as_bank(questions) -> QuestionBank:
    """Accept what `FingerReward(questions=...)` takes: a JSONL path, a bank, or Question records."""
    if isinstance(questions, QuestionBank):
        return questions
    if isinstance(questions, (str, Path)):
        return QuestionBank.from_jsonl(questions)
    if isinstance(questions, Iterable):
        return QuestionBank(questions)
    raise QuestionError(
        f"questions must be a JSONL path, a QuestionBank or a list of Question, got {type(questions).__name__}"
    )
