"""The HTTP API of the reward service: one FastAPI app, run by uvicorn (local.py) or as Ray Serve's ingress (ray_app.py).

    POST /v1/score   {"prompts": [...] or "one prompt", "videos": [...], "video_fps": optional}
                     ->  {"results": [VideoScore, ...]}   (each with "sampled": frames, fps, size the model saw)
    GET  /v1/health  ->  {"status": "ok", "sampling": {fps, max_frames, max_pixels, patch_factor, slowfast},
                          "max_payload_bytes": ...}
    GET  /metrics    ->  Prometheus text
    GET  /docs, /openapi.json  ->  the schema (`serve.schema`)

A video in a request is one of:

- base64 of an encoded file (a string, or {"data": ...}); it carries its own frame rate;
- {"clip": {...}}: frames the client already sampled and resized with the server's "sampling"
  (`clip_payload`), losslessly compressed; used as they are, so the model sees exactly the frames
  in-process scoring would (409 if the client sampled with other settings: re-read /v1/health);
- base64 of a uint8 .npy array (T, H, W, C) as {"npy": ..., "video_fps": its frame rate};
- only when the server allows a directory, {"path": ...} inside it.

"video_fps" (top level: one rate, or one per video, null where unknown; or per entry) is the
frame rate of in-memory frames ("npy"), as `FingerReward.score(video_fps=)`. Errors are JSON
({"error": {"message", "status"}}) with a status code: 400 for a bad field or video (naming which;
the other videos' results are still in "results"), 401 without the token, 403 for a path outside
the allowed directory, 409 for a clip sampled with other settings, 413 over the payload limit,
429 (or 503 from Ray Serve) with Retry-After when the queue is full. The token guards every route
but /v1/health.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import io
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import numpy as np

from finger_reward.errors import FingerError
from finger_reward.results import json_safe
from finger_reward.serve.batcher import QueueFull
from finger_reward.serve.telemetry import Telemetry

ScoreMany = Callable[[list, list[str], list[str], list], Awaitable[list]]  # videos, prompts, names, video_fps
SAMPLING_KEYS = ("fps", "max_frames", "max_pixels", "patch_factor", "slowfast")
IDEMPOTENCY_HEADER = "Idempotency-Key"
access_log = logging.getLogger("finger_reward.serve.access")


class RequestError(FingerError):
    """A request the service refuses, with the HTTP status to answer (and headers such as Retry-After)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        self.status, self.headers = status, headers or {}
        super().__init__(message)


class ScoreAPI:
    """What the routes do, apart from HTTP: the token, the payload limit, decoding videos, scoring, the retry cache."""

    def __init__(self, score_many: ScoreMany, *, token: str | None = None, allow_path: str | None = None,
                 max_payload_mb: float = 256.0, telemetry: Telemetry | None = None, sampling: dict | None = None,
                 result_ttl_s: float = 300.0, max_cached_results: int = 1024):
        self.score_many = score_many
        self.sampling = None if sampling is None else {k: sampling[k] for k in SAMPLING_KEYS}
        self.token = token
        self.allow_path = os.path.realpath(allow_path) if allow_path else None
        self.max_payload = int(max_payload_mb * 2**20)
        self.telemetry = telemetry or Telemetry()
        self.results = ResultCache(result_ttl_s, max_cached_results)

    def check_token(self, authorization: str | None) -> None:
        if self.token is None:
            return
        if not hmac.compare_digest((authorization or "").encode(), f"Bearer {self.token}".encode()):
            raise RequestError(401, "missing or wrong token: send 'Authorization: Bearer <token>'")

    def health(self) -> dict:
        return {"status": "ok", "sampling": self.sampling, "max_payload_bytes": self.max_payload}

    async def read_body(self, request) -> bytes:
        """The request body, refused with 413 as soon as it is known to be over the limit."""
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > self.max_payload:
            raise RequestError(413, f"payload of {int(length)} bytes is over the limit of {self.max_payload}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_payload:
                raise RequestError(413, f"payload of over {size} bytes is over the limit of {self.max_payload}")
            chunks.append(chunk)
        return b"".join(chunks)

    async def score(self, body: bytes, key: str | None) -> tuple[int, dict, int]:
        """(status, JSON payload, videos) for a score request; a repeated `key` gets the first answer again."""
        if not key:
            return await self._score(body)
        return await self.results.get_or_run(key, hashlib.sha256(body).digest(), lambda: self._score(body))

    async def _score(self, body: bytes) -> tuple[int, dict, int]:
        videos, prompts, names, rates = await asyncio.to_thread(self.parse, body)
        try:
            outcomes = await self.score_many(videos, prompts, names, rates)
        except QueueFull as err:
            raise RequestError(429, str(err), {"Retry-After": "1"}) from None
        status, payload = results_payload(outcomes, names, prompts)
        return status, payload, len(videos)

    def parse(self, body: bytes) -> tuple[list, list[str], list[str], list]:
        """The request's decoded videos, prompts, names and frame rates; a `RequestError` names what is wrong."""
        from pydantic import ValidationError

        from finger_reward.serve.schema import ScoreRequest

        try:
            request = ScoreRequest.model_validate_json(body)
        except ValidationError as err:
            raise RequestError(400, _validation_message(err)) from None
        raw = json.loads(body)  # the entries as sent: decoding reads their own keys
        videos = raw["videos"]
        prompts = [request.prompts] * len(videos) if isinstance(request.prompts, str) else request.prompts
        rates = _request_rates(raw.get("video_fps"), videos)
        names = [_entry_name(v, i) for i, v in enumerate(videos)]
        decoded = [self._video(v, i, names[i]) for i, v in enumerate(videos)]
        names = [v if isinstance(v, str) else names[i] for i, v in enumerate(decoded)]
        return decoded, prompts, names, rates

    def _video(self, item, index: int, name: str):
        """bytes of an encoded file, a sampled `Clip`, a uint8 array, or an allowed path string."""
        if isinstance(item, str):
            item = {"data": item}
        if "path" in item:
            return self._allowed_path(item["path"], index)
        if "clip" in item:
            return self._clip(item["clip"], index, name)
        raw = _b64(item.get("data") or item.get("npy"), index)
        if "data" in item:
            return raw
        try:
            return np.load(io.BytesIO(raw), allow_pickle=False)
        except (ValueError, OSError) as err:
            raise RequestError(400, f"video #{index}: \"npy\" is not a .npy array: {err}") from None

    def _allowed_path(self, path: str, index: int) -> str:
        if self.allow_path is None:
            raise RequestError(403, f"video #{index}: paths are not accepted by this server (start it with --allow-path DIR)")
        if not path:
            raise RequestError(400, f'video #{index}: "path" must be a non-empty string')
        real = os.path.realpath(os.path.join(self.allow_path, path))
        if os.path.commonpath([real, self.allow_path]) != self.allow_path:
            raise RequestError(403, f"video #{index}: path {path!r} is outside the allowed directory")
        return real

    def _clip(self, payload: dict, index: int, name: str):
        from finger_reward.serve.wire import WireError, clip_from_payload

        if self.sampling is None:
            raise RequestError(400, f"video #{index}: this server takes no pre-sampled clips; send the file or frames")
        sent = payload.get("sampling")
        if sent != self.sampling:
            raise RequestError(409, f"video #{index}: sampled with {sent}, but this server samples with "
                                    f"{self.sampling}; re-read GET /v1/health and sample again")
        try:
            return clip_from_payload(payload, name)
        except WireError as err:
            raise RequestError(400, f"video #{index}: {err}") from None


class ResultCache:
    """Answers of scored requests by idempotency key, for `ttl_s` seconds: a client's retry is not scored twice.

    A retry that arrives while the first attempt is still scoring waits for that attempt's answer. Refusals
    (`RequestError`: 429, 413, ...) are not kept, so the retry is tried afresh."""

    def __init__(self, ttl_s: float, max_entries: int):
        self.ttl_s, self.max_entries = ttl_s, max_entries
        self._entries: OrderedDict[str, tuple[float, bytes, asyncio.Task]] = OrderedDict()
        self.hits = 0

    async def get_or_run(self, key: str, digest: bytes, run: Callable[[], Awaitable]):
        self._expire()
        entry = self._entries.get(key)
        if entry is not None:
            if entry[1] != digest:
                raise reused_key(key)
            self.hits += 1
            task = entry[2]
        else:
            task = asyncio.ensure_future(run())  # scoring goes on if this request's connection drops
            self._entries[key] = (time.monotonic(), digest, task)
            task.add_done_callback(lambda t: self._forget_refusal(key, t))
        return await asyncio.shield(task)

    def _forget_refusal(self, key: str, task: asyncio.Task) -> None:
        if task.cancelled() or task.exception() is not None:
            entry = self._entries.get(key)
            if entry is not None and entry[2] is task:
                del self._entries[key]

    def _expire(self) -> None:
        now = time.monotonic()
        while self._entries:
            key, (born, _, task) = next(iter(self._entries.items()))
            if (now - born < self.ttl_s and len(self._entries) <= self.max_entries) or not task.done():
                break
            del self._entries[key]


def reused_key(key: str) -> RequestError:
    """The 422 for an idempotency key sent again with another body (the local cache's and the shared store's)."""
    return RequestError(422, f"{IDEMPOTENCY_HEADER} {key!r} was already used for a different body")


def _validation_message(err) -> str:
    """The first problem of a `ScoreRequest` validation, in the service's words (naming the video)."""
    errors = err.errors()
    first = next((e for e in errors if e["type"] == "missing" and len(e["loc"]) == 1), errors[0])
    kind, loc = first["type"], first["loc"]
    if kind == "json_invalid":
        return f"body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}"
    if kind in ("model_type", "missing") and len(loc) <= 1:
        return 'body must be an object with "videos" and "prompts"'
    if loc[:1] == ("videos",) and len(loc) >= 2 and isinstance(loc[1], int):
        return (f'video #{loc[1]}: expected a base64 string or an object with one of "data", "clip", "npy", "path" '
                '(and optional "name", "video_fps")')
    if loc[:1] == ("videos",) and kind != "value_error":
        return '"videos" must be a non-empty list'
    if loc[:1] == ("prompts",):
        return '"prompts" must be one string or a list of strings (one per video)'
    if loc[:1] == ("video_fps",):
        return f'"video_fps": must be one frame rate or a list (one per video, null where unknown): {first["msg"]}'
    return first["msg"].removeprefix("Value error, ")


def _entry_name(item, index: int) -> str:
    name = item.get("name") if isinstance(item, dict) else None
    return f"#{index} ({name})" if isinstance(name, str) and name else f"#{index}"


def _request_rates(value, videos: list) -> list:
    """Each video's in-memory frame rate: its entry's "video_fps" (or "fps"), else the request's."""
    from finger_reward.reward import video_rates

    try:
        rates = video_rates(value, len(videos))
    except ValueError as err:
        raise RequestError(400, f'"video_fps": {err}') from None
    for i, item in enumerate(videos):
        own = item.get("video_fps", item.get("fps")) if isinstance(item, dict) else None
        if own is not None:
            try:
                rates[i] = video_rates(own, 1)[0]
            except ValueError as err:
                raise RequestError(400, f"video #{i}: {err}") from None
    return rates


def _b64(text, index: int) -> bytes:
    if not isinstance(text, str):
        raise RequestError(400, f"video #{index}: expected base64 text")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        hint = ""
        if len(text) < 1024 and text.isprintable() and ("/" in text or "\\" in text or "." in text):
            hint = (f'; {text!r} looks like a file path: send {{"path": {json.dumps(text)}}} (a server started with '
                    "--allow-path DIR) or the file's bytes in base64")
        raise RequestError(400, f"video #{index}: not valid base64{hint}") from None


def results_payload(outcomes: list, names: list[str], prompts: list[str]) -> tuple[int, dict]:
    """(status, body) for the outcomes of one request: 200, or 400/500 with the failures by index."""
    from finger_reward.results import VideoScore

    results, failures, internal = [], {}, False
    for i, outcome in enumerate(outcomes):
        if isinstance(outcome, Exception):
            failures[str(i)] = str(outcome)
            internal = internal or not isinstance(outcome, FingerError)
            results.append(VideoScore.failed(names[i], prompts[i], outcome).to_dict())
        else:
            results.append(outcome.to_dict())
    if not failures:
        return 200, {"results": results}
    status = 500 if internal else 400
    message = f"{len(failures)} of {len(outcomes)} video(s) could not be scored"
    return status, {"results": results, "error": {"message": message, "status": status, "failures": failures}}


def json_response(status: int, payload: dict, headers: dict | None = None):
    """Strict JSON (NaN as null), as every client parses it."""
    from starlette.responses import Response

    body = json.dumps(json_safe(payload), allow_nan=False).encode()
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def error_response(status: int, message: str, headers: dict | None = None):
    return json_response(status, {"error": {"message": message, "status": status}}, headers)
