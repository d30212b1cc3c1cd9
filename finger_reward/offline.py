"""Offline scoring on Ray Data: `finger-reward score-dir --ray`, with a pool of model replicas.

    bank = QuestionBank.from_jsonl("bank.jsonl")  # read here and shipped to the actors
    load = functools.partial(FingerReward.from_pretrained, "path/to/model", questions=bank)
    results = score_on_ray(keys, "results.jsonl", load, workers=4)

The (video, prompt) pairs not yet in the results file go through `Dataset.map_batches` to a fixed
pool of `FingerScorer` actors (one per GPU, or N CPU workers), each of which builds its
`FingerReward` once with `load`; the driver appends every result to the file as it arrives
(scorefile.py), so a killed run loses nothing it wrote and a rerun scores only the rest. On a
multi-machine cluster the model and the videos must be readable at the same paths on every node.
Ray is imported only when these functions are called.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from finger_reward.errors import FingerError
from finger_reward.results import VideoScore, json_safe
from finger_reward.scorefile import Key, Progress, append_result, pending, video_key

if TYPE_CHECKING:
    from finger_reward.reward import FingerReward

logger = logging.getLogger(__name__)


class FingerScorer:
    """A Ray Data callable class: loads `FingerReward` once per actor, scores batches of (video, prompt) rows.

    Returns one JSON result per row, the line the single-process `score-dir` writes; a video that
    fails becomes a row with its error and null scores, never a 0, and never fails the job.
    """

    def __init__(self, load: Callable[[], "FingerReward"]):
        self.reward = load()
        self.reward.on_error, self.reward.progress = "nan", False  # errors become rows; the driver shows progress
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, batch: dict) -> dict[str, list[str]]:
        videos, prompts = [str(v) for v in batch["video"]], [str(p) for p in batch["prompt"]]
        try:
            results = self.reward.score(videos, prompts)
        except Exception as err:  # the whole batch failed: each video gets the error in its own row
            logger.exception("batch of %d videos failed", len(videos))
            results = [VideoScore.failed(v, p, f"{type(err).__name__}: {err}") for v, p in zip(videos, prompts)]
        return {"result": [json.dumps(json_safe(r.to_dict()), allow_nan=False) for r in results],
                "worker": [self.worker] * len(results)}


def score_on_ray(
    keys: list[Key],
    path: str | Path,
    load_reward: Callable[[], "FingerReward"],
    *,
    address: str | None = None,
    workers: int | None = None,
    gpus_per_worker: float | None = None,
    cpus_per_worker: float = 1.0,
    batch_size: int = 16,
    start_timeout_s: float = 1800.0,
    desc: str = "scoring",
    root: str | Path | None = None,
    retry_failed: bool = True,
    progress: Progress | None = None,
) -> dict[Key, VideoScore]:
    """Score every (video, prompt) not yet in `path` on Ray Data, appending each result as it arrives.

    Joins the running Ray, else `ray.init(address)` (None: `$RAY_ADDRESS`, the latest local
    cluster, or a new local Ray; "auto": an existing cluster only), and shuts down a Ray it
    started. `workers` defaults to one per GPU / `gpus_per_worker` (1 when the cluster has GPUs,
    else 0 and one worker). `load_reward` is a picklable callable that builds the `FingerReward`
    on each actor. Videos are identified, failed rows retried and `progress` filled in as
    `scorefile.score_to_file` does (`root`, `retry_failed`); returns the results of `keys`, old and new.
    """
    import ray

    if batch_size < 1:
        raise FingerError(f"batch_size must be at least 1, got {batch_size}")
    progress = progress if progress is not None else Progress()
    done, todo = pending(keys, path, root=root, retry_failed=retry_failed)
    progress.start(keys, done)
    if not todo:
        return done
    started = not ray.is_initialized()
    if started:
        ray.init(address=address)
    try:
        pool = _pool_size(ray.cluster_resources(), workers, gpus_per_worker)
        rows = _run(todo, load_reward, *pool, cpus_per_worker, batch_size, start_timeout_s)
        _append_as_they_come(rows, path, done, len(todo), desc, root, progress)
    finally:
        if started:
            ray.shutdown()
    return done


def _pool_size(resources: dict, workers: int | None, gpus_per_worker: float | None) -> tuple[int, float]:
    """(actors, GPUs per actor): one actor per GPU by default, one CPU actor on a cluster that has no GPUs now."""
    gpus = resources.get("GPU", 0)
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if gpus else 0.0
    if gpus_per_worker < 0 or (workers is not None and workers < 1):
        raise FingerError(f"need workers >= 1 and gpus_per_worker >= 0, got {workers} and {gpus_per_worker}")
    if workers is None:
        workers = max(1, int(gpus // gpus_per_worker)) if gpus_per_worker else 1
    if workers * gpus_per_worker > gpus:  # an autoscaling cluster may add them; a fixed one fails at start_timeout_s
        logger.warning("%d worker(s) x %g GPU(s) need %g GPUs but the Ray cluster has %g now: waiting for more",
                       workers, gpus_per_worker, workers * gpus_per_worker, gpus)
    return workers, gpus_per_worker


def _run(todo: list[Key], load_reward: Callable, workers: int, gpus_per_worker: float,
         cpus_per_worker: float, batch_size: int, start_timeout_s: float):
    """The streaming Ray Data pipeline: pending rows -> actor pool -> result rows, as an iterator."""
    import ray.data

    items = [{"video": video, "prompt": prompt} for video, prompt in todo]
    # A dataset keeps the settings current when it is made: the driver shows one bar over videos
    # instead of Ray's, and every actor starts before the first batch (an error if the cluster cannot).
    with _data_context(enable_progress_bars=False, wait_for_min_actors_s=start_timeout_s):
        dataset = ray.data.from_items(items, override_num_blocks=math.ceil(len(items) / batch_size))
        scored = dataset.map_batches(
            FingerScorer,
            fn_constructor_kwargs={"load": load_reward},
            batch_size=batch_size,
            # One batch scoring and one waiting per actor: the model never idles and no actor hoards the queue.
            compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=2),
            num_cpus=cpus_per_worker,
            num_gpus=gpus_per_worker,
            udf_modifying_row_count=False,
        )
    logger.info("scoring %d video(s) on %d Ray worker(s) (%g GPU, %g CPU each)", len(todo), workers,
                gpus_per_worker, cpus_per_worker)
    return scored.iter_rows()


@contextlib.contextmanager
def _data_context(**settings):
    """Ray Data's current `DataContext` with `settings`, restored afterwards."""
    import ray.data

    context = ray.data.DataContext.get_current()
    before = {name: getattr(context, name) for name in settings}
    for name, value in settings.items():
        setattr(context, name, value)
    try:
        yield
    finally:
        for name, value in before.items():
            setattr(context, name, value)


def _append_as_they_come(rows, path: str | Path, done: dict[Key, VideoScore], total: int, desc: str,
                         root: str | Path | None, progress: Progress) -> None:
    from tqdm.auto import tqdm

    by_worker: Counter = Counter()
    with tqdm(total=total, desc=desc, unit="video") as bar, Path(path).open("a", encoding="utf-8") as out:
        try:
            for row in rows:
                result = VideoScore.from_dict(json.loads(row["result"]))
                append_result(out, result, video_key(result.video, root))
                out.flush()
                done[(result.video, result.prompt)] = result
                progress.record((result.video, result.prompt), result)
                by_worker[row["worker"]] += 1
                bar.update()
        except Exception as err:
            if not _is_ray_error(err):
                raise
            raise FingerError(f"the Ray job stopped after {bar.n} of {total} video(s) (those are saved; rerun to "
                              f"resume): {type(err).__name__}: {_cause(err)}") from err
    logger.info("%d video(s) scored by %d worker(s): %s", sum(by_worker.values()), len(by_worker),
                ", ".join(f"{w} {n}" for w, n in sorted(by_worker.items())))


def _is_ray_error(err: Exception) -> bool:
    return type(err).__module__.startswith("ray.")


def _cause(err: Exception) -> str:
    """The last line of a Ray error's text: the worker's own exception (Ray puts its traceback before)."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""
