"""The reward service as a Ray Serve application: one model replica per GPU, across machines.

    finger-reward serve --model DIR --replicas 4        # or, from Python:
    url = run_ray(ServeConfig(model="DIR", replicas=4), blocking=False)

Each replica loads `FingerReward` and serves the same FastAPI app as the one-process server
(`app.build_app`, as the `@serve.ingress` app), decodes videos in threads and batches prepared
videos from all of its requests with `@serve.batch`. Answers kept for Idempotency-Key retries are shared by
the replicas through one small `ResultStore` deployment (`ray_cache`), so a retry that Ray Serve routes to
another replica (the first one was killed after scoring, or its answer was lost) is not scored again. Overload answers 503 from Ray Serve's queue limit
(`max_queued_requests`), which `FingerRewardClient` retries. On a multi-machine cluster
(`$RAY_ADDRESS`), `finger_reward` and the model must be present on every node. Ray is imported
only when these functions are called.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import threading
import time

from finger_reward.serve.api import ScoreAPI
from finger_reward.serve.config import ServeConfig
from finger_reward.serve.telemetry import Telemetry

logger = logging.getLogger(__name__)

APP_NAME = "finger_reward"
DEPLOYMENT = "FingerReward"
STORE = "ResultStore"


@functools.cache
def _replica_class():
    """The deployment class; defined on first use so that importing this module does not import Ray."""
    from ray import serve

    @serve.ingress()
    class FingerRewardReplica:
        """One model replica: the service's FastAPI app in front, prepared videos batched into `FingerReward.run`."""

        def __init__(self, config: ServeConfig, store=None):
            self.reward = config.build_reward()
            self.telemetry = Telemetry()
            self.api = ScoreAPI(self._score_many, token=config.token, allow_path=config.allow_path,
                                max_payload_mb=config.max_payload_mb, telemetry=self.telemetry,
                                sampling=self.reward.sampling(), result_ttl_s=config.result_ttl_s)
            if store is not None:  # the app's one result store (a DeploymentHandle), behind this replica's own
                from finger_reward.serve.ray_cache import SharedResults

                self.api.results = SharedResults(self.api.results, store)
            self._run_batch.set_max_batch_size(config.max_batch_size)
            self._run_batch.set_batch_wait_timeout_s(config.max_wait_ms / 1000)
            self._in_flight = 0
            logger.info("replica ready: %s", config.model)

        def __serve_build_asgi_app__(self):
            """The app Ray Serve's ingress serves: the one `LocalServer` runs, over this replica's `ScoreAPI`."""
            from finger_reward.serve.app import build_app

            return build_app(self.api)

        async def _score_many(self, videos: list, prompts: list[str], names: list[str], video_fps: list) -> list:
            """Decode in a thread, then batch each prepared video; errors stay in their video's place."""
            self._track(len(videos))
            try:
                jobs = await asyncio.to_thread(self.reward.prepare, videos, prompts, names, video_fps)
                return await asyncio.gather(*(self._outcome(job) for job in jobs), return_exceptions=True)
            finally:
                self._track(-len(videos))

        async def _outcome(self, job):
            if isinstance(job, Exception):
                self.telemetry.video_failed()
                return job
            return await self._run_batch(job)

        @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
        async def _run_batch(self, jobs: list) -> list:
            """Score one batch on the model in a thread; an exception is returned as that job's outcome."""
            start = time.perf_counter()
            outcomes = await asyncio.to_thread(self.reward.run, jobs)
            self.telemetry.batch(len(jobs), sum(isinstance(o, Exception) for o in outcomes), time.perf_counter() - start)
            return outcomes

        def _track(self, change: int) -> None:
            self._in_flight += change
            self.telemetry.set_queue_depth(self._in_flight)

    return FingerRewardReplica


def _num_gpus(config: ServeConfig) -> float:
    """GPUs per replica: as configured, else one when CUDA is present."""
    if config.num_gpus_per_replica is not None:
        return config.num_gpus_per_replica
    import torch

    return 1 if torch.cuda.is_available() else 0


def build_deployment(config: ServeConfig):
    """The bound Ray Serve application for `config`, ready for `serve.run`: the replicas and their result store."""
    from ray import serve

    from finger_reward.serve.ray_cache import ResultStore

    store = serve.deployment(ResultStore, name=STORE, num_replicas=1, ray_actor_options={"num_cpus": 0},
                             max_ongoing_requests=1024)  # a dict lookup per call: no reason to queue them
    deployment = serve.deployment(
        _replica_class(),
        name=DEPLOYMENT,
        num_replicas=config.replicas or 1,
        ray_actor_options={"num_gpus": _num_gpus(config), "num_cpus": config.num_cpus_per_replica},
        max_ongoing_requests=max(2, config.max_batch_size * 2),
        max_queued_requests=config.max_queue,
        graceful_shutdown_timeout_s=config.drain_timeout_s,  # a stopping replica answers what it holds first
    )
    return deployment.bind(config, store.bind(ttl_s=config.result_ttl_s))


def run_ray(config: ServeConfig, *, blocking: bool = True) -> str:
    """Deploy on Ray (joining `$RAY_ADDRESS` when set) and return the URL.

    With `blocking` (from the main thread), serve until SIGINT/SIGTERM, then shut Serve down.
    """
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None)
    # Ray's own handler aborts the process on SIGTERM: replace it before the service can be reached.
    stop = _stop_on_signal() if blocking else None
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(build_deployment(config), name=APP_NAME, route_prefix="/")
    url = f"http://{config.host}:{config.port}"
    logger.info("serving %s on %s with %d replica(s)", config.model, url, config.replicas or 1)
    if stop is not None:
        while not stop.wait(0.5):
            pass
        logger.info("stopping the Ray Serve application")
        shutdown_ray()
    return url


def _stop_on_signal() -> threading.Event:
    """An event that SIGINT or SIGTERM sets, in place of the process-ending default handlers."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop.set())
    return stop


def replica_pids(app_name: str = APP_NAME) -> list[int]:
    """Process ids of the application's live model replicas (for fault drills), from the connected cluster's actor
    table (Ray's own `ray._private.state`: the public state API needs the dashboard)."""
    from ray._private.state import actors

    name = f"ServeReplica:{app_name}:{DEPLOYMENT}"
    return sorted(a["Pid"] for a in actors().values() if a["ActorClassName"] == name and a["State"] == "ALIVE")


def shutdown_ray() -> None:
    """Shut down Serve and disconnect from Ray; nothing to do (and no cluster started) when Ray is not up."""
    import ray
    from ray import serve

    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()
