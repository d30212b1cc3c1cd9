"""Counters and histograms for the service, rendered in the Prometheus text format."""

from __future__ import annotations

import threading
from bisect import bisect_left

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        index = bisect_left(self.buckets, value)
        if index < len(self.buckets):
            self.counts[index] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        cumulative, out = 0, []
        for bound, n in zip(self.buckets, self.counts):
            cumulative += n
            out.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
        return out + [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum}", f"{name}_count {self.count}"]


class Telemetry:
    """Thread-safe service statistics: requests by status, videos, batch sizes, latency, queue depth."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[int, int] = {}
        self.videos_scored = self.videos_failed = 0
        self.batch_size = Histogram(BATCH_BUCKETS)
        self.latency = Histogram(LATENCY_BUCKETS)
        self.queue_depth = 0

    def request(self, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[status] = self.requests.get(status, 0) + 1
            self.latency.observe(seconds)

    def batch(self, size: int, failed: int) -> None:
        with self._lock:
            self.batch_size.observe(size)
            self.videos_scored += size - failed
            self.videos_failed += failed

    def video_failed(self) -> None:
        """A video that failed before reaching the model (unreadable, no questions)."""
        with self._lock:
            self.videos_failed += 1

    def set_queue_depth(self, depth: int) -> None:
        self.queue_depth = depth

    def render(self) -> str:
        with self._lock:
            lines = ["# TYPE finger_requests_total counter"]
            lines += [f'finger_requests_total{{status="{s}"}} {n}' for s, n in sorted(self.requests.items())]
            lines += ["# TYPE finger_videos_total counter",
                      f'finger_videos_total{{outcome="scored"}} {self.videos_scored}',
                      f'finger_videos_total{{outcome="failed"}} {self.videos_failed}',
                      "# TYPE finger_batch_size histogram", *self.batch_size.lines("finger_batch_size"),
                      "# TYPE finger_request_latency_seconds histogram",
                      *self.latency.lines("finger_request_latency_seconds"),
                      "# TYPE finger_queue_depth gauge", f"finger_queue_depth {self.queue_depth}"]
        return "\n".join(lines) + "\n"
