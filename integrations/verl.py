"""FingER as verl's reward, for policies whose text becomes a video (verl 0.9.1 reward loop).

In video generation, verl trains the part that writes for the generator (a prompt rewriter, a
planner); the video generator runs outside verl. The reward of a sample is FingER's score of its
generated video against the user's original prompt, computed by a FingER service
(`finger-reward serve`) that this module reaches over HTTP. Each sample says where its video is:

- `extra_info["video"]` (or, for the manager, a non-tensor batch field of that name): the video,
  usually the path the generator wrote; or `video_fn`, a callable (or "module:function") that
  turns the decoded response text (`solution_str`) into a video;
- `extra_info["prompt"]`: the user's original prompt, as a string (not the chat messages).

Two ways in, picked in the verl config (see configs/verl_finger_reward.yaml):

1. `FingerRewardManager` (recommended): a reward-loop manager that gathers the samples verl scores
   concurrently into one request per `max_batch`, so the service batches a step's videos on the GPU.

       reward.reward_manager.source=importlib
       reward.reward_manager.module.path=pkg://finger_reward.integrations.verl
       reward.reward_manager.name=FingerRewardManager

2. `compute_score`, verl's custom reward function: one request per sample.

       reward.custom_reward_function.path=pkg://finger_reward.integrations.verl
       reward.custom_reward_function.name=compute_score

Failed videos. verl needs a number for every sample: its managers read `result["score"]`
(reward_manager/naive.py), the agent loop drops the whole batch's `rm_scores` when any score is
None (agent_loop.py `_postprocess`), and a NaN becomes the NaN mean/std of its GRPO group
(core_algos.py `compute_grpo_outcome_advantage`), so every advantage of the group is NaN and the
FSDP engine skips the whole optimizer step (engine/fsdp/transformer_impl.py). Neither None nor NaN
fails a sample alone, and a silent 0 is a reward a policy can learn to chase. So by default a
sample whose video cannot be scored raises `RewardSampleError`, naming the video, the prompt and
the reason, and the step stops there (verl gathers its samples without catching). Set
`failure_score` to a number to give such samples that reward instead (a penalty of your choosing,
logged as an error, with `failed=1` in the extra info). A service that cannot be reached or refuses
a request always raises: that is not the sample's fault.

`import finger_reward.integrations.verl` does not import verl; the manager class is built (and
registered in verl's registry as "finger") on first access.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import importlib.util
import logging
import math
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from finger_reward.errors import FingerError
from finger_reward.questions import DIMENSIONS

logger = logging.getLogger(__name__)

MANAGER_NAME = "finger"  # the name in verl's reward-manager registry
VERL_KEYWORDS = ("reward_router_address", "reward_model_tokenizer")  # verl adds these when its own RM is on


class RewardSampleError(FingerError):
    """A verl sample whose video could not be scored (missing, unreadable, or no questions for its prompt)."""


@dataclass(frozen=True)
class FingerVerlConfig:
    """The integration's settings: `reward.reward_kwargs` for the manager, `custom_reward_function.reward_kwargs`
    for `compute_score`. Unknown keys are an error."""

    reward_url: str | None = field(default=None, metadata={"help": "FingER service URL; default: env FINGER_REWARD_URL"})
    reward_token: str | None = field(default=None, metadata={"help": "bearer token; default: env FINGER_REWARD_TOKEN"})
    video_key: str = field(default="video", metadata={"help": "extra_info key with the generated video (a path)"})
    prompt_key: str = field(default="prompt", metadata={"help": "extra_info key with the user's original prompt"})
    video_fn: Any = field(default=None, metadata={"help": "callable or 'module:function' / 'file.py:function': response text -> video"})
    max_batch: int = field(default=64, metadata={"help": "manager: send when this many samples wait"})
    max_wait_ms: float = field(default=50.0, metadata={"help": "manager: or when the oldest has waited this long"})
    timeout: float = field(default=600.0, metadata={"help": "seconds per HTTP request"})
    send_paths: bool = field(default=False, metadata={"help": "send paths, not bytes (the service needs allow_path)"})
    failure_score: float | None = field(default=None, metadata={"help": "reward of an unscorable video; None raises"})
    video_fps: float | None = field(default=None, metadata={
        "help": "frame rate of in-memory videos from video_fn (Wan 16, LTX-Video 24); files and VideoFrames carry their own"})

    def __post_init__(self):
        if self.max_batch < 1:
            raise ValueError(f"max_batch={self.max_batch} must be at least 1 (videos per request to the service)")
        if self.max_wait_ms < 0 or self.timeout <= 0:
            raise ValueError(f"max_wait_ms={self.max_wait_ms} must be >= 0 and timeout={self.timeout} > 0")
        if self.failure_score is not None and not math.isfinite(float(self.failure_score)):
            raise ValueError(f"failure_score={self.failure_score} must be a finite number or None (NaN breaks GRPO groups)")
        from finger_reward.reward import check_rate

        check_rate(self.video_fps, "video_fps")

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any] | None, where: str) -> "FingerVerlConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options or {}) - known)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}")
        return cls(**dict(options or {}))

    def url_and_token(self) -> tuple[str, str | None]:
        url = self.reward_url or os.environ.get("FINGER_REWARD_URL")
        if not url:
            raise ValueError("no FingER service URL: set reward_url in the reward kwargs or the FINGER_REWARD_URL "
                             "environment variable (start one with `finger-reward serve`)")
        return url, self.reward_token or os.environ.get("FINGER_REWARD_TOKEN")

    def client(self):
        """A client sending up to `max_batch` videos per request; failed videos come back with `.error`."""
        return _client(*self.url_and_token(), self.timeout, self.max_batch, self.send_paths)


_clients: dict[tuple, Any] = {}
_clients_lock = threading.Lock()


def _client(url: str, token: str | None, timeout: float, max_batch: int, send_paths: bool):
    from finger_reward.serve.client import FingerRewardClient

    key = (url, token, timeout, max_batch, send_paths)
    with _clients_lock:  # one per setting, so per-sample calls reuse connections
        if key not in _clients:
            _clients[key] = FingerRewardClient(url, token, timeout=timeout, videos_per_request=max_batch,
                                               concurrency=1, send_paths=send_paths, on_error="nan")
        return _clients[key]


def resolve_video_fn(spec: Any) -> Callable[[str], Any] | None:
    """`video_fn` as given: None, a callable, "package.module:function" or "path/to/file.py:function"."""
    if spec is None or callable(spec):
        return spec
    return _load_callable(spec)


@functools.lru_cache(maxsize=32)
def _load_callable(spec: Any) -> Callable:
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"video_fn={spec!r}: expected a callable, 'package.module:function' or 'file.py:function'")
    where, name = spec.rsplit(":", 1)
    if where.endswith(".py"):
        module_spec = importlib.util.spec_from_file_location(f"finger_video_fn_{abs(hash(where))}", where)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    return getattr(module, name)


def make_video(video_fn: Callable[[str], Any], text: str) -> Any:
    try:
        return video_fn(text)
    except Exception as err:
        raise RewardSampleError(f"video_fn failed on the response {text[:80]!r}: {type(err).__name__}: {err}") from err


def _lookup(key: str, what: str, sources: list[tuple[str, Mapping]]) -> Any:
    for _, source in sources:
        if source is not None and key in source and source[key] is not None:
            return source[key]
    seen = "; ".join(f"{name} keys: {', '.join(map(str, source)) or 'none'}" for name, source in sources)
    raise RewardSampleError(f"the sample has no {what} under {key!r} ({seen}); put it there or set the key option")


def _prompt(sources: list[tuple[str, Mapping]], key: str) -> str:
    prompt = _lookup(key, "original prompt", sources)
    if not isinstance(prompt, str):
        raise RewardSampleError(f"{key!r} holds a {type(prompt).__name__}; it must be the user's original prompt "
                                "as a string (not the chat messages)")
    return prompt


def score_dict(result) -> dict:
    """verl's result dict: the overall score under "score", each dimension (NaN without questions), `failed`=0.

    Every sample gets the same keys: verl stacks each key across the batch."""
    return {"score": result.overall, **{d: result.dimensions.get(d, math.nan) for d in DIMENSIONS}, "failed": 0}


def failed_dict(score: float) -> dict:
    return {"score": float(score), **{d: math.nan for d in DIMENSIONS}, "failed": 1}


def _failure(config: FingerVerlConfig, message: str) -> dict:
    logger.error("FingER could not score a sample: %s", message)
    if config.failure_score is None:
        raise RewardSampleError(f"{message} (set failure_score to reward such samples with a number instead)")
    return failed_dict(config.failure_score)


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> dict:
    """verl's custom reward: FingER's score of `extra_info["video"]` against `extra_info["prompt"]`.

    verl calls it once per sample, `compute_score(data_source=, solution_str=, ground_truth=,
    extra_info=, **reward_kwargs)`; the options (`FingerVerlConfig`: reward_url, reward_token,
    video_key, prompt_key, video_fn, timeout, send_paths, failure_score, video_fps) come from
    `reward.custom_reward_function.reward_kwargs`. Returns {"score": overall, <dimension>: ...,
    "failed": 0}; verl rewards "score" and logs the other keys. `data_source` and `ground_truth` are
    not used (the reference is the original prompt).

    One HTTP request per sample: the service batches only requests that happen to overlap, and at
    worst the GPU scores one video at a time. `FingerRewardManager` sends a step's videos together.
    """
    for name in VERL_KEYWORDS:
        kwargs.pop(name, None)  # verl's own reward-model plumbing; FingER is not served by verl
    batching = sorted({"max_batch", "max_wait_ms"} & kwargs.keys())
    if batching:
        raise ValueError(f"compute_score sends one video per call, so {', '.join(batching)} would do nothing; "
                         "use FingerRewardManager to batch (configs/verl_finger_reward.yaml)")
    config = FingerVerlConfig.from_mapping(kwargs, "compute_score reward_kwargs")
    sources = [("extra_info", extra_info or {})]
    try:
        prompt = _prompt(sources, config.prompt_key)
        video_fn = resolve_video_fn(config.video_fn)
        video = make_video(video_fn, solution_str) if video_fn else _lookup(config.video_key, "video", sources)
    except RewardSampleError as err:
        return _failure(config, str(err))
    result = config.client().score([video], [prompt], video_fps=config.video_fps)[0]
    if not result.ok:
        return _failure(config, f"video {result.video} (prompt {prompt!r}): {result.error}")
    return score_dict(result)


class MicroBatcher:
    """Collects concurrent `submit`s on one event loop into batches for a blocking `score_batch`.

    A batch goes when `max_batch` items wait or `max_wait_ms` after its first item; `score_batch(videos,
    prompts) -> list[VideoScore]` runs in a thread, and each caller gets its own result.
    """

    def __init__(self, score_batch: Callable[[list, list[str]], list], max_batch: int, max_wait_ms: float):
        self.score_batch, self.max_batch, self.max_wait = score_batch, max_batch, max_wait_ms / 1000
        self.loop: asyncio.AbstractEventLoop | None = None
        self._pending: list[tuple[Any, str, asyncio.Future]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._sending: set[asyncio.Task] = set()

    async def submit(self, video: Any, prompt: str):
        self.loop = asyncio.get_running_loop()
        future = self.loop.create_future()
        self._pending.append((video, prompt, future))
        if len(self._pending) >= self.max_batch:
            self._flush()
        elif self._timer is None:
            self._timer = self.loop.call_later(self.max_wait, self._flush)
        return await future

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending = self._pending, []
        if batch:
            task = self.loop.create_task(self._send(batch))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list) -> None:
        videos, prompts, futures = zip(*batch)
        try:
            results = await self.loop.run_in_executor(None, self.score_batch, list(videos), list(prompts))
            if len(results) != len(batch):
                raise RuntimeError(f"the service answered {len(results)} results for {len(batch)} videos")
        except Exception as err:  # the request failed as a whole: every caller in it hears why
            for future in futures:
                if not future.done():
                    future.set_exception(err)
            return
        for future, result in zip(futures, results):
            if not future.done():
                future.set_result(result)


def __getattr__(name: str):
    if name == "FingerRewardManager":  # verl's loader does getattr(module, "FingerRewardManager")
        return finger_reward_manager_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def finger_reward_manager_class() -> type:
    """Build `FingerRewardManager` on verl's `RewardManagerBase` and register it as "finger" (imports verl)."""
    try:
        from verl.experimental.reward_loop.reward_manager import register
        from verl.experimental.reward_loop.reward_manager.base import RewardManagerBase
        from verl.utils.reward_score import default_compute_score
    except ImportError as err:
        raise ImportError(f"FingerRewardManager needs verl: pip install 'finger-reward[verl]' ({err})") from err

    class FingerRewardManager(RewardManagerBase):
        """verl reward-loop manager: every sample's video scored by FingER, many samples per request.

        verl builds it as `FingerRewardManager(config=, tokenizer=, compute_score=, reward_router_address=,
        reward_model_tokenizer=)` in each reward-loop worker and awaits `run_single(data)` for every sample
        concurrently; concurrent calls are gathered into one `client.score` request per `max_batch`
        samples (or per `max_wait_ms`). Keys, from `config.reward.reward_kwargs` (keyword `options` win):

        - reward_url / reward_token: the FingER service; default env FINGER_REWARD_URL / FINGER_REWARD_TOKEN
        - video_key ("video"), prompt_key ("prompt"): looked up in the sample's extra_info (with the agent
          loop's tool_extra_fields), then its non-tensor fields
        - video_fn (None): callable or "module:function" from the decoded response text to a video
        - max_batch (64), max_wait_ms (50): a request goes when max_batch samples wait or the first has
          waited max_wait_ms
        - timeout (600 s per request), send_paths (False: upload bytes; True: send paths the service reads)
        - failure_score (None): reward of a sample whose video cannot be scored; None raises `RewardSampleError`
        - video_fps (None): frame rate of in-memory videos from video_fn (files and `VideoFrames` carry their own)

        A step's batch is split over `reward.num_workers` workers, each sending its own requests: set
        `reward.num_workers=1` and `max_batch` >= the step's sample count for one request per step. With
        verl's streaming reward (agent loop, the default without a verl reward model), samples arrive as
        rollouts finish, and a request holds those that arrive within `max_wait_ms` of each other.
        Returns verl's `{"reward_score": overall, "reward_extra_info": {"score", <dimensions>, "failed"}}`.
        """

        def __init__(self, config, tokenizer, compute_score=None, reward_router_address=None,
                     reward_model_tokenizer=None, **options):
            super().__init__(config, tokenizer, compute_score)
            if compute_score is not None and compute_score is not default_compute_score:
                logger.warning("FingerRewardManager scores with the FingER service; the configured "
                               "custom_reward_function is not called")
            self.reward_router_address, self.reward_model_tokenizer = reward_router_address, reward_model_tokenizer
            configured = dict(config.reward.get("reward_kwargs") or {}) if "reward" in config else {}
            self.options = FingerVerlConfig.from_mapping({**configured, **options}, "reward.reward_kwargs")
            self.client = self.options.client()
            self.video_fn = resolve_video_fn(self.options.video_fn)
            self._batcher: MicroBatcher | None = None

        def batcher(self) -> MicroBatcher:
            """The micro-batcher of the running event loop (verl's worker loop; a new one per asyncio.run)."""
            if self._batcher is None or self._batcher.loop is not asyncio.get_running_loop():
                self._batcher = MicroBatcher(self.score_batch, self.options.max_batch, self.options.max_wait_ms)
            return self._batcher

        def score_batch(self, videos: list, prompts: list[str]) -> list:
            """One request for the batch (blocking; the batcher runs it in a thread)."""
            return self.client.score(videos, prompts, video_fps=self.options.video_fps)

        async def run_single(self, data) -> dict:
            item = data[-1:][0]  # as verl's managers: the last sequence of a multi-turn sample
            columns = item.non_tensor_batch
            extra = dict(columns.get("extra_info") or {})
            extra.update(dict(columns.get("tool_extra_fields") or {}))
            sources = [("extra_info", extra), ("non_tensor_batch", columns)]
            try:
                prompt = _prompt(sources, self.options.prompt_key)
                video = await self._video(item, sources)
            except RewardSampleError as err:
                return self._verl_result(_failure(self.options, str(err)))
            result = await self.batcher().submit(video, prompt)
            if not result.ok:
                return self._verl_result(_failure(self.options, f"video {result.video} (prompt {prompt!r}): {result.error}"))
            return self._verl_result(score_dict(result))

        async def _video(self, item, sources) -> Any:
            if self.video_fn is None:
                return _lookup(self.options.video_key, "video", sources)
            responses = item.batch["responses"]
            valid = int(item.batch["attention_mask"][-responses.shape[-1]:].sum())
            loop = asyncio.get_running_loop()
            text = await loop.run_in_executor(None, lambda: self.tokenizer.decode(responses[:valid], skip_special_tokens=True))
            return await loop.run_in_executor(None, make_video, self.video_fn, text)

        @staticmethod
        def _verl_result(info: dict) -> dict:
            return {"reward_score": info["score"], "reward_extra_info": info}

    # pickled by reference, as finger_reward.integrations.verl.FingerRewardManager (module __getattr__ gives it)
    FingerRewardManager.__module__, FingerRewardManager.__qualname__ = __name__, "FingerRewardManager"
    return register(MANAGER_NAME)(FingerRewardManager)
