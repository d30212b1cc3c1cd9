"""FingER as a TRL reward function, for policies whose text becomes a video.

In video generation, TRL's GRPOTrainer trains the parts that write for the generator (prompt
rewriters, planners). The reward of a completion is FingER's score of the video generated from
it, judged against the user's original prompt (a dataset column):

    reward = FingerVideoReward(FingerRewardClient(url), pipeline=wan_pipe, prompt_column="original_prompt")
    trainer = GRPOTrainer(model=..., reward_funcs=[reward], train_dataset=dataset, ...)

TRL calls it as `reward(prompts=, completions=, completion_ids=, <columns>=, trainer_state=,
log_extra=, log_metric=)`; it returns one float per completion, or None where the video could not
be made or scored (TRL counts None as "not applicable", never as 0). Per-dimension scores go to
TRL's completions table (`log_extra`) and metrics (`log_metric`).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from typing import Any

from finger_reward.errors import BatchError
from finger_reward.questions import DIMENSIONS
from finger_reward.rewards import completion_text

logger = logging.getLogger(__name__)


class FingerVideoReward:
    """Completion -> video (a diffusers `pipeline`, or any `video_fn(text)`) -> FingER score.

    `reward` is a FingerReward or a FingerRewardClient. `pipeline_kwargs` go to every pipeline
    call (steps, size, frames, ...); pipelines are called with output_type="np". Videos are
    sampled against `video_fps`, else the pipeline's own rate (`pipeline_fps`); a `video_fn` may
    return `VideoFrames(frames, fps)` to carry its own. Picklable when its parts are (a client and
    a module-level `video_fn` are).
    """

    __name__ = "finger_reward"  # TRL logs rewards under rewards/<__name__>/

    def __init__(
        self,
        reward,
        *,
        pipeline=None,
        video_fn: Callable[[str], Any] | None = None,
        pipeline_kwargs: dict | None = None,
        prompt_column: str = "original_prompt",
        log_dimensions: bool = True,
        video_fps: float | None = None,
    ):
        from finger_reward.integrations.diffusers import resolve_fps

        if (pipeline is None) == (video_fn is None):
            raise ValueError("pass exactly one of pipeline= (a diffusers video pipeline) or video_fn= (text -> video)")
        self.video_fps = resolve_fps(pipeline, video_fps)
        self.reward, self.pipeline, self.video_fn = reward, pipeline, video_fn
        self.pipeline_kwargs = dict(pipeline_kwargs or {})
        self.prompt_column, self.log_dimensions = prompt_column, log_dimensions

    def __call__(self, prompts=None, completions=None, completion_ids=None, *, log_extra=None, log_metric=None,
                 trainer_state=None, **columns) -> list[float | None]:
        if self.prompt_column not in columns:
            raise KeyError(f"the dataset has no column {self.prompt_column!r} with the user's original prompt; "
                           f"columns passed: {', '.join(sorted(columns)) or 'none'} (set prompt_column=)")
        originals = list(columns[self.prompt_column])
        texts = [completion_text(c) for c in completions]
        videos, errors = self._make_videos(texts)
        results = self._score(videos, originals, errors)
        rewards = [None if r is None or not r.ok or math.isnan(r.overall) else r.overall for r in results]
        for i, error in errors.items():
            logger.warning("finger_reward: sample %d gets no reward: %s", i, error)
        self._log(results, log_extra, log_metric)
        return rewards

    def _make_videos(self, texts: list[str]) -> tuple[list, dict[int, str]]:
        """One video per text; a text whose generation fails gets None and an error, the others go on."""
        if self.pipeline is not None:
            try:
                return self._pipeline_videos(texts), {}
            except Exception as err:  # find the culprit(s): retry one by one
                logger.info("batched video generation failed (%s); generating one by one", err)
        videos, errors = [], {}
        for i, text in enumerate(texts):
            try:
                videos.append(self.video_fn(text) if self.video_fn else self._pipeline_videos([text])[0])
            except Exception as err:
                videos.append(None)
                errors[i] = f"video generation failed: {type(err).__name__}: {err}"
        return videos, errors

    def _pipeline_videos(self, texts: list[str]) -> list:
        from finger_reward.integrations.diffusers import pipeline_videos

        return pipeline_videos(self.pipeline(prompt=texts, output_type="np", **self.pipeline_kwargs))

    def _score(self, videos: list, originals: list[str], errors: dict[int, str]) -> list:
        keep = [i for i, v in enumerate(videos) if v is not None]
        results: list = [None] * len(videos)
        if not keep:
            return results
        try:
            rate = {} if self.video_fps is None else {"video_fps": self.video_fps}
            scored = self.reward.score([videos[i] for i in keep], [originals[i] for i in keep], **rate)
        except BatchError as err:
            scored = err.results
        for i, result in zip(keep, scored):
            results[i] = result
            if not result.ok:
                errors[i] = f"scoring failed: {result.error}"
        return results

    def _log(self, results: list, log_extra, log_metric) -> None:
        if not self.log_dimensions:
            return
        for dim in DIMENSIONS:
            values = [r.dimensions.get(dim) if r is not None and r.ok else None for r in results]
            if log_extra is not None:
                log_extra(f"finger/{dim}", values)
            present = [v for v in values if v is not None]
            if log_metric is not None and present:
                log_metric(f"finger/{dim}", sum(present) / len(present))


class AsyncFingerVideoReward(FingerVideoReward):
    """The same reward as a coroutine, so TRL runs it beside its other (async) rewards."""

    async def __call__(self, prompts=None, completions=None, completion_ids=None, **kwargs) -> list[float | None]:
        return await asyncio.to_thread(super().__call__, prompts, completions, completion_ids, **kwargs)
