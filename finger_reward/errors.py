"""Errors that name the input at fault, so a user can fix it without a debugger."""

from __future__ import annotations


class FingerError(ValueError):
    """Base class of the library's input errors."""


class VideoError(FingerError):
    """A video could not be read or has the wrong shape, dtype or values."""

    def __init__(self, video: str, problem: str):
        self.video, self.problem = video, problem
        super().__init__(f"video {video}: {problem}")


class QuestionError(FingerError):
    """A question record or question-bank line is invalid, or a prompt has no questions."""


class BatchError(FingerError):
    """Some videos of a batch failed; `failures` maps each one's index to its error.

    Raised only after every video has been tried, so one bad input never hides another, and
    `results` keeps the scores of the videos that succeeded.
    """

    def __init__(self, failures: dict[int, Exception], results: list | None = None):
        self.failures, self.results = failures, results
        lines = "\n".join(f"  [{i}] {err}" for i, err in sorted(failures.items()))
        super().__init__(f"{len(failures)} video(s) could not be scored:\n{lines}")
