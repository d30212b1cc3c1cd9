"""An in-process dynamic batcher: many callers, one model thread, large batches.

Callers `submit` a video and get a `concurrent.futures.Future`. Videos are decoded in a small
thread pool (so the model never waits on the CPU), then a single model thread takes them in
batches of up to `max_batch_size` videos or `max_batch_tokens` tokens, waiting at most
`max_wait_ms` for a batch to fill. At most `max_queue` videos are in flight; beyond that,
`submit` blocks or raises `QueueFull` (back-pressure). A bad video fails its own future only.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from finger_reward.errors import FingerError

logger = logging.getLogger(__name__)


class QueueFull(FingerError):
    """The batcher holds `max_queue` videos already; try again later (HTTP 429)."""


def default_prepare_workers(reward) -> int:
    """Decoding threads: several beside a GPU model; one beside a CPU model, which uses every core itself."""
    device = getattr(getattr(reward, "engine", None), "device", None)
    if device is None or device.type == "cpu":
        return 1
    return max(1, min(8, (os.cpu_count() or 2) - 1))


class Batcher:
    def __init__(
        self,
        reward,
        *,
        max_batch_size: int = 16,
        max_batch_tokens: int | None = None,
        max_wait_ms: float = 10.0,
        max_queue: int = 256,
        prepare_workers: int | None = None,
        telemetry=None,
    ):
        if max_batch_size < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("need max_batch_size >= 1, max_queue >= 1 and max_wait_ms >= 0")
        self.reward = reward
        self.max_batch_size, self.max_batch_tokens = max_batch_size, max_batch_tokens
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue
        self.telemetry = telemetry  # a `serve.telemetry.Telemetry` for a server's metrics; None: none kept
        self._room = threading.Condition()
        self._ready: queue.Queue = queue.Queue()
        workers = prepare_workers or default_prepare_workers(reward)
        self._prepare = ThreadPoolExecutor(workers, thread_name_prefix="finger-prepare")
        self._closed = threading.Event()
        self._in_flight = 0
        self._thread = threading.Thread(target=self._loop, name="finger-batcher", daemon=True)
        self._thread.start()

    def submit(self, video: Any, prompt: str, *, name: str | None = None, video_fps: float | None = None,
               block: bool = True, timeout: float | None = None) -> Future:
        """Queue one video; the future resolves to its `VideoScore` or raises its own error.

        `video_fps`: an in-memory video's frame rate (see `FingerReward.score`)."""
        return self.submit_many([video], [prompt], names=[name or "#0"], video_fps=video_fps, block=block,
                                timeout=timeout)[0]

    def submit_many(self, videos: list, prompts: list[str], *, names: list[str] | None = None, video_fps=None,
                    block: bool = True, timeout: float | None = None) -> list[Future]:
        """Queue several videos at once: all get room in the queue, or none does (`QueueFull`).

        `video_fps`: one frame rate, or one per video (None where unknown), for in-memory videos."""
        from finger_reward.reward import video_rates

        rates = video_rates(video_fps, len(videos))
        if self._closed.is_set():
            raise RuntimeError("the batcher is closed")
        if len(videos) > self.max_queue:
            raise QueueFull(f"{len(videos)} videos are more than the whole queue ({self.max_queue})")
        with self._room:
            has_room = lambda: self._in_flight + len(videos) <= self.max_queue  # noqa: E731
            if not (self._room.wait_for(has_room, timeout) if block else has_room()):
                raise QueueFull(f"the queue holds {self._in_flight} of {self.max_queue} videos; retry later")
            self._in_flight += len(videos)
            self._gauge()
        futures = []
        for i, (video, prompt) in enumerate(zip(videos, prompts)):
            future: Future = Future()
            future.add_done_callback(self._release)
            self._prepare.submit(self._prepare_one, video, prompt, names[i] if names else f"#{i}", rates[i], future)
            futures.append(future)
        return futures

    def close(self) -> None:
        """Finish what is queued, then stop the threads."""
        self._closed.set()
        self._prepare.shutdown(wait=True)
        self._ready.put(None)
        self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- internals ----------------------------------------------------------------------------------

    def _prepare_one(self, video, prompt, name, rate, future: Future) -> None:
        try:
            job = self.reward.prepare([video], [prompt], [name], video_fps=[rate])[0]
        except Exception as err:  # e.g. a question generator that raised
            job = err
        if isinstance(job, Exception):
            if self.telemetry is not None:
                self.telemetry.video_failed()
            future.set_exception(job)
        else:
            self._ready.put((job, future))

    def _loop(self) -> None:
        carry = None
        while True:
            item = carry or self._ready.get()
            carry = None
            if item is None:
                return
            batch, tokens = [item], item[0].tokens
            deadline = time.monotonic() + self.max_wait
            while len(batch) < self.max_batch_size:
                try:
                    nxt = self._ready.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    self._ready.put(None)  # stop after this batch
                    break
                if self.max_batch_tokens and tokens + nxt[0].tokens > self.max_batch_tokens:
                    carry = nxt
                    break
                batch.append(nxt)
                tokens += nxt[0].tokens
            self._run(batch)

    def _run(self, batch: list) -> None:
        start = time.perf_counter()
        try:
            outcomes = self.reward.run([job for job, _ in batch])
        except Exception as err:  # the model itself failed: every video of the batch gets the error
            logger.exception("batch of %d failed", len(batch))
            outcomes = [err] * len(batch)
        failed = 0
        for (_, future), outcome in zip(batch, outcomes):
            if isinstance(outcome, Exception):
                failed += 1
                future.set_exception(outcome)
            else:
                future.set_result(outcome)
        if self.telemetry is not None:
            self.telemetry.batch(len(batch), failed, time.perf_counter() - start)

    def _release(self, _future: Future) -> None:
        with self._room:
            self._in_flight -= 1
            self._gauge()
            self._room.notify_all()

    def _gauge(self) -> None:
        if self.telemetry is not None:
            self.telemetry.set_queue_depth(self._in_flight)
