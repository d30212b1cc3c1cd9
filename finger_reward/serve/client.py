"""FingerRewardClient: the FingerReward call interface, served by a remote FingER service.

    reward_fn = FingerRewardClient("http://127.0.0.1:8000", token=...)
    reward_fn(videos, prompts)        # list[float]
    reward_fn.score(videos, prompts)  # list[VideoScore]

In-memory videos (arrays, tensors, PIL lists, `VideoFrames`) are sampled and resized here, with
the settings the service reports at `GET /v1/health`, and sent losslessly compressed
(`serve.wire`): a 81x480x832 Wan clip goes as its ~10 sampled frames, not 97 MB of pixels, and
scores exactly as `FingerReward.score` would score the array in process. Files are sent as they
are (they carry their own frame rate). Large batches are split into requests of at most
`videos_per_request` videos and the service's payload limit, sent `concurrency` at a time, so the
service can batch them with other callers' videos. 429/503 answers and dropped connections are
retried with exponential back-off, and so is a 5xx answer that is not the service's JSON (a proxy's, such as Ray
Serve's plain 500 for a request whose replica died); each request carries an `Idempotency-Key`, so a retry of a
request the service had already scored is answered from its result cache, not scored twice. `stats` holds the last `score`'s bytes, requests and timings.
"""

from __future__ import annotations

import base64
import json
import os
import random
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from finger_reward.errors import BatchError, FingerError, VideoError
from finger_reward.results import VideoScore
from finger_reward.reward import ON_ERROR, check_rate, pair_videos_prompts, video_rates
from finger_reward.video import VALUE_RANGES, SlowFast, VideoFrames, describe, load_video

_RETRY_STATUS = {429, 502, 503, 504}
_ENVELOPE = 4096  # bytes of a request that are not video entries (prompts, keys), well over the real share


@dataclass
class ClientStats:
    """What the last `score` sent and how long its parts took (seconds, wall clock)."""

    videos: int = 0
    requests: int = 0
    bytes_sent: int = 0        # request bodies on the wire
    prepare_s: float = 0.0     # sampling, resizing and compressing in-memory videos here
    request_s: float = 0.0     # from the first request sent to the last answer
    retried: list[str] = field(default_factory=list)  # why each attempt that was sent again failed


class PayloadTooLarge(FingerError):
    """One video's entry is bigger than the service accepts in a whole request."""


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
        videos_per_request: int = 16,
        concurrency: int = 4,
        value_range: tuple[float, float] = (0.0, 1.0),
        send_paths: bool = False,
        video_fps: float | None = None,
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
        self.video_fps = check_rate(video_fps, "video_fps")
        self.stats = ClientStats()
        self._server: dict | None = None  # /v1/health: sampling settings and payload limit
        self._http, self._http_lock, self._health_lock = None, threading.Lock(), threading.Lock()

    def __getstate__(self):  # picklable for TRL/verl workers: the HTTP connection pool is not sent
        return {k: v for k, v in self.__dict__.items() if k not in ("_http", "_http_lock", "_server", "_health_lock")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._server, self._http, self._http_lock, self._health_lock = None, None, threading.Lock(), threading.Lock()

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

    def __call__(self, videos: Sequence[Any], prompts: Sequence[str] | str, *, video_fps=None,
                 **host_kwargs) -> list[float]:
        """One overall score per video, as `FingerReward.__call__`."""
        return [s.overall for s in self.score(videos, prompts, video_fps=video_fps)]

    def score(self, videos: Sequence[Any], prompts: Sequence[str] | str, *, video_fps=None) -> list[VideoScore]:
        """Full results per video, as `FingerReward.score` (same failure handling and `video_fps`)."""
        videos, prompts = pair_videos_prompts(videos, prompts)
        rates = video_rates(video_fps, len(videos))
        names = [describe(v, i) for i, v in enumerate(videos)]
        self.stats = stats = ClientStats(videos=len(videos))
        for attempt in range(2):  # once more after a 409: the server's settings changed under us
            start = time.perf_counter()
            payloads = [self._entry(video, name, rate) for video, name, rate in zip(videos, names, rates)]
            stats.prepare_s += time.perf_counter() - start
            try:
                results = self._send(payloads, prompts, names, stats)
                break
            except _Resample:
                self._server = None
                if attempt:
                    raise ServiceError(f"{self.url}: the service's sampling settings changed twice in one call") from None
        failures = {i: FingerError(r.error) for i, r in enumerate(results) if not r.ok}
        if failures and self.on_error == "raise":
            raise BatchError(failures, results)
        return results

    def health(self) -> dict:
        """The service's `GET /v1/health`: status, sampling settings, payload limit."""
        return self._request("GET", "/v1/health").json()

    # ---- internals ----------------------------------------------------------------------------------

    def _health(self) -> dict:
        """The service's health answer, asked once (and again after a 409)."""
        with self._health_lock:  # one probe however many threads score at once
            if self._server is None:
                self._server = self.health()
            return self._server

    def _sampling(self) -> dict:
        sampling = self._health().get("sampling")
        if not isinstance(sampling, dict):
            raise ServiceError(f"{self.url}/v1/health reports no sampling settings, so in-memory frames cannot be "
                               "sampled here; the service is older than this client (update finger-reward there)")
        return sampling

    def _entry(self, video: Any, name: str, rate: float | None) -> Any:
        """A request entry (a dict) for one video, or its error in its place."""
        try:
            if isinstance(video, (str, os.PathLike)):
                if self.send_paths:
                    return {"path": os.path.abspath(video)}
                with open(video, "rb") as file:  # named, so the service's errors name the file
                    return {"data": base64.b64encode(file.read()).decode(), "name": os.fspath(video)}
            if isinstance(video, (bytes, bytearray, memoryview)):
                return {"data": base64.b64encode(bytes(video)).decode()}
            return {"clip": self._sampled_clip(video, name, rate)}
        except ServiceError:  # the service, not this video: every caller must hear it
            raise
        except OSError as err:
            return VideoError(name, str(err))
        except FingerError as err:
            return err

    def _sampled_clip(self, video: Any, name: str, rate: float | None) -> dict:
        """In-memory frames sampled and resized with the service's settings, as a `serve.wire` clip object."""
        from finger_reward.serve.wire import clip_payload

        sampling = self._sampling()
        if rate is None and not isinstance(video, VideoFrames):
            rate = self.video_fps
        slowfast = sampling.get("slowfast")
        clip = load_video(video, fps=sampling["fps"], max_frames=sampling["max_frames"],
                          max_pixels=sampling["max_pixels"], patch_factor=sampling["patch_factor"],
                          slowfast=None if slowfast is None else SlowFast(**slowfast),
                          value_range=self.value_range, source_fps=rate, name=name)
        return clip_payload(clip, sampling)

    def _send(self, payloads: list, prompts: list[str], names: list[str], stats: ClientStats) -> list[VideoScore]:
        """Every sendable entry in requests under the service's limits; local errors stay in place."""
        results: list[VideoScore | None] = [None] * len(payloads)
        sendable = []
        for i, payload in enumerate(payloads):
            if isinstance(payload, Exception):
                results[i] = VideoScore.failed(names[i], prompts[i], payload)
            else:
                sendable.append(i)
        sizes = {i: len(json.dumps(payloads[i])) + len(json.dumps(prompts[i])) + 4 for i in sendable}
        limit = int(self._health().get("max_payload_bytes") or 64 * 2**20) - _ENVELOPE if sendable else 0
        chunks: list[list[int]] = []
        for i in sendable:
            if sizes[i] > limit:
                results[i] = VideoScore.failed(names[i], prompts[i], PayloadTooLarge(
                    f"video {names[i]}: its request entry is {sizes[i]} bytes, over the service's limit of "
                    f"{limit + _ENVELOPE} bytes per request (raise max_payload_mb on the server)"))
                continue
            last = chunks[-1] if chunks else None
            if (last is None or len(last) >= self.videos_per_request
                    or sum(sizes[j] for j in last) + sizes[i] > limit):
                chunks.append([i])
            else:
                last.append(i)
        start = time.perf_counter()
        with ThreadPoolExecutor(self.concurrency) as pool:
            answers = list(pool.map(lambda c: self._score_chunk(c, payloads, prompts, names, stats.retried), chunks))
        stats.request_s += time.perf_counter() - start
        stats.requests += len(chunks)
        stats.bytes_sent += sum(size for size, _ in answers)
        for chunk, (_, scored) in zip(chunks, answers):
            for i, result in zip(chunk, scored):
                results[i] = result
        return results

    def _score_chunk(self, indices: list[int], payloads: list, prompts: list[str], names: list[str],
                     retried: list[str]) -> tuple[int, list[VideoScore]]:
        """Score some entries in one request: (bytes sent, their results in order)."""
        body = json.dumps({"videos": [payloads[i] for i in indices],
                           "prompts": [prompts[i] for i in indices]}).encode()
        # One id for every attempt of this request: a retry after a dropped answer gets the scored one back.
        response = self._request("POST", "/v1/score", content=body, allow={400, 409, 500},
                                 headers={"Idempotency-Key": uuid.uuid4().hex}, retried=retried)
        if response.status_code == 409:
            raise _Resample()
        try:
            returned = response.json()["results"]
        except (ValueError, KeyError):
            raise ServiceError(f"{self.url}: HTTP {response.status_code}: {response.text[:300]}") from None
        return len(body), [VideoScore.from_dict({**result, "video": names[i]}) for i, result in zip(indices, returned)]

    def _client(self):
        """One connection pool shared by every calling thread (httpx clients are thread-safe)."""
        import httpx

        with self._http_lock:
            if self._http is None:
                headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
                limits = httpx.Limits(max_connections=max(10, 2 * self.concurrency))
                self._http = httpx.Client(base_url=self.url, timeout=self.timeout, headers=headers, limits=limits)
            return self._http

    def _request(self, method: str, path: str, content: bytes | None = None, allow: set[int] = frozenset(),
                 headers: dict[str, str] | None = None, retried: list[str] | None = None):
        """The first answer that is not retried; each retried attempt's problem is appended to `retried`."""
        import httpx

        problem, refused = "no attempt made", 0
        for attempt in range(self.max_retries + 1):
            if attempt and retried is not None:
                retried.append(problem)
            if refused:  # nothing listened: a restart is not seconds away, so ask again only briefly
                time.sleep(_CONNECT_BACKOFF * refused)
            elif attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1) * (1 + 0.25 * random.random()))
            try:
                sent = {**({"Content-Type": "application/json"} if content is not None else {}), **(headers or {})}
                response = self._client().request(method, path, content=content, headers=sent)
            except httpx.ConnectError as err:
                refused += 1
                problem = f"{err}"
                if refused > _CONNECT_RETRIES:
                    break
                continue
            except httpx.TransportError as err:
                problem, refused = f"cannot reach the service: {type(err).__name__}: {err}", 0
                continue
            refused = 0
            if response.status_code in _RETRY_STATUS or _from_a_proxy(response):
                problem = f"HTTP {response.status_code}: {_message(response)}"
                continue
            if response.status_code < 400 or response.status_code in allow:
                return response
            raise ServiceError(f"{self.url}{path}: HTTP {response.status_code}: {_message(response)}")
        if refused:
            raise ServiceError(f"{self.url}{path}: cannot reach the service: connection refused or no such host "
                               f"({problem}); expected a running 'finger-reward serve' there")
        raise ServiceError(f"{self.url}{path}: gave up after {self.max_retries + 1} attempts; last: {problem}")


_CONNECT_RETRIES = 2  # tries after a refused connection, _CONNECT_BACKOFF s apart and growing: well under 2 s
_CONNECT_BACKOFF = 0.1


class _Resample(Exception):
    """The service answered 409: it samples with other settings than the client used."""


def _from_a_proxy(response) -> bool:
    """A 5xx that is not the service's JSON came from in front of it (Ray Serve answers a plain 500 when the replica
    holding the request dies): the request may be sent again, its Idempotency-Key keeps it from being scored twice."""
    return response.status_code >= 500 and not response.headers.get("content-type", "").startswith("application/json")


def _message(response) -> str:
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return response.text[:300]
