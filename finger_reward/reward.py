"""FingerReward: prompt -> questions -> engine -> Eq. 1-4 -> a reward per video."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from finger_reward import scoring
from finger_reward.errors import BatchError, FingerError, QuestionError
from finger_reward.questions import QuestionBank, TemplateGenerator, as_bank
from finger_reward.questions.generate import fill_bank
from finger_reward.results import VideoScore, score_video
from finger_reward.video import describe, load_video

logger = logging.getLogger(__name__)

ON_ERROR = ("raise", "nan")


class FingerReward:
    """FingER's reward for generated videos, in the `reward_fn(videos, prompts)` shape.

    >>> reward = FingerReward.from_pretrained("path/to/finger-model", questions="bank.jsonl")
    >>> reward(videos, prompts)          # list[float], one overall score per video
    >>> reward.score(videos, prompts)    # list[VideoScore] with per-dimension and per-question detail

    Questions come from `questions` (a bank JSONL path, a `QuestionBank` or a list of
    `Question`) and/or a `question_generator`, which fills the bank the first time it sees a
    prompt (a GRPO group of G videos with one prompt asks once). Given neither, the offline
    template generator is used; given only a bank, a prompt missing from it is an error.

    A video that cannot be scored (unreadable, or its prompt has no questions) never gets a
    silent 0: with `on_error="raise"` (default) every other video is still scored and a
    `BatchError` carries both the failures and the results; with `on_error="nan"` the
    failed videos score NaN and carry their error.
    """

    __name__ = "finger_reward"  # TRL logs reward functions under their __name__

    def __init__(
        self,
        engine,
        *,
        questions=None,
        question_generator=None,
        aggregate: str = "mean",
        weights: dict[str, float] | None = None,
        fps: float = 2.0,
        max_frames: int = 48,
        max_pixels: int = 448 * 448,
        value_range: tuple[float, float] = (0.0, 1.0),
        on_error: str = "raise",
        progress: bool = False,
    ):
        if aggregate not in scoring.AGGREGATES:
            raise ValueError(f"aggregate={aggregate!r} is not one of {scoring.AGGREGATES}")
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error={on_error!r} is not one of {ON_ERROR}")
        self.engine = engine
        self.bank: QuestionBank = QuestionBank() if questions is None else as_bank(questions)
        if question_generator is None and questions is None:
            question_generator = TemplateGenerator()
        self.question_generator = question_generator
        self.aggregate, self.weights = aggregate, scoring.normalize_weights(weights)
        self.video_options = dict(fps=fps, max_frames=max_frames, max_pixels=max_pixels, value_range=value_range)
        self.on_error, self.progress = on_error, progress

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path | Any,
        *,
        processor=None,
        questions=None,
        question_generator=None,
        mode: str = "answer",
        max_new_tokens: int = 256,
        device=None,
        dtype=None,
        attn_implementation: str | None = None,
        **options,
    ) -> "FingerReward":
        """Load a Qwen2.5-VL / Qwen3-VL checkpoint (directory or hub id), or wrap a loaded model.

        `mode` is "answer" (read P(Yes)/P(No) right away) or "reason" (generate the reason
        first, then read the answer). Other keyword options are those of `FingerReward`.
        """
        from finger_reward.engine import TransformersEngine

        engine_options = dict(mode=mode, max_new_tokens=max_new_tokens)
        if isinstance(model, (str, Path)):
            engine = TransformersEngine.from_pretrained(
                str(model), device=device, dtype=dtype, attn_implementation=attn_implementation, **engine_options
            )
        elif processor is None:
            raise ValueError("pass processor= together with an already-loaded model")
        else:
            engine = TransformersEngine(model, processor, **engine_options)
        return cls(engine, questions=questions, question_generator=question_generator, **options)

    def __call__(self, videos: Sequence[Any], prompts: Sequence[str] | str, **host_kwargs) -> list[float]:
        """One overall score per video (NaN for a failed video when on_error="nan").

        Extra keyword arguments that training loops pass to every reward_fn are accepted and unused.
        """
        return [s.overall for s in self.score(videos, prompts)]

    def score(self, videos: Sequence[Any], prompts: Sequence[str] | str) -> list[VideoScore]:
        """Full results per video: overall, per dimension, per question (with reasons in reason mode)."""
        videos, prompts = _pair_up(videos, prompts)
        prompt_errors = fill_bank(self.bank, prompts, self.question_generator) if self.question_generator else {}
        results, failures = [], {}
        for i, (video, prompt) in enumerate(tqdm(list(zip(videos, prompts)), desc="scoring", unit="video",
                                                  disable=not self.progress)):
            name = describe(video, i)
            try:
                if prompt in prompt_errors:
                    raise QuestionError(f"no questions for prompt {prompt!r}: {prompt_errors[prompt]}")
                results.append(self._score_one(video, prompt, name))
            except Exception as err:  # one bad video fails alone; the batch goes on
                if not isinstance(err, FingerError):
                    logger.exception("video %s failed", name)
                failures[i] = err
                results.append(VideoScore.failed(name, prompt, err))
        if failures and self.on_error == "raise":
            raise BatchError(failures, results)
        return results

    def _score_one(self, video: Any, prompt: str, name: str) -> VideoScore:
        questions = self.bank.questions_for(prompt)
        clip = load_video(video, name=name, patch_factor=self.engine.patch_factor, **self.video_options)
        answers = self.engine.answer(clip, [q.question for q in questions])
        return score_video(name, prompt, questions, answers.probs, answers.reasons,
                           aggregate=self.aggregate, weights=self.weights)


def _pair_up(videos, prompts) -> tuple[list, list[str]]:
    if isinstance(videos, (str, bytes, Path)) or not isinstance(videos, Sequence):
        raise TypeError(
            f"videos must be a list of videos, got {type(videos).__name__}; wrap a single video in a list, "
            "or split batched generator output with finger_reward.integrations.diffusers"
        )
    videos = list(videos)
    prompts = [prompts] * len(videos) if isinstance(prompts, str) else list(prompts)
    if len(prompts) != len(videos):
        raise ValueError(f"got {len(videos)} videos but {len(prompts)} prompts; pass one prompt per video or one for all")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise QuestionError(f"prompt #{bad[0]} is {type(prompts[bad[0]]).__name__}, expected a string")
    return videos, prompts

