"""FingerReward: prompt -> questions -> engine -> Eq. 1-4 -> a reward per video."""

from __future__ import annotations

import logging
import math
import numbers
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
import dataclasses
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from finger_reward import prompts as prompt_text
from finger_reward import scoring
from finger_reward.errors import BatchError, FingerError, QuestionError
from finger_reward.prefetch import PipelineStats, pipeline
from finger_reward.preference import Comparison, comparison, p_first_better, pair_max_frames, pair_video_name
from finger_reward.questions.record import DIMENSIONS
from finger_reward.questions import Question, QuestionBank, TemplateGenerator, as_bank
from finger_reward.questions.generate import fill_bank
from finger_reward.results import VideoScore, score_video
from finger_reward.video import Clip, SlowFast, VideoFrames, describe, load_video

if TYPE_CHECKING:
    from finger_reward.serve.batcher import Batcher

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

    Frames are sampled at `fps` (at most `max_frames`) under `max_pixels`; `slowfast=SlowFast()`
    (`finger_reward.video`) gives Q-Save's SlowFast frames instead, logging the tokens saved.
    Files carry their frame rate; in-memory frames are sampled against `video_fps` (per call, per
    video, or this default; e.g. 16 for Wan output), else taken as already at `fps`, which is an
    error for a video longer than `max_frames`.

    `score` hands the model `chunk_size` videos at a time and decodes the next chunk in
    `prefetch` worker threads meanwhile (default: one beside a CPU model, which needs the cores
    itself, several beside a GPU; 0: no threads). A video whose preprocessing takes longer than
    `decode_timeout` seconds (with workers) fails alone. `stats` holds the last `score`'s
    `PipelineStats`, including the share of wall time the model waited on preprocessing.

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
        slowfast: SlowFast | None = None,
        video_fps: float | None = None,
        on_error: str = "raise",
        progress: bool = False,
        prefetch: int | None = None,
        chunk_size: int = 16,
        decode_timeout: float | None = 300.0,
    ):
        if prefetch is not None and (isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0):
            raise ValueError(f"prefetch={prefetch!r} must be a number of worker threads >= 0, or None for the default")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size!r} must be a whole number of videos >= 1")
        if decode_timeout is not None and not decode_timeout > 0:
            raise ValueError(f"decode_timeout={decode_timeout!r} must be a positive number of seconds or None")
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
        if slowfast is not None and not isinstance(slowfast, SlowFast):
            raise ValueError(f"slowfast must be a SlowFast(...) or None, got {type(slowfast).__name__}")
        self.video_options = dict(fps=fps, max_frames=max_frames, max_pixels=max_pixels, value_range=value_range,
                                  slowfast=slowfast)
        self.video_fps = check_rate(video_fps, "video_fps")
        self.on_error, self.progress = on_error, progress
        self.prefetch, self.chunk_size, self.decode_timeout = prefetch, chunk_size, decode_timeout
        self.stats = PipelineStats()
        self._batcher = None
        self._batcher_lock = threading.Lock()

    def __getstate__(self):  # picklable for RL frameworks; a running batcher stays with its process
        return {k: v for k, v in self.__dict__.items() if k not in ("_batcher", "_batcher_lock")}

    def __setstate__(self, state):
        self.__dict__.update(state, _batcher=None, _batcher_lock=threading.Lock())

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path | Any,
        *,
        processor=None,
        questions=None,
        question_generator=None,
        mode: str | None = None,
        max_new_tokens: int = 256,
        device=None,
        dtype=None,
        attn_implementation: str | None = None,
        max_batch_tokens: int | str = 16384,
        compile: bool = False,
        **options,
    ) -> "FingerReward":
        """Load a Qwen2.5-VL / Qwen3-VL checkpoint (directory, hub id or "tiny"), or wrap a loaded model.

        `mode` is "answer" (read P(Yes)/P(No) right away) or "reason" (generate the reason
        first, then read the answer). `max_batch_tokens` ("auto": from free GPU memory) and `compile`
        go to `TransformersEngine`. Other keyword options are those of `FingerReward`. Settings
        left out (mode, fps, max_frames, max_pixels, slowfast) come from the checkpoint's
        finger_reward.json when it has one (`finger_reward.pretrained`), else the defaults; pass
        `slowfast=None` to score a SlowFast-trained checkpoint on plain frames.
        """
        from finger_reward import pretrained
        from finger_reward.engine import TransformersEngine

        model = pretrained.resolve(model)
        defaults = pretrained.scoring_defaults(model)
        trained_mode = defaults.pop("mode", "answer")
        if "slowfast" in defaults:
            defaults["slowfast"] = pretrained.as_slowfast(defaults["slowfast"])
        mode = mode or trained_mode
        options = {**defaults, **options}
        engine_options = dict(mode=mode, max_new_tokens=max_new_tokens, max_batch_tokens=max_batch_tokens,
                              compile=compile)
        if isinstance(model, (str, Path)):
            engine = TransformersEngine.from_pretrained(
                str(model), device=device, dtype=dtype, attn_implementation=attn_implementation, **engine_options
            )
        elif processor is None:
            raise ValueError("pass processor= together with an already-loaded model")
        else:
            engine = TransformersEngine(model, processor, **engine_options)
        return cls(engine, questions=questions, question_generator=question_generator, **options)

    @classmethod
    def from_openai(
        cls,
        base_url: str | None,
        model: str,
        *,
        api_key: str | None = None,
        processor=None,
        questions=None,
        question_generator=None,
        mode: str | None = None,
        max_new_tokens: int = 256,
        top_logprobs: int | None = None,
        concurrency: int = 16,
        **options,
    ) -> "FingerReward":
        """Score through an OpenAI-compatible server (vLLM, SGLang) hosting the FingER model under the name `model`.

        `processor` is the checkpoint's directory (or "tiny", or a loaded processor): with it each
        video's first request is checked against the local processor's prompt, and settings left
        out (mode, fps, max_frames, max_pixels, slowfast) come from the directory's finger_reward.json
        as in `from_pretrained`. See `engine.openai_backend.OpenAIEngine` for how requests are made and
        `engine.server_inputs.serve_commands` for the server command; build an engine yourself for
        its other options. Other keyword options are those of `FingerReward`.
        """
        from finger_reward import pretrained
        from finger_reward.engine.openai_backend import DEFAULT_TOP_LOGPROBS, OpenAIEngine

        defaults = {}
        if isinstance(processor, (str, Path)):
            processor = pretrained.resolve(str(processor))
            defaults = pretrained.scoring_defaults(processor)
            if "slowfast" in defaults:
                defaults["slowfast"] = pretrained.as_slowfast(defaults["slowfast"])
        mode = mode or defaults.pop("mode", "answer")
        defaults.pop("mode", None)
        engine = OpenAIEngine(base_url, model, api_key=api_key, processor=processor, mode=mode,
                              max_new_tokens=max_new_tokens, top_logprobs=top_logprobs or DEFAULT_TOP_LOGPROBS,
                              concurrency=concurrency, progress=bool(options.get("progress", False)))
        return cls(engine, questions=questions, question_generator=question_generator, **{**defaults, **options})

    def __call__(self, videos: Sequence[Any], prompts: Sequence[str] | str, *, video_fps=None,
                 **host_kwargs) -> list[float]:
        """One overall score per video (NaN for a failed video when on_error="nan").

        Extra keyword arguments that training loops pass to every reward_fn are accepted and unused.
        """
        return [s.overall for s in self.score(videos, prompts, video_fps=video_fps)]

    def sampling(self) -> dict:
        """How this reward samples frames (what a service reports, so clients can sample alike)."""
        slowfast = self.video_options["slowfast"]
        return {"fps": self.video_options["fps"], "max_frames": self.video_options["max_frames"],
                "max_pixels": self.video_options["max_pixels"], "patch_factor": self.engine.patch_factor,
                "slowfast": None if slowfast is None else asdict(slowfast)}

    def start_batcher(self, **options) -> "Batcher":
        """Start the in-process dynamic batcher behind `submit` (options: see `serve.Batcher`)."""
        from finger_reward.serve.batcher import Batcher

        with self._batcher_lock:
            if self._batcher is not None:
                self._batcher.close()
            self._batcher = Batcher(self, **options)
            return self._batcher

    def submit(self, video: Any, prompt: str, **options) -> "Future[VideoScore]":
        """Score one video in the background; the future gives its `VideoScore` or raises its error.

        `video_fps=` gives an in-memory video's frame rate, as in `score`.

        Concurrent submits are batched together (a batcher with default options starts on first
        use), so a trainer can overlap generation and scoring.
        """
        with self._batcher_lock:
            batcher = self._batcher
        batcher = batcher or self.start_batcher()
        return batcher.submit(video, prompt, **options)

    def close(self) -> None:
        """Stop the background batcher, if one was started."""
        with self._batcher_lock:
            if self._batcher is not None:
                self._batcher.close()
                self._batcher = None

    def compare(self, video_a: Any, video_b: Any, prompt: str, *, dimensions: Sequence[str] | None = None,
                both_orders: bool = True, video_fps=None) -> Comparison:
        """VQ-Insight's preference comparison: P(video_a better than video_b) per FingER dimension, and overall.

        The model sees both videos in one prompt (Video A, then Video B, each sampled as a video
        scored alone but with at most max_frames // 2 frames: `finger_reward.preference`) and is
        asked "which video is better in DIMENSION?"; P(A) comes from the restricted softmax over the
        single-token spellings of "A" and "B" at the answer position (Eq. 1 with A/B for Yes/No).
        `overall` is the Eq. 4 weighted sum with the reward's weights. `both_orders=True` (default)
        also asks with the videos swapped and averages, which cancels the model's position bias and
        makes compare(b, a) exactly 1 - compare(a, b), at twice the cost (two prefixes of two videos);
        pass False to ask once. `dimensions`: a subset of the five (default all). `video_fps`: the
        frame rate of in-memory videos, as in `score`. A video that cannot be read raises `VideoError`
        naming it (video_a or video_b).
        """
        return self.compare_many([(video_a, video_b)], [prompt], dimensions=dimensions, both_orders=both_orders,
                                 video_fps=video_fps)[0]

    def compare_many(self, pairs: Sequence[tuple[Any, Any]], prompts: Sequence[str] | str, *,
                     dimensions: Sequence[str] | None = None, both_orders: bool = True,
                     video_fps=None) -> list[Comparison]:
        """`compare` for many pairs (one prompt for all, or one per pair), batched across pairs as `score` is.

        A bad video raises `VideoError` naming it and its pair before the model runs.
        """
        compare = getattr(self.engine, "compare_many", None)
        if compare is None:
            raise TypeError(f"{type(self.engine).__name__} cannot compare two videos; compare needs the local "
                            "transformers engine (FingerReward.from_pretrained)")
        pairs = [tuple(pair) for pair in pairs]
        if any(len(pair) != 2 for pair in pairs):
            raise ValueError("pairs must be (video_a, video_b) tuples")
        prompts = [prompts] * len(pairs) if isinstance(prompts, str) else list(prompts)
        if len(prompts) != len(pairs) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"got {len(pairs)} pairs but {len(prompts)} prompts; pass one prompt string per pair or one for all")
        dims = list(DIMENSIONS if dimensions is None else dimensions)
        unknown = [d for d in dims if d not in DIMENSIONS]
        if unknown or not dims or len(set(dims)) != len(dims):
            raise ValueError(f"dimensions={dimensions!r} must name distinct dimensions among {', '.join(DIMENSIONS)}")
        rate = check_rate(video_fps, "video_fps") or self.video_fps
        options = {**self.video_options, "max_frames": pair_max_frames(self.video_options["max_frames"])}
        clips = [tuple(load_video(video, name=pair_video_name(video, k, i, len(pairs)),
                                  patch_factor=self.engine.patch_factor, source_fps=None if isinstance(video, VideoFrames) else rate,
                                  **options) for k, video in enumerate(pair))
                 for i, pair in enumerate(pairs)]
        questions = [[prompt_text.pair_question(d, p) for d in dims] for p in prompts]
        orders = clips + ([(b, a) for a, b in clips] if both_orders else [])
        answers = compare(orders, questions * (2 if both_orders else 1))
        results = []
        for i, (a, b) in enumerate(clips):
            ab, ba = answers[i], answers[i + len(clips)] if both_orders else None
            reasons = None
            if ab.reasons is not None:
                reasons = {d: [ab.reasons[q]] + ([ba.reasons[q]] if ba is not None else []) for q, d in enumerate(dims)}
            names = [describe(video, i) for video in pairs[i]]
            results.append(comparison(*names, prompts[i], dims, p_first_better(ab.probs, None if ba is None else ba.probs),
                                      weights=self.weights, both_orders=both_orders, reasons=reasons))
        return results

    def score(self, videos: Sequence[Any], prompts: Sequence[str] | str, *, video_fps=None) -> list[VideoScore]:
        """Full results per video: overall, per dimension, per question (with reasons in reason mode).

        `video_fps` is the frame rate of in-memory videos (one number, or one per video, None where
        unknown); default: the reward's `video_fps`. Files use their own. Videos go to the model
        `chunk_size` at a time while the next chunk is decoded (see the class).
        """
        videos, prompts = pair_videos_prompts(videos, prompts)
        rates = video_rates(video_fps, len(videos))
        outcomes = [o for chunk in self._outcomes(videos, prompts, rates) for o in chunk]
        results = _as_scores(videos, prompts, outcomes)
        failures = {i: o for i, o in enumerate(outcomes) if isinstance(o, Exception)}
        if failures and self.on_error == "raise":
            raise BatchError(failures, results)
        return results

    def score_iter(self, videos: Sequence[Any], prompts: Sequence[str] | str, *,
                   chunk_size: int | None = None, video_fps=None) -> Iterator[list[VideoScore]]:
        """`score` chunk by chunk (`chunk_size` videos, default the reward's): each chunk's results,
        in order, as soon as the model has them, the next chunk decoding meanwhile.

        A failed video is a `VideoScore` with NaN scores and its `error`, whatever `on_error` says,
        so a long run can write results as it goes. `stats` grows as the chunks come.
        """
        videos, prompts = pair_videos_prompts(videos, prompts)
        done = 0
        for outcomes in self._outcomes(videos, prompts, video_rates(video_fps, len(videos)),
                                       chunk_size or self.chunk_size):
            yield _as_scores(videos[done:], prompts[done:], outcomes, start=done)
            done += len(outcomes)

    def _outcomes(self, videos: list, prompts: list[str], rates: list, chunk_size: int | None = None) -> Iterator[list[VideoScore | Exception]]:
        """Each chunk's scores or errors, through the prefetch pipeline, with the progress bar and `stats`."""
        prompt_errors = self._fill_questions(prompts)
        names = [describe(v, i) for i, v in enumerate(videos)]
        items = list(zip(videos, prompts, names, rates))

        def prepare(item) -> Job | Exception:
            video, prompt, name, rate = item
            return self._prepare_one(video, prompt, name, prompt_errors, rate, with_inputs=True)

        self.stats = PipelineStats()
        with tqdm(total=len(videos), desc="scoring", unit="video", disable=not self.progress, mininterval=0) as bar:
            for outcomes in pipeline(items, prepare, self._run_jobs, chunk_size=chunk_size or self.chunk_size,
                                     workers=self._prefetch_workers(), timeout=self.decode_timeout,
                                     label=names.__getitem__, stats=self.stats):
                yield outcomes
                bar.update(len(outcomes))

    def prepare(self, videos: Sequence[Any], prompts: Sequence[str], names: Sequence[str] | None = None,
                video_fps=None) -> list[Job | Exception]:
        """The CPU half of scoring: each video's questions and decoded frames, or its error in its place.

        New prompts are sent to the question generator together, once each. Services call this
        in worker threads and `run` on the model's thread, so decoding overlaps the GPU.
        `video_fps` as in `score`.
        """
        prompt_errors = self._fill_questions(prompts)
        names = names or [describe(v, i) for i, v in enumerate(videos)]
        rates = video_rates(video_fps, len(videos))
        return [self._prepare_one(video, prompt, name, prompt_errors, rate)
                for video, prompt, name, rate in zip(videos, prompts, names, rates)]

    def _fill_questions(self, prompts: Sequence[str]) -> dict[str, Exception]:
        """Ask the question generator about every new prompt, once each; the prompts it failed on."""
        return fill_bank(self.bank, prompts, self.question_generator) if self.question_generator else {}

    def _prepare_one(self, video, prompt: str, name: str, prompt_errors: dict, rate: float | None = None, *,
                     with_inputs: bool = False) -> Job | Exception:
        """One video's job, or its error; `with_inputs` also runs the engine's `preprocess` (the processor)."""
        try:
            if prompt in prompt_errors:
                raise QuestionError(f"no questions for prompt {prompt!r}: {prompt_errors[prompt]}")
            questions = self.bank.questions_for(prompt)
            if rate is None and not isinstance(video, VideoFrames):
                rate = self.video_fps  # the reward's default yields to frames that carry their own rate
            clip = load_video(video, name=name, patch_factor=self.engine.patch_factor, source_fps=rate,
                              **self.video_options)
            if clip.pathways:
                _log_slowfast(clip, self.engine.patch_factor)
            preprocess = getattr(self.engine, "preprocess", None) if with_inputs else None
            inputs = preprocess(clip) if preprocess is not None else None
            return Job(name, prompt, questions, clip, _tokens(clip, questions, self.engine.patch_factor), inputs)
        except Exception as err:  # one bad video fails alone; the batch goes on
            return _logged(err, name)

    def _prefetch_workers(self) -> int:
        if self.prefetch is not None:
            return self.prefetch
        from finger_reward.serve.batcher import default_prepare_workers

        return default_prepare_workers(self)

    def run(self, jobs: Sequence[Job | Exception]) -> list[VideoScore | Exception]:
        """The model half: answer and score every prepared job; errors pass through in place.

        An engine with `answer_many` gets all the jobs at once to batch across videos; if that
        fails, each job is retried alone, so one bad video cannot fail the others. An engine may
        also put a video's exception in that video's place in the list it returns.
        """
        with tqdm(total=len(jobs), desc="scoring", unit="video", disable=not self.progress) as bar:
            outcomes = self._run_jobs(jobs)
            bar.update(len(jobs))
        return outcomes

    def _run_jobs(self, jobs: Sequence[Job | Exception]) -> list[VideoScore | Exception]:
        outcomes: list[VideoScore | Exception] = list(jobs)
        ready = [i for i, job in enumerate(jobs) if not isinstance(job, Exception)]
        answers = self._answer_together([jobs[i] for i in ready])
        for i, answer in zip(ready, answers):
            outcomes[i] = self._score_job(jobs[i], answer)
        return outcomes

    def _answer_together(self, jobs: list[Job]) -> list:
        """Each job's answers, or None where it must be answered alone."""
        answer_many = getattr(self.engine, "answer_many", None)
        if answer_many is None or len(jobs) < 2:
            return [None] * len(jobs)
        clips, questions = [job.clip for job in jobs], [[q.question for q in job.questions] for job in jobs]
        inputs = [job.inputs for job in jobs]
        try:
            if all(x is None for x in inputs):  # engines without `preprocess` take no `inputs`
                return answer_many(clips, questions)
            return answer_many(clips, questions, inputs)
        except Exception as err:
            logger.warning("batch of %d videos failed (%s); answering each alone", len(jobs), err)
            return [None] * len(jobs)

    def _score_job(self, job: Job, answers=None) -> VideoScore | Exception:
        try:
            if isinstance(answers, Exception):
                raise answers
            if answers is None:
                questions = [q.question for q in job.questions]
                extra = () if job.inputs is None else (job.inputs,)
                answers = self.engine.answer(job.clip, questions, *extra)
            result = score_video(job.name, job.prompt, job.questions, answers.probs, answers.reasons,
                                 aggregate=self.aggregate, weights=self.weights,
                                 missing_variants=getattr(answers, "missing_variant", None))
            return dataclasses.replace(result, sampled=sampled_summary(job.clip))
        except Exception as err:
            return _logged(err, job.name)


@dataclass(frozen=True)
class Job:
    """A video ready for the model: its name, prompt, questions and sampled frames."""

    name: str
    prompt: str
    questions: list[Question]
    clip: Clip
    tokens: int  # approximate prompt tokens, for token-budget batching
    inputs: Any = None  # the engine's `preprocess(clip)`, when computed ahead of the model


def _tokens(clip: Clip, questions: list[Question], patch_factor: int) -> int:
    """Video tokens (one per 2 frames x patch_factor^2 pixels; SlowFast: of both pathways, plus about
    6 per marker timestamp, as Qwen tokenizes digits singly, and 4 per marker) and about 48 per question."""
    markers = 6 * clip.frames.shape[0] + 4 * len(clip.pathways) if clip.pathways else 0
    return clip.token_counts(patch_factor)[0] + markers + 48 * len(questions)


def _log_slowfast(clip: Clip, patch_factor: int) -> None:
    given, plain = clip.token_counts(patch_factor)
    sizes = ", ".join(f"{len(p.indices)} {p.kind} at {p.frames.shape[3]}x{p.frames.shape[2]}" for p in clip.pathways)
    logger.info("%s: SlowFast %s: %d video tokens instead of %d (%.0f%% fewer)",
                clip.name, sizes, given, plain, 100 * (1 - given / plain))


def _as_scores(videos, prompts, outcomes, start: int = 0) -> list[VideoScore]:
    """Outcomes with each error turned into a failed `VideoScore` (NaN scores, the error's text)."""
    return [VideoScore.failed(describe(v, i), p, o) if isinstance(o, Exception) else o
            for i, (v, p, o) in enumerate(zip(videos, prompts, outcomes), start=start)]


def _logged(err: Exception, name: str) -> Exception:
    if not isinstance(err, FingerError):
        logger.exception("video %s failed", name, exc_info=err)
    return err


def sampled_summary(clip: Clip) -> dict:
    """What the model was given of a video: frame count, the rate it was told, and the frame size."""
    t, _, h, w = clip.frames.shape
    return {"frames": int(t), "fps": float(clip.fps), "height": int(h), "width": int(w)}


def check_rate(value, what: str) -> float | None:
    """A frame rate argument: None, or a positive finite number (as float)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
        raise ValueError(f"{what}={value!r} must be a positive frame rate (frames per second) or None")
    return float(value)


def video_rates(video_fps, n: int) -> list[float | None]:
    """`video_fps` as one rate (or None) per video: a number for all, or a sequence of n."""
    if video_fps is None or isinstance(video_fps, numbers.Real):
        return [check_rate(video_fps, "video_fps")] * n
    if isinstance(video_fps, (str, bytes)) or not isinstance(video_fps, Sequence) or len(video_fps) != n:
        raise ValueError(f"video_fps must be one frame rate or a list of {n} (one per video, None where unknown), "
                         f"got {video_fps!r}"[:300])
    return [check_rate(v, f"video_fps[{i}]") for i, v in enumerate(video_fps)]


def pair_videos_prompts(videos, prompts) -> tuple[list, list[str]]:
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

