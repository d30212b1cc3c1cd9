"""FingerRewardClient: the FingerReward call interface, served by a remote FingER service.

    reward_fn = FingerRewardClient("http://127.0.0.1:8000", token=...)
    reward_fn(videos, prompts)        # list[float]
    reward_fn.score(videos, prompts)  # list[VideoScore]

Large batches are split into requests of `videos_per_request` sent `concurrency` at a time, so
the service can batch them with other callers' videos. 429/503 answers and dropped connections
are retried with exponential back-off.
"""

from __future__ import annotations

import base64
import io
import os
import random
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from finger_reward.errors import BatchError, FingerError, VideoError
from finger_reward.results import VideoScore
from finger_reward.reward import ON_ERROR, pair_videos_prompts
from finger_reward.video import VALUE_RANGES, frames_from_memory, describe

_RETRY_STATUS = {429, 502, 503, 504}


class ServiceError(FingerError):
    """The service refused a request or could not be reached."""


class FingerRewardClient:
    __name__ = "finger_reward"  # TRL logs reward functions under their __name__

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        timeout: float = 600.0,
        max_retries: int = 6,
        backoff: float = 0.5,
        videos_per_request: int = 8,
        concurrency: int = 4,
        value_range: tuple[float, float] = (0.0, 1.0),
        send_paths: bool = False,
        on_error: str = "raise",
    ):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error={on_error!r} is not one of {ON_ERROR}")
        if tuple(value_range) not in VALUE_RANGES:
            raise ValueError(f"value_range={value_range!r} must be one of {VALUE_RANGES}")
        self.url, self.token = url.rstrip("/"), token
        self.timeout, self.max_retries, self.backoff = timeout, max_retries, backoff
        self.videos_per_request, self.concurrency = videos_per_request, concurrency
        self.value_range, self.send_paths, self.on_error = tuple(value_range), send_paths, on_error
        self._http, self._http_lock = None, threading.Lock()

    def __getstate__(self):  # picklable for TRL/verl workers: the HTTP connection pool is not sent
        return {k: v for k, v in self.__dict__.items() if k not in ("_http", "_http_lock")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._http, self._http_lock = None, threading.Lock()

    def close(self) -> None:
        """Close the HTTP connection pool; the client opens a new one if it is used again."""
        with self._http_lock:
            http, self._http = self._http, None
        if http is not None:
            http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __call__(self, videos: Sequence[Any], prompts: Sequence[str] | str, **host_kwargs) -> list[float]:
        """One overall score per video, as `FingerReward.__call__`."""
        return [s.overall for s in self.score(videos, prompts)]

    def score(self, videos: Sequence[Any], prompts: Sequence[str] | str) -> list[VideoScore]:
        """Full results per video, as `FingerReward.score` (same failure handling)."""
        videos, prompts = pair_videos_prompts(videos, prompts)
        names = [describe(v, i) for i, v in enumerate(videos)]
        payloads: list[Any] = []
        for video, name in zip(videos, names):
            try:
                payloads.append(self._encode(video, name))
            except (VideoError, OSError) as err:
                payloads.append(VideoError(name, str(err)) if isinstance(err, OSError) else err)
        chunks = [range(i, min(i + self.videos_per_request, len(videos))) for i in range(0, len(videos), self.videos_per_request)]
        with ThreadPoolExecutor(self.concurrency) as pool:
            answers = list(pool.map(lambda c: self._score_chunk(c, payloads, prompts, names), chunks))
        results = [r for chunk in answers for r in chunk]
        failures = {i: FingerError(r.error) for i, r in enumerate(results) if not r.ok}
        if failures and self.on_error == "raise":
            raise BatchError(failures, results)
        return results

    def health(self) -> dict:
        return self._request("GET", "/v1/health").json()

    # ---- internals ----------------------------------------------------------------------------------

    def _encode(self, video: Any, name: str) -> Any:
        """A request entry: base64 of the file, an allowed path, or base64 of a uint8 .npy array."""
        if isinstance(video, (str, os.PathLike)):
            if self.send_paths:
                return {"path": os.path.abspath(video)}
            with open(video, "rb") as file:
                return {"data": base64.b64encode(file.read()).decode()}
        if isinstance(video, (bytes, bytearray, memoryview)):
            return {"data": base64.b64encode(bytes(video)).decode()}
        frames = frames_from_memory(video, name, self.value_range)  # the same checks as the local path
        buffer = io.BytesIO()
        np.save(buffer, frames.permute(0, 2, 3, 1).contiguous().numpy(), allow_pickle=False)
        return {"npy": base64.b64encode(buffer.getvalue()).decode()}

    def _score_chunk(self, indices: range, payloads: list, prompts: list[str], names: list[str]) -> list[VideoScore]:
        """Score the chunk's encodable videos in one request; local encoding errors stay in place."""
        sendable = [i for i in indices if not isinstance(payloads[i], Exception)]
        results = {i: VideoScore.failed(names[i], prompts[i], payloads[i]) for i in indices if i not in sendable}
        if sendable:
            body = {"videos": [payloads[i] for i in sendable], "prompts": [prompts[i] for i in sendable]}
            response = self._request("POST", "/v1/score", json=body, allow={400, 500})
            try:
                returned = response.json()["results"]
            except (ValueError, KeyError):
                raise ServiceError(f"{self.url}: HTTP {response.status_code}: {response.text[:300]}") from None
            for i, result in zip(sendable, returned):
                results[i] = VideoScore.from_dict({**result, "video": names[i]})
        return [results[i] for i in indices]

    def _client(self):
        """One connection pool shared by every calling thread (httpx clients are thread-safe)."""
        import httpx

        with self._http_lock:
            if self._http is None:
                headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
                limits = httpx.Limits(max_connections=max(10, 2 * self.concurrency))
                self._http = httpx.Client(base_url=self.url, timeout=self.timeout, headers=headers, limits=limits)
            return self._http

    def _request(self, method: str, path: str, json=None, allow: set[int] = frozenset()):
        import httpx

        problem = "no attempt made"
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1) * (1 + 0.25 * random.random()))
            try:
                response = self._client().request(method, path, json=json)
            except httpx.TransportError as err:
                problem = f"cannot reach the service: {type(err).__name__}: {err}"
                continue
            if response.status_code in _RETRY_STATUS:
                problem = f"HTTP {response.status_code}: {_message(response)}"
                continue
            if response.status_code < 400 or response.status_code in allow:
                return response
            raise ServiceError(f"{self.url}{path}: HTTP {response.status_code}: {_message(response)}")
        raise ServiceError(f"{self.url}{path}: gave up after {self.max_retries + 1} attempts; last: {problem}")


def _message(response) -> str:
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return response.text[:300]
