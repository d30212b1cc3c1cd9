"""The service's Prometheus metrics, from `prometheus_client`, in a registry of its own per server or replica.

A registry per `Telemetry` (not the process-wide default) keeps two servers in one process, as in tests, apart.
"""

from __future__ import annotations

# Scoring a video takes from a fraction of a second (small model, GPU) to minutes (reason mode, CPU).
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Telemetry:
    """Requests by status, videos by outcome, queue depth, batch sizes, request and batch latency."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        own = {"registry": self.registry}
        self._requests = Counter("finger_requests", "score requests answered, by HTTP status", ["status"], **own)
        self._videos = Counter("finger_videos", "videos scored or failed", ["outcome"], **own)
        self._request_videos = Counter("finger_request_videos", "videos in answered score requests", **own)
        self._latency = Histogram("finger_request_latency_seconds", "time to answer a score request",
                                  buckets=LATENCY_BUCKETS, **own)
        self._batch_latency = Histogram("finger_batch_latency_seconds", "model time of one batch",
                                        buckets=LATENCY_BUCKETS, **own)
        self._batch_size = Histogram("finger_batch_size", "videos per model batch", buckets=BATCH_BUCKETS, **own)
        self._queue = Gauge("finger_queue_depth", "videos accepted and not yet answered", **own)
        for outcome in ("scored", "failed"):
            self._videos.labels(outcome)

    def request(self, status: int, seconds: float, videos: int = 0) -> None:
        self._requests.labels(str(status)).inc()
        self._latency.observe(seconds)
        self._request_videos.inc(videos)

    def batch(self, size: int, failed: int, seconds: float | None = None) -> None:
        self._batch_size.observe(size)
        self._videos.labels("scored").inc(size - failed)
        self._videos.labels("failed").inc(failed)
        if seconds is not None:
            self._batch_latency.observe(seconds)

    def video_failed(self) -> None:
        """A video that failed before reaching the model (unreadable, no questions)."""
        self._videos.labels("failed").inc()

    def set_queue_depth(self, depth: int) -> None:
        self._queue.set(depth)

    def value(self, name: str, **labels) -> float:
        """One sample's current value (0 when absent), e.g. `value("finger_batch_size_bucket", le="1.0")`."""
        return self.registry.get_sample_value(name, labels) or 0.0

    @property
    def requests(self) -> dict[int, int]:
        """Answered score requests by HTTP status."""
        return {int(s.labels["status"]): int(s.value) for metric in self._requests.collect()
                for s in metric.samples if s.name == "finger_requests_total"}

    @property
    def videos_scored(self) -> int:
        return int(self.value("finger_videos_total", outcome="scored"))

    @property
    def videos_failed(self) -> int:
        return int(self.value("finger_videos_total", outcome="failed"))

    def render(self) -> tuple[bytes, str]:
        """(body, content type) of the Prometheus text exposition."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
