"""finger-reward: FingER's entity-level reward model for AI-generated video.

    from finger_reward import FingerReward
    reward = FingerReward.from_pretrained("path/to/model", questions="bank.jsonl")
    scores = reward(videos, prompts)
"""

from finger_reward.errors import BatchError, FingerError, QuestionError, VideoError
from finger_reward.questions import DIMENSIONS, Question, QuestionBank
from finger_reward.results import QuestionScore, VideoScore
from finger_reward.reward import FingerReward

__version__ = "0.1.0"

__all__ = [
    "DIMENSIONS",
    "BatchError",
    "FingerError",
    "FingerReward",
    "Question",
    "QuestionBank",
    "QuestionError",
    "QuestionScore",
    "VideoError",
    "VideoScore",
]
