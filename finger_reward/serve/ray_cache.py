"""One Idempotency-Key result cache for all Ray Serve replicas, so a retry that lands on another replica is not scored again.

Each replica keeps its own `ResultCache` (a retry that arrives while the first attempt still scores on the same
replica waits for it), and behind it asks the application's `ResultStore`: a one-replica Serve deployment (no CPU
reserved) holding finished answers for `ttl_s` seconds, at most `max_entries` of them and `max_bytes` of JSON.
A replica killed after scoring but before answering has stored its answer, and the client's retry, sent to a
surviving replica, gets it from there. A replica killed while scoring has stored nothing: the retry is scored
once, elsewhere. Waiting for an attempt still in progress stays per replica: a retry that reaches another
replica while the first one is alive and still scoring is scored there too (the store counts it in `duplicates`).
The store is a cache: when it cannot be reached in `timeout_s`, a replica scores and answers
without it (and logs why). Ray is not imported here; the deployment is built by `ray_app`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable

from finger_reward.results import json_safe
from finger_reward.serve.api import ResultCache, reused_key

logger = logging.getLogger(__name__)

HIT, MISS, CONFLICT = "hit", "miss", "conflict"


class ResultStore:
    """Finished answers (JSON bytes) by idempotency key, oldest first out; counts what happened to them.

    `put` keeps the first answer for a key; another `put` of the same key counts as `duplicates` (the request
    was scored twice), which a fault drill checks is zero."""

    def __init__(self, ttl_s: float = 300.0, max_entries: int = 4096, max_bytes: int = 256 * 2**20):
        if ttl_s <= 0 or max_entries < 1 or max_bytes < 1:
            raise ValueError(f"ResultStore needs ttl_s > 0, max_entries >= 1 and max_bytes >= 1; got {ttl_s}, "
                             f"{max_entries}, {max_bytes}")
        self.ttl_s, self.max_entries, self.max_bytes = ttl_s, max_entries, max_bytes
        self._entries: OrderedDict[str, tuple[float, bytes, bytes]] = OrderedDict()  # key -> (born, digest, answer)
        self._bytes = 0
        self.counts: Counter = Counter()

    async def get(self, key: str, digest: bytes) -> tuple[str, bytes | None]:
        """(HIT, answer), (MISS, None), or (CONFLICT, None) when the key was stored for another body."""
        self._expire()
        entry = self._entries.get(key)
        found = MISS if entry is None else HIT if entry[1] == digest else CONFLICT
        self.counts[found] += 1
        return found, entry[2] if found == HIT else None

    async def put(self, key: str, digest: bytes, answer: bytes) -> bool:
        """Keep `answer` for `key`; False (and counted) when the key already has one."""
        self._expire()
        if key in self._entries:
            self.counts["duplicates"] += 1
            return False
        if len(answer) > self.max_bytes:
            self.counts["too_large"] += 1
            return False
        self._entries[key] = (time.monotonic(), digest, answer)
        self._bytes += len(answer)
        self.counts["stored"] += 1
        self._expire()
        return True

    async def stats(self) -> dict:
        """Entries and bytes held now, and the counts of hits, misses, conflicts, stored, duplicates, evicted."""
        self._expire()
        return {"entries": len(self._entries), "bytes": self._bytes, **self.counts}

    def _expire(self) -> None:
        now = time.monotonic()
        while self._entries:
            key, (born, _, answer) = next(iter(self._entries.items()))
            if (now - born < self.ttl_s and len(self._entries) <= self.max_entries
                    and self._bytes <= self.max_bytes):
                break
            del self._entries[key]
            self._bytes -= len(answer)
            self.counts["evicted" if now - born < self.ttl_s else "expired"] += 1


class SharedResults:
    """A replica's result cache: its own `ResultCache` first, then the application's `ResultStore` (a Serve handle).

    Drop-in for `ScoreAPI.results` (the same `get_or_run` and `hits`)."""

    def __init__(self, local: ResultCache, store, timeout_s: float = 5.0):
        self.local, self.store, self.timeout_s = local, store, timeout_s
        self.shared_hits = 0

    @property
    def hits(self) -> int:
        return self.local.hits + self.shared_hits

    async def get_or_run(self, key: str, digest: bytes, run: Callable[[], Awaitable]):
        return await self.local.get_or_run(key, digest, lambda: self._shared_or_run(key, digest, run))

    async def _shared_or_run(self, key: str, digest: bytes, run: Callable[[], Awaitable]):
        found, answer = await self._call("get", key, digest) or (MISS, None)
        if found == CONFLICT:
            raise reused_key(key)
        if found == HIT:
            self.shared_hits += 1
            status, payload, videos = json.loads(answer)
            return status, payload, videos
        outcome = await run()  # a refusal (RequestError) raises here and is not stored
        await self._call("put", key, digest, json.dumps(json_safe(list(outcome)), allow_nan=False).encode())
        return outcome

    async def _call(self, method: str, *args):
        """The store's answer, or None when it cannot be reached in time: the request goes on without it."""
        async def call():
            return await getattr(self.store, method).remote(*args)

        try:
            return await asyncio.wait_for(call(), self.timeout_s)
        except Exception as err:  # noqa: BLE001 - a cache outage must not fail the request
            logger.warning("shared result store: %s failed (%s: %s); this request is %s without it", method,
                           type(err).__name__, err, "scored" if method == "get" else "answered")
            return None
