"""Entity-level questions: the record, the question bank, and generators that write questions from prompts."""

from finger_reward.questions.bank import QuestionBank, as_bank
from finger_reward.questions.config import QuestionConfig, load_question_config
from finger_reward.questions.generate import GenerationError, QuestionGenerator, fill_bank
from finger_reward.questions.llm import OpenAIGenerator, TransformersGenerator
from finger_reward.questions.record import DIMENSIONS, Question
from finger_reward.questions.template import TemplateGenerator

__all__ = [
    "DIMENSIONS",
    "GenerationError",
    "OpenAIGenerator",
    "Question",
    "QuestionBank",
    "QuestionConfig",
    "QuestionGenerator",
    "TemplateGenerator",
    "TransformersGenerator",
    "as_bank",
    "fill_bank",
    "load_question_config",
]

