"""POSTs to OpenAI-compatible chat-completions endpoints, with retries: shared by question generation and scoring.

Timeouts, dropped connections, 408/409/429 and 5xx answers are retried with exponential back-off
(honouring Retry-After); any other 4xx answer fails at once, as asking again cannot help.
Sync (`post_json`, for thread pools) and async (`apost_json`, for one asyncio connection pool)
share the same policy.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from dataclasses import dataclass

RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
DEFAULT_BASE_URL = "https://api.openai.com/v1"


class HTTPStatusError(RuntimeError):
    """An HTTP error answer; `status` is its code, `retry_after` the server's Retry-After in seconds, if any."""

    def __init__(self, response):
        self.status = response.status_code
        header = response.headers.get("retry-after")
        self.retry_after = float(header) if header and header.replace(".", "", 1).isdigit() else None
        super().__init__(f"HTTP {response.status_code} from {response.request.url}: {response.text[:200]}")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry: `max_retries` after the first try, delays from `backoff` seconds doubling."""

    max_retries: int = 3
    backoff: float = 1.0
    max_delay: float = 60.0

    def delay(self, retry: int, error: Exception) -> float:
        """Seconds to wait before retry number `retry` (1-based): Retry-After if given, else jittered back-off."""
        after = getattr(error, "retry_after", None)
        if after is None:
            after = self.backoff * 2 ** (retry - 1) * (1 + 0.25 * random.random())
        return min(after, self.max_delay)


def resolve_endpoint(base_url: str | None, api_key: str | None) -> tuple[str, str | None]:
    """`base_url` and `api_key`, defaulting to $OPENAI_BASE_URL (else OpenAI's) and $OPENAI_API_KEY."""
    base = (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
    return base, api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _read(response):
    """The JSON body of a success; a retryable error is returned, a final one raised."""
    if response.status_code in RETRY_STATUS:
        return HTTPStatusError(response)
    if response.status_code >= 400:
        raise HTTPStatusError(response)
    try:
        return response.json()
    except ValueError:
        raise ValueError(f"malformed JSON from {response.request.url}: {response.text[:200]!r}") from None


class RetriesExhausted(RuntimeError):
    """Every attempt failed with a retryable error; the message is the last one's, `status` its HTTP code if any."""

    def __init__(self, error: Exception, attempts: int):
        self.status = getattr(error, "status", None)
        super().__init__(f"{error} (gave up after {attempts} attempt(s))")


def _gave_up(error: Exception, policy: RetryPolicy) -> Exception:
    return RetriesExhausted(error, policy.max_retries + 1)


def post_json(client, url: str, body: dict, *, headers: dict | None = None, policy: RetryPolicy = RetryPolicy()) -> dict:
    """POST `body` with an `httpx.Client`, retrying per `policy`; returns the JSON answer or raises the last error."""
    import httpx

    error: Exception = RuntimeError("no request made")
    for retry in range(policy.max_retries + 1):
        if retry:
            time.sleep(policy.delay(retry, error))
        try:
            result = _read(client.post(url, json=body, headers=headers or {}))
        except httpx.HTTPError as err:  # timeouts and connection errors
            result = err
        if not isinstance(result, Exception):
            return result
        error = result
    raise _gave_up(error, policy) from error


async def apost_json(client, url: str, body: dict, *, headers: dict | None = None, policy: RetryPolicy = RetryPolicy()) -> dict:
    """`post_json` for an `httpx.AsyncClient`."""
    import httpx

    error: Exception = RuntimeError("no request made")
    for retry in range(policy.max_retries + 1):
        if retry:
            await asyncio.sleep(policy.delay(retry, error))
        try:
            result = _read(await client.post(url, json=body, headers=headers or {}))
        except httpx.HTTPError as err:
            result = err
        if not isinstance(result, Exception):
            return result
        error = result
    raise _gave_up(error, policy) from error
