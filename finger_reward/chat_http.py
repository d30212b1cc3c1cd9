"""POSTs to OpenAI-compatible chat-completions endpoints, with retries: shared by question generation and scoring.

Timeouts, dropped connections, 408/429 ("later", not "wrong") and 500/502/503/504 answers are
retried with exponential back-off (honouring Retry-After); any other 4xx answer fails at once, as
asking again cannot help. A 500 whose body repeats the previous attempt's word for word is a
deterministic error of the request (vLLM answers a 1-frame video with 500 "division by zero"
every time), so it fails at its second attempt instead of using every retry. Sync (`post_json`,
for thread pools) and async (`apost_json`, for one asyncio connection pool) share the same policy.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from dataclasses import dataclass

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
DEFAULT_BASE_URL = "https://api.openai.com/v1"


class HTTPStatusError(RuntimeError):
    """An HTTP error answer; `status` is its code, `body` its text, `retry_after` the server's Retry-After in seconds."""

    def __init__(self, response):
        self.status, self.body = response.status_code, response.text
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


def repeated_error(error: Exception, previous: Exception | None) -> bool:
    """Whether `error` is a 500 with the same body as the attempt before: deterministic, so not worth retrying."""
    return (isinstance(error, HTTPStatusError) and error.status == 500 and isinstance(previous, HTTPStatusError)
            and previous.status == 500 and error.body == previous.body)


class DeterministicError(RuntimeError):
    """The server answered 500 with the same body twice in a row: an error of the request, not of the moment."""

    def __init__(self, error: Exception, attempts: int):
        self.status = 500
        super().__init__(f"{error} (the same HTTP 500 twice in a row: an error of this request, not a transient "
                         f"one, so not retried after {attempts} attempts)")


def post_json(client, url: str, body: dict, *, headers: dict | None = None, policy: RetryPolicy = RetryPolicy()) -> dict:
    """POST `body` with an `httpx.Client`, retrying per `policy`; returns the JSON answer or raises the last error."""
    import httpx

    error: Exception | None = None
    for retry in range(policy.max_retries + 1):
        if retry:
            time.sleep(policy.delay(retry, error))
        try:
            result = _read(client.post(url, json=body, headers=headers or {}))
        except httpx.HTTPError as err:  # timeouts and connection errors
            result = err
        if not isinstance(result, Exception):
            return result
        if repeated_error(result, error):
            raise DeterministicError(result, retry + 1) from result
        error = result
    raise RetriesExhausted(error, policy.max_retries + 1) from error


async def apost_json(client, url: str, body: dict, *, headers: dict | None = None, policy: RetryPolicy = RetryPolicy()) -> dict:
    """`post_json` for an `httpx.AsyncClient`."""
    import httpx

    error: Exception | None = None
    for retry in range(policy.max_retries + 1):
        if retry:
            await asyncio.sleep(policy.delay(retry, error))
        try:
            result = _read(await client.post(url, json=body, headers=headers or {}))
        except httpx.HTTPError as err:
            result = err
        if not isinstance(result, Exception):
            return result
        if repeated_error(result, error):
            raise DeterministicError(result, retry + 1) from result
        error = result
    raise RetriesExhausted(error, policy.max_retries + 1) from error
