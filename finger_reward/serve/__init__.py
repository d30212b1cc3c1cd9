"""Serving FingerReward: an in-process batcher, an HTTP API (one process or Ray Serve), and a client.

Heavy libraries (uvicorn, Starlette, Ray, httpx) are imported only by the parts that need them.
"""

from finger_reward.serve.batcher import Batcher, QueueFull
from finger_reward.serve.client import FingerRewardClient, ServiceError
from finger_reward.serve.config import ServeConfig

__all__ = ["Batcher", "FingerRewardClient", "QueueFull", "ServeConfig", "ServiceError"]
