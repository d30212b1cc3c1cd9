"""The service in one process: uvicorn + Starlette in front of the in-process batcher."""

from __future__ import annotations

import asyncio
import signal
import threading

from finger_reward.serve.api import ScoreAPI
from finger_reward.serve.batcher import Batcher
from finger_reward.serve.config import ServeConfig


def batcher_score_many(batcher: Batcher):
    """`ScoreAPI`'s scoring callable over a batcher: the whole request gets room in the queue or a 429."""

    async def score_many(videos: list, prompts: list[str], names: list[str], video_fps: list) -> list:
        futures = batcher.submit_many(videos, prompts, names=names, video_fps=video_fps, block=False)
        return await asyncio.gather(*(asyncio.wrap_future(f) for f in futures), return_exceptions=True)

    return score_many


def build_app(api: ScoreAPI):
    """A Starlette app that hands every request to `api`."""
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    async def endpoint(request):
        reply = await api(request.method, request.url.path, request.headers, request.body)
        return Response(reply.body, status_code=reply.status, media_type=reply.content_type, headers=reply.headers)

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH"]
    return Starlette(routes=[Route("/{path:path}", endpoint, methods=methods)])


class LocalServer:
    """FingerReward behind HTTP in this process. `run()` blocks until SIGINT/SIGTERM; `start()` runs in a thread."""

    def __init__(self, reward, config: ServeConfig | None = None):
        import uvicorn

        self.config = config or ServeConfig()
        self.batcher = reward.start_batcher(**self.config.batcher_options())
        self.api = ScoreAPI(batcher_score_many(self.batcher), token=self.config.token,
                            allow_path=self.config.allow_path, max_payload_mb=self.config.max_payload_mb,
                            telemetry=self.batcher.telemetry, sampling=reward.sampling())
        uv_config = uvicorn.Config(build_app(self.api), host=self.config.host, port=self.config.port,
                                   log_level="warning", lifespan="off")
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
