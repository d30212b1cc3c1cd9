"""The service in one process: the FastAPI app (app.py) under uvicorn, in front of the in-process batcher."""

from __future__ import annotations

import asyncio
import signal
import threading

from finger_reward.serve.api import ScoreAPI
from finger_reward.serve.batcher import Batcher
from finger_reward.serve.config import ServeConfig
from finger_reward.serve.telemetry import Telemetry


def batcher_score_many(batcher: Batcher):
    """`ScoreAPI`'s scoring callable over a batcher: the whole request gets room in the queue or a 429."""

    async def score_many(videos: list, prompts: list[str], names: list[str], video_fps: list) -> list:
        futures = batcher.submit_many(videos, prompts, names=names, video_fps=video_fps, block=False)
        return await asyncio.gather(*(asyncio.wrap_future(f) for f in futures), return_exceptions=True)

    return score_many


class LocalServer:
    """FingerReward behind HTTP in this process. `run()` blocks until SIGINT/SIGTERM; `start()` runs in a thread.

    Stopping drains: the port closes at once, requests already received are answered (for up to
    `drain_timeout_s`), then the batcher finishes and the call returns."""

    def __init__(self, reward, config: ServeConfig | None = None):
        import uvicorn

        from finger_reward.serve.app import build_app

        self.config = config or ServeConfig()
        self.batcher = reward.start_batcher(**self.config.batcher_options(), telemetry=Telemetry())
        self.api = ScoreAPI(batcher_score_many(self.batcher), token=self.config.token,
                            allow_path=self.config.allow_path, max_payload_mb=self.config.max_payload_mb,
                            telemetry=self.batcher.telemetry, sampling=reward.sampling(),
                            result_ttl_s=self.config.result_ttl_s)
        uv_config = uvicorn.Config(build_app(self.api), host=self.config.host, port=self.config.port,
                                   log_level="warning", lifespan="off", access_log=False,
                                   timeout_graceful_shutdown=self.config.drain_timeout_s)
        self.server = uvicorn.Server(uv_config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        sockets = [s for server in self.server.servers for s in server.sockets]
        host, port = sockets[0].getsockname()[:2] if sockets else (self.config.host, self.config.port)
        return f"http://{host}:{port}"

    def run(self) -> None:
        """Serve until SIGINT or SIGTERM, shut down gracefully, drain the batcher, and return."""
        # uvicorn re-raises the signal that stopped it once it has shut down; with these handlers in
        # place that ends here instead of killing the process, so it exits with status 0.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        _show_access_log()
        try:
            self.server.run()
        finally:
            self.batcher.close()

    def _on_signal(self, signum, frame) -> None:
        self.server.should_exit = True

    def start(self, timeout: float = 30.0) -> "LocalServer":
        self._thread = threading.Thread(target=self.server.run, name="finger-http", daemon=True)
        self._thread.start()
        waited = 0.0
        while not self.server.started and waited < timeout:
            threading.Event().wait(0.02)
            waited += 0.02
        if not self.server.started:
            raise RuntimeError(f"the server did not start on {self.config.host}:{self.config.port}")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.batcher.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _show_access_log() -> None:
    """Access lines on stderr for a server run as a command, unless the application configured logging itself."""
    import logging
    import sys

    from finger_reward.serve.api import access_log

    if not access_log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        access_log.addHandler(handler)
        access_log.setLevel(logging.INFO)
