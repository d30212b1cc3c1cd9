"""The HTTP API of the reward service, independent of the server that runs it.

    POST /v1/score   {"prompts": [...] or "one prompt", "videos": [...], "video_fps": optional}
                     ->  {"results": [VideoScore, ...]}   (each with "sampled": frames, fps, size the model saw)
    GET  /v1/health  ->  {"status": "ok", "sampling": {fps, max_frames, max_pixels, patch_factor, slowfast},
                          "max_payload_bytes": ...}
    GET  /metrics    ->  Prometheus text

A video in a request is one of:

- base64 of an encoded file (a string, or {"data": ...}); it carries its own frame rate;
- {"clip": {...}}: frames the client already sampled and resized with the server's "sampling"
  (`clip_payload`), losslessly compressed; used as they are, so the model sees exactly the frames
  in-process scoring would (409 if the client sampled with other settings: re-read /v1/health);
- base64 of a uint8 .npy array (T, H, W, C) as {"npy": ..., "video_fps": its frame rate};
- only when the server allows a directory, {"path": ...} inside it.

"video_fps" (top level: one rate, or one per video, null where unknown; or per entry) is the
frame rate of in-memory frames ("npy"), as `FingerReward.score(video_fps=)`. Errors are JSON with
a status code: 400 for a bad field or video (naming which; the other videos' results are still in
"results"), 401 without the token, 403 for a path outside the allowed directory, 409 for a clip
sampled with other settings, 413 over the payload limit, 429 when the queue is full. The local
server (local.py) and the Ray Serve deployment (ray_app.py) both hand their requests to `ScoreAPI`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import json
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from finger_reward.errors import FingerError
from finger_reward.results import json_safe
from finger_reward.serve.batcher import QueueFull
from finger_reward.serve.telemetry import Telemetry

ScoreMany = Callable[[list, list[str], list[str], list], Awaitable[list]]  # videos, prompts, names, video_fps
SAMPLING_KEYS = ("fps", "max_frames", "max_pixels", "patch_factor", "slowfast")


@dataclass
class Reply:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


class RequestError(FingerError):
    """A request the service refuses, with the HTTP status to answer."""

    def __init__(self, status: int, message: str):
        self.status = status
        super().__init__(message)


def _json(status: int, payload: dict, headers: dict | None = None) -> Reply:
    return Reply(status, json.dumps(json_safe(payload), allow_nan=False).encode(), headers=headers or {})


def error_reply(status: int, message: str, headers: dict | None = None) -> Reply:
    return _json(status, {"error": {"message": message, "status": status}}, headers)


class ScoreAPI:
    """Routes requests, checks the token and payload size, decodes videos, and scores them."""

    def __init__(self, score_many: ScoreMany, *, token: str | None = None, allow_path: str | None = None,
                 max_payload_mb: float = 256.0, telemetry: Telemetry | None = None, sampling: dict | None = None):
        self.score_many = score_many
        self.sampling = None if sampling is None else {k: sampling[k] for k in SAMPLING_KEYS}
        self.token = token
        self.allow_path = os.path.realpath(allow_path) if allow_path else None
        self.max_payload = int(max_payload_mb * 2**20)
        self.telemetry = telemetry or Telemetry()

    async def __call__(self, method: str, path: str, headers: Mapping[str, str], read_body: Callable[[], Awaitable[bytes]]) -> Reply:
        start = time.perf_counter()
        try:
            reply = await self._route(method, path, headers, read_body)
        except RequestError as err:
            reply = error_reply(err.status, str(err))
        except Exception as err:  # the service keeps serving whatever one request does
            reply = error_reply(500, f"internal error: {type(err).__name__}: {err}")
        if path not in ("/metrics", "/v1/health"):  # probes would swamp the scoring figures
            self.telemetry.request(reply.status, time.perf_counter() - start)
        return reply

    async def _route(self, method, path, headers, read_body) -> Reply:
        if path == "/v1/health" and method == "GET":
            return _json(200, {"status": "ok", "sampling": self.sampling, "max_payload_bytes": self.max_payload})
        if path == "/metrics" and method == "GET":
            return Reply(200, self.telemetry.render().encode(), "text/plain; version=0.0.4")
        if path != "/v1/score":
            return error_reply(404, f"no route {method} {path}; try POST /v1/score, GET /v1/health or GET /metrics")
        if method != "POST":
            return error_reply(405, "use POST for /v1/score")
        self._check_token(headers)
        length = headers.get("content-length")
        if length and length.isdigit() and int(length) > self.max_payload:
            raise RequestError(413, f"payload of {int(length)} bytes is over the limit of {self.max_payload}")
        body = await read_body()
        if len(body) > self.max_payload:
            raise RequestError(413, f"payload of {len(body)} bytes is over the limit of {self.max_payload}")
        videos, prompts, names, rates = await asyncio.to_thread(self._parse, body)
        try:
            outcomes = await self.score_many(videos, prompts, names, rates)
        except QueueFull as err:
            return error_reply(429, str(err), headers={"Retry-After": "1"})
        return _results_reply(outcomes, names, prompts)

    def _check_token(self, headers: Mapping[str, str]) -> None:
        if self.token is None:
            return
        given = headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
            raise RequestError(401, "missing or wrong token: send 'Authorization: Bearer <token>'")

    def _parse(self, body: bytes) -> tuple[list, list[str], list[str], list]:
        try:
            request = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RequestError(400, f"body is not valid JSON: {err}") from None
        if not isinstance(request, dict) or "videos" not in request or "prompts" not in request:
            raise RequestError(400, 'body must be an object with "videos" and "prompts"')
        videos, prompts = request["videos"], request["prompts"]
        if not isinstance(videos, list) or not videos:
            raise RequestError(400, '"videos" must be a non-empty list')
        prompts = [prompts] * len(videos) if isinstance(prompts, str) else prompts
        if not isinstance(prompts, list) or len(prompts) != len(videos) or not all(isinstance(p, str) for p in prompts):
            raise RequestError(400, f'"prompts" must be one string or a list of {len(videos)} strings (one per video)')
        rates = _request_rates(request.get("video_fps"), videos)
        names = [_entry_name(v, i) for i, v in enumerate(videos)]
        decoded = [self._video(v, i, names[i]) for i, v in enumerate(videos)]
        names = [v if isinstance(v, str) else names[i] for i, v in enumerate(decoded)]
        return decoded, prompts, names, rates

    def _video(self, item, index: int, name: str):
        """bytes of an encoded file, a sampled `Clip`, a uint8 array, or an allowed path string."""
        if isinstance(item, str):
            item = {"data": item}
        if not isinstance(item, dict) or len({"data", "npy", "path", "clip"} & set(item)) != 1:
            raise RequestError(400, f'video #{index}: expected a base64 string or an object with one of '
                                    '"data", "clip", "npy", "path"')
        if "path" in item:
            return self._allowed_path(item["path"], index)
        if "clip" in item:
            return self._clip(item["clip"], index, name)
        raw = _b64(item.get("data") or item.get("npy"), index)
        if "data" in item:
            return raw
        try:
            array = np.load(io.BytesIO(raw), allow_pickle=False)
        except (ValueError, OSError) as err:
            raise RequestError(400, f"video #{index}: \"npy\" is not a .npy array: {err}") from None
        return array

    def _allowed_path(self, path, index: int) -> str:
        if self.allow_path is None:
            raise RequestError(403, f"video #{index}: paths are not accepted by this server (start it with --allow-path DIR)")
        if not isinstance(path, str) or not path:
            raise RequestError(400, f'video #{index}: "path" must be a non-empty string')
        real = os.path.realpath(os.path.join(self.allow_path, path))
        if os.path.commonpath([real, self.allow_path]) != self.allow_path:
            raise RequestError(403, f"video #{index}: path {path!r} is outside the allowed directory")
        return real


    def _clip(self, payload, index: int, name: str):
        from finger_reward.serve.wire import WireError, clip_from_payload

        if not isinstance(payload, dict):
            raise RequestError(400, f'video #{index}: "clip" must be an object (see finger_reward.serve.wire)')
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


def _results_reply(outcomes: list, names: list[str], prompts: list[str]) -> Reply:
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
        return _json(200, {"results": results})
    status = 500 if internal else 400
    message = f"{len(failures)} of {len(outcomes)} video(s) could not be scored"
    return _json(status, {"results": results, "error": {"message": message, "status": status, "failures": failures}})
