"""Batched VLM inference: P(Yes)/P(No) for every (video, question) pair."""

from finger_reward.engine.openai_backend import OpenAIEngine
from finger_reward.engine.transformers_backend import Answers, TransformersEngine, default_device_dtype

__all__ = ["Answers", "OpenAIEngine", "TransformersEngine", "default_device_dtype"]
