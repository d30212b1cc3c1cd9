"""CPU work ahead of the model: decode chunk k+1 in worker threads while the model runs chunk k.

`pipeline` cuts the items into chunks, hands each item to a small pool of daemon threads and
gives the model one chunk at a time, in order, yielding each chunk's results as they come. At
most two chunks are decoded or decoding at any moment (the one the model needs next and the one
after it), so memory stays bounded however many videos there are. An item that takes longer
than `timeout` seconds from the moment a worker picks it up becomes a `VideoError` in its place;
its worker is abandoned and replaced (a Python thread cannot be stopped, and a daemon thread
cannot keep the process alive at exit).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

from finger_reward.errors import VideoError

logger = logging.getLogger(__name__)

@dataclass
class PipelineStats:
    """Where the wall time of one `pipeline` run went, as seen from the model's thread."""

    videos: int = 0
    chunks: int = 0
    wall_s: float = 0.0
    wait_s: float = 0.0  # the model thread blocked on preprocessing (decode, sample, resize, processor)

    @property
    def wait_share(self) -> float:
        """The share of wall time the model waited on preprocessing (0: never, 1: always)."""
        return self.wait_s / self.wall_s if self.wall_s > 0 else 0.0


class _Task:
    def __init__(self, fn: Callable, args: tuple):
        self.fn, self.args, self.future = fn, args, Future()
        self.started = threading.Event()
        self.started_at = 0.0
        self.worker: threading.Thread | None = None


class WorkerPool:
    """Daemon threads running tasks in submission order; `result` waits with a per-task timeout."""

    def __init__(self, workers: int, timeout: float | None, name: str = "finger-prefetch"):
        if workers < 1:
            raise ValueError(f"workers={workers} must be at least 1")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout={timeout} must be a positive number of seconds or None")
        self.timeout, self.name = timeout, name
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._stuck: set[threading.Thread] = set()
        for _ in range(workers):
            self._spawn()

    def submit(self, fn: Callable, *args) -> _Task:
        task = _Task(fn, args)
        self._tasks.put(task)
        return task

    def result(self, task: _Task, label: str) -> Any:
        """The task's return value (or its exception, returned in its place); a timeout is a `VideoError`."""
        task.started.wait()  # queued tasks wait their turn; a stuck worker is replaced, so the turn comes
        try:
            remaining = None if self.timeout is None else task.started_at + self.timeout - time.monotonic()
            return task.future.result(timeout=None if remaining is None else max(0.0, remaining))
        except FutureTimeout:
            self._stuck.add(task.worker)
            self._spawn()  # the stuck thread keeps running; the rest of the queue needs a worker
            logger.warning("%s: preprocessing took longer than %ss; scoring the other videos", label, self.timeout)
            return VideoError(label, f"preprocessing took longer than decode_timeout={self.timeout}s")
        except Exception as err:
            return err

    def close(self) -> None:
        """Stop the workers and wait for them (each at most `timeout`); a stuck one is left behind as a daemon.

        Waiting matters: a thread that ran native decoders or torch and is still alive when the
        interpreter exits can abort the process ("terminate called without an active exception").
        """
        for _ in self._threads:
            self._tasks.put(None)
        for thread in self._threads:
            if thread not in self._stuck:
                thread.join(self.timeout)

    def _spawn(self) -> None:
        thread = threading.Thread(target=self._work, name=f"{self.name}-{len(self._threads) + 1}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def _work(self) -> None:
        while (task := self._tasks.get()) is not None:
            task.worker = threading.current_thread()
            task.started_at = time.monotonic()
            task.started.set()
            try:
                task.future.set_result(task.fn(*task.args))
            except BaseException as err:  # noqa: BLE001 - handed to the model thread, in the item's place
                task.future.set_exception(err)


def pipeline(
    items: Sequence[Any],
    prepare: Callable[[Any], Any],
    run: Callable[[list], list],
    *,
    chunk_size: int,
    workers: int,
    timeout: float | None,
    label: Callable[[int], str] = str,
    stats: PipelineStats | None = None,
) -> Iterator[list]:
    """`run` over `prepare(item)` for every item, chunk by chunk, with chunk k+1 prepared during chunk k.

    Yields `run`'s output for each chunk, in item order. `prepare` may raise: its exception takes
    the item's place in the list `run` gets (as does a timeout). With `workers=0` everything runs
    in the calling thread, one chunk after another, and there is no timeout. `stats`, if given,
    is kept up to date: the wall time so far and how long the calling thread waited on `prepare`.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be at least 1")
    chunks = [list(range(i, min(i + chunk_size, len(items)))) for i in range(0, len(items), chunk_size)]
    stats = stats if stats is not None else PipelineStats()
    stats.videos, stats.chunks = len(items), len(chunks)
    start = time.perf_counter()
    pool = WorkerPool(workers, timeout) if workers > 0 else None
    try:
        submitted: dict[int, list[_Task]] = {}
        for k, chunk in enumerate(chunks):
            for ahead in (k, k + 1):  # the chunk the model needs now and the next one, never further
                if pool is not None and ahead < len(chunks) and ahead not in submitted:
                    submitted[ahead] = [pool.submit(prepare, items[i]) for i in chunks[ahead]]
            waited = time.perf_counter()
            if pool is None:
                jobs = [_call(prepare, items[i]) for i in chunk]
            else:
                jobs = [pool.result(task, label(i)) for task, i in zip(submitted.pop(k), chunk)]
            stats.wait_s += time.perf_counter() - waited
            outputs = run(jobs)
            stats.wall_s = time.perf_counter() - start
            yield outputs
    finally:
        if pool is not None:
            pool.close()


def _call(fn: Callable, item: Any) -> Any:
    try:
        return fn(item)
    except Exception as err:
        return err
