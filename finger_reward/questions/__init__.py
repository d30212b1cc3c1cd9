"""Entity-level questions: the record, the five dimensions and the question bank."""

from finger_reward.questions.bank import QuestionBank, as_bank
from finger_reward.questions.record import DIMENSIONS, Question

__all__ = ["DIMENSIONS", "Question", "QuestionBank", "as_bank"]
