"""Answer probabilities from an OpenAI-compatible server (vLLM, SGLang) that hosts the FingER model.

    engine = OpenAIEngine("http://gpu-box:8000/v1", "finger-qwen2.5-vl-7b", processor="path/to/checkpoint")
    reward = FingerReward(engine, questions="bank.jsonl")

Each question is one chat-completions request with the local engine's messages (prompts.py:
system turn, then the video, then the question) asking for `logprobs` with `top_logprobs=K`;
Eq. 1 is then applied to the Yes/No spellings among the top K (top_logprobs.py). In answer mode
the request generates one token, the answer. In reason mode it generates the reason and goes on
through `</reason><answer>` to the answer: its Yes/No log-probabilities come from that same
generation, where the local engine would read them (`top_logprobs.reason_span`). When the
generation does not get there as the local engine would (the reason runs past `max_new_tokens`,
the turn ends, or anything but the closing tags follows the reason), a second request continues
the assistant message with the reason as the local engine keeps it, closed by the tags it feeds
(`continue_final_message`, vLLM and SGLang), for one token. The server re-tokenizes that text,
as the local engine closes a reason too (`reasoning.ReasonTokens.closing`), so the two agree where
the tokenizers do; those questions are still logged.

The video goes as a `video_url` block holding a `data:video/mp4;base64,...` URL (vLLM takes it;
SGLang's chat API takes `video_url` blocks too, data URLs not checked here). What is sent is the
clip's sampled frames re-encoded at the sampled frame rate, padded to an even count as
transformers pads them (server_inputs.pad_frames), not the original file: so `fps`, `max_frames`
and `max_pixels` mean the same as locally, provided the server keeps the frames as sent. That
takes server flags (server_inputs.vllm_flags: `--mm-processor-kwargs`, `--media-io-kwargs`,
`--max-logprobs`). With `processor=` (the checkpoint's processor or its directory) the first
request of each video checks it: the server's `usage.prompt_tokens` must equal what the local
processor builds for the same video and question, else the video fails with the flags to use. A
SlowFast clip goes as its two pathway videos between the same text markers (prompts.video_blocks),
each at its mean frame rate. Frames are encoded losslessly by default; `video_codec="h264"` sends
far fewer bytes, at the cost of exactness.

Prefix caching is the server's job (vLLM `--enable-prefix-caching`): every request for a video
carries identical video bytes after the identical system text, and a video's first question is
sent alone before the rest, so the others find its prefix cached. All requests share one httpx
connection pool, at most `concurrency` in flight; 429/5xx answers and timeouts are retried with
back-off, except a 500 that repeats itself (chat_http.py).
"""

from __future__ import annotations

import asyncio
import base64
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from finger_reward import prompts
from finger_reward.chat_http import HTTPStatusError, RetryPolicy, apost_json, auth_headers, resolve_endpoint
from finger_reward.engine.inputs import patch_factor as processor_patch_factor
from finger_reward.engine.reasoning import closing_tags, extract_reason
from finger_reward.engine.server_inputs import (
    local_prompt_tokens, mismatch_message, pad_frames, refusal_hint, video_rates,
)
from finger_reward.engine.top_logprobs import answer_from_top_logprobs, expected_spellings, reason_span
from finger_reward.engine.transformers_backend import Answers
from finger_reward.errors import FingerError
from finger_reward.video import PATCH_FACTOR, Clip, encode_frames

logger = logging.getLogger(__name__)

VIDEO_CODECS = ("lossless", "h264")
# Large enough that a random-weight tiny model (691 tokens) has a Yes or No spelling in the top K
# for every question (the best one ranked up to 271 in 192 tries); a trained checkpoint needs ~20.
DEFAULT_TOP_LOGPROBS = 512
ANSWER_ROOM = 16  # tokens a reason-mode generation may take past max_new_tokens: closing tags and the answer


class AnswerError(FingerError):
    """A question about a video could not be answered by the server; names both."""

    def __init__(self, video: str, question: str, problem: str):
        self.video, self.question = video, question
        super().__init__(f"video {video}: question {question!r}: {problem}")


class InputMismatch(FingerError):
    """The server built a different prompt from the local processor's: it is not seeing the same frames."""


@dataclass(frozen=True)
class _Answer:
    p_yes: float
    p_no: float
    missing_variant: str | None
    absent: tuple[str, ...]
    reason: str | None
    resent: bool = False  # reason mode: read after the re-sent reason text (`_reread`), not from the generation


class OpenAIEngine:
    """The engine interface of `FingerReward` (`answer`, `answer_many`, `patch_factor`) over HTTP.

    `model` is the model's name at the endpoint. `processor` (a Qwen-VL processor, or the
    checkpoint directory holding it, or "tiny") turns on the first-request check of each video,
    gives the exact Yes/No spellings to expect, and the patch size. `top_logprobs` is K (the
    server must allow it: vLLM `--max-logprobs`). A question whose Yes or No spellings are not all
    in the top K keeps the probability from those present and is flagged
    (`Answers.missing_variant`: "yes"/"no" for a whole set absent, "partial" for some spellings);
    one with neither fails its video. `extra_body` is merged into every request.
    `patch_factor` (without a processor) is 28 for Qwen2.5-VL, 32 for Qwen3-VL.
    """

    def __init__(
        self,
        base_url: str | None,
        model: str,
        *,
        api_key: str | None = None,
        mode: str = "answer",
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_logprobs: int = DEFAULT_TOP_LOGPROBS,
        processor=None,
        concurrency: int = 16,
        max_retries: int = 3,
        backoff: float = 1.0,
        timeout: float = 120.0,
        video_codec: str = "lossless",
        patch_factor: int = PATCH_FACTOR,
        warm_prefix: bool = True,
        extra_body: dict | None = None,
        progress: bool = False,
    ):
        if not model:
            raise ValueError("model must name the model at the endpoint (its --served-model-name or path)")
        if top_logprobs < 1 or concurrency < 1 or max_new_tokens < 1:
            raise ValueError(f"need top_logprobs, concurrency and max_new_tokens >= 1; got {top_logprobs}, "
                             f"{concurrency}, {max_new_tokens}")
        if video_codec not in VIDEO_CODECS:
            raise ValueError(f"video_codec={video_codec!r} is not one of {VIDEO_CODECS}")
        self.base_url, self.api_key = resolve_endpoint(base_url, api_key)
        self.model, self.mode = model, prompts.check_mode(mode)
        self.max_new_tokens, self.temperature, self.top_logprobs = max_new_tokens, temperature, top_logprobs
        self.concurrency, self.timeout, self.video_codec = concurrency, timeout, video_codec
        self.policy = RetryPolicy(max_retries=max_retries, backoff=backoff)
        self.processor = load_processor(processor)
        self.patch_factor = processor_patch_factor(self.processor) if self.processor is not None else patch_factor
        self.expected = expected_spellings(self.processor.tokenizer) if self.processor is not None else None
        self.warm_prefix, self.extra_body, self.progress = warm_prefix, dict(extra_body or {}), progress
        self._warned_unchecked = False

    def answer(self, clip: Clip, questions: list[str]) -> Answers:
        """P(Yes)/P(No) (and reasons in reason mode) for each question about one video."""
        result = self.answer_many([clip], [questions])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def answer_many(self, clips: list[Clip], questions_per_clip: list[list[str]]) -> list[Answers | Exception]:
        """`answer` for many videos at once; a video that fails has its error in its place, the others go on."""
        if len(clips) != len(questions_per_clip):
            raise ValueError(f"got {len(clips)} clips but {len(questions_per_clip)} question lists")
        return _run(self._answer_all(list(clips), [list(q) for q in questions_per_clip]))

    # ---- scheduling -----------------------------------------------------------------------------

    async def _answer_all(self, clips: list[Clip], questions_per_clip: list[list[str]]) -> list:
        import httpx

        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        total = sum(map(len, questions_per_clip))
        async with httpx.AsyncClient(timeout=self.timeout, limits=limits) as client:
            session = _Session(client, asyncio.Semaphore(self.concurrency), asyncio.Semaphore(self.concurrency),
                               tqdm(total=total, desc="questions", unit="question", disable=not self.progress))
            with session.bar:
                return await asyncio.gather(*(self._answer_video(session, clip, questions)
                                              for clip, questions in zip(clips, questions_per_clip)))

    async def _answer_video(self, session: "_Session", clip: Clip, questions: list[str]) -> Answers | Exception:
        if not questions:
            return Answers(torch.zeros(0, 2), [] if self.mode == "reason" else None)
        async with session.videos:  # bounds the encoded videos held in memory
            try:
                urls = await asyncio.to_thread(video_data_urls, clip, self.video_codec)
                first = []
                if self.warm_prefix or self.processor is not None:  # alone: cached prefix, checked inputs
                    expected = None
                    if self.processor is not None:
                        expected = await asyncio.to_thread(local_prompt_tokens, self.processor, self.mode, clip,
                                                           questions[0])
                    first = [await self._ask(session, clip, urls, questions[0], expected)]
                rest = await asyncio.gather(*(self._ask(session, clip, urls, q) for q in questions[len(first):]),
                                            return_exceptions=True)
            except Exception as err:
                return err
        errors = [r for r in rest if isinstance(r, BaseException)]
        if errors:
            return errors[0]
        answers = first + list(rest)
        self._log_flags(clip, questions, answers)
        flags = [a.missing_variant for a in answers]
        return Answers(torch.tensor([[a.p_yes, a.p_no] for a in answers], dtype=torch.float32),
                       [a.reason for a in answers] if self.mode == "reason" else None,
                       flags if any(flags) else None)

    def _log_flags(self, clip: Clip, questions: list[str], answers: list[_Answer]) -> None:
        for question, answer in zip(questions, answers):
            if answer.missing_variant in ("yes", "no"):
                logger.warning("video %s: no %s spelling in the top %d tokens for %r; its probability comes from the "
                               "other set alone", clip.name, answer.missing_variant.capitalize(), self.top_logprobs,
                               question)
            elif answer.missing_variant:
                logger.warning("video %s: %s not in the top %d tokens for %r; P(Yes) leaves them out", clip.name,
                               ", ".join(map(repr, answer.absent)), self.top_logprobs, question)
        resent = [q for q, a in zip(questions, answers) if a.resent]
        if resent:
            logger.warning("video %s: %d reason(s) did not reach <answer> as the local engine would (within "
                           "max_new_tokens=%d, followed by the closing tags); their answers were read after the "
                           "re-sent reason text, which the server re-tokenizes: %s", clip.name, len(resent),
                           self.max_new_tokens, resent)
        if self.processor is None and not self._warned_unchecked:
            self._warned_unchecked = True
            logger.warning("no processor= given: the server's inputs are not checked against local scoring "
                           "(pass the checkpoint directory to check each video's first request)")

    async def _ask(self, session: "_Session", clip: Clip, urls: list[str], question: str,
                   expected_tokens: int | None = None) -> _Answer:
        """One question: one request (reason mode: two when the generation did not reach the answer itself)."""
        messages = chat_messages(question, self.mode, clip, urls)
        try:
            body = {"messages": messages, "logprobs": True, "top_logprobs": self.top_logprobs}
            if self.mode == "answer":
                reply = await self._post(session, {**body, "max_tokens": 1})
            else:
                reply = await self._post(session, {**body, "max_tokens": self.max_new_tokens + ANSWER_ROOM,
                                                   "stop": [prompts.ANSWER_CLOSE]})
            if expected_tokens is not None:
                check_prompt_tokens(reply, expected_tokens, clip, self.top_logprobs)
            entries = _logprob_entries(reply)
            reason, resent = None, False
            if self.mode == "answer":
                top = entries[0]["top_logprobs"]
            else:
                tokens = [str(e["token"]) for e in entries]
                span = reason_span(tokens, self.max_new_tokens)
                if span.answer is not None:
                    top = entries[span.answer]["top_logprobs"]
                    reason = extract_reason((_choice(reply).get("message") or {}).get("content") or "".join(tokens))
                else:
                    kept = "".join(tokens[: span.end])
                    reason, resent = extract_reason(kept), True
                    top = await self._reread(session, messages, kept + closing_tags(kept))
            answer = answer_from_top_logprobs(_nonempty(top), self.expected)
        except Exception as err:
            raise AnswerError(clip.name, question, str(err)) from err
        session.bar.update()
        return _Answer(answer.p_yes, answer.p_no, answer.missing_variant, answer.absent, reason, resent)

    # ---- requests -------------------------------------------------------------------------------

    async def _post(self, session: "_Session", body: dict) -> dict:
        body = {"model": self.model, "temperature": self.temperature, **body, **self.extra_body}
        async with session.requests:
            try:
                return await apost_json(session.client, f"{self.base_url}/chat/completions", body,
                                        headers=auth_headers(self.api_key), policy=self.policy)
            except HTTPStatusError as err:
                hint = refusal_hint(err.status, err.body, body)
                if hint is None:
                    raise
                raise FingerError(f"{err}; {hint}") from err

    async def _reread(self, session: "_Session", messages: list[dict], assistant_text: str) -> list[dict]:
        """The top-K list after `assistant_text`, continued as the final assistant message: the answer position."""
        reply = await self._post(session, {
            "messages": messages + [{"role": "assistant", "content": assistant_text}], "max_tokens": 1,
            "logprobs": True, "top_logprobs": self.top_logprobs, "continue_final_message": True,
            "add_generation_prompt": False,
        })
        return _logprob_entries(reply)[0]["top_logprobs"]


@dataclass
class _Session:
    """What one `answer_many` call shares: the connection pool, the in-flight bounds and the progress bar."""

    client: object
    requests: asyncio.Semaphore
    videos: asyncio.Semaphore
    bar: tqdm


def chat_messages(question: str, mode: str, clip: Clip, video_urls: list[str]) -> list[dict]:
    """prompts.build_messages with each video block as an OpenAI-style `video_url` block, in order."""
    messages = prompts.build_messages(question, mode, clip)
    urls = iter(video_urls)
    messages[-1]["content"] = [{"type": "video_url", "video_url": {"url": next(urls)}} if part["type"] == "video" else part
                               for part in messages[-1]["content"]]
    return messages


def video_data_urls(clip: Clip, codec: str = "lossless") -> list[str]:
    """Each video the model is given (the clip, or its SlowFast pathways) as an mp4 data URL.

    A video's frame rate is the one the local engine tells the processor: the clip's, or for a
    pathway its mean rate, so the server derives the same temporal positions from the file. An odd
    frame count is padded as transformers pads it (`server_inputs.pad_frames`).
    """
    return ["data:video/mp4;base64," + base64.b64encode(encode_frames(pad_frames(frames), fps, codec)).decode("ascii")
            for (frames, _), fps in zip(clip.videos, video_rates(clip))]


def load_processor(processor):
    """A processor object as given, or loaded from a checkpoint directory (or "tiny", the shipped evaluator)."""
    if processor is None or not isinstance(processor, (str, Path)):
        return processor
    from transformers import AutoProcessor

    from finger_reward import pretrained

    return AutoProcessor.from_pretrained(str(pretrained.resolve(str(processor))))


def check_prompt_tokens(reply: dict, expected: int, clip: Clip, top_logprobs: int) -> None:
    """Fail unless the server's `usage.prompt_tokens` equals the local processor's count for the same prompt."""
    got = (reply.get("usage") or {}).get("prompt_tokens") if isinstance(reply, dict) else None
    if not isinstance(got, int):
        raise InputMismatch("the server reported no usage.prompt_tokens, so its inputs cannot be checked against "
                            "local scoring; drop processor= to score without the check")
    if got != expected:
        raise InputMismatch(mismatch_message(got, expected, clip, top_logprobs))


def _choice(reply: dict) -> dict:
    try:
        return reply["choices"][0]
    except (KeyError, IndexError, TypeError):
        raise ValueError(f"malformed chat-completions response: {str(reply)[:300]!r}") from None


def _logprob_entries(reply: dict) -> list[dict]:
    """The per-token log-probability entries of the reply's generated tokens."""
    try:
        entries = _choice(reply)["logprobs"]["content"]
        if entries and all("top_logprobs" in e and "token" in e for e in entries):
            return entries
    except (KeyError, TypeError):
        pass
    raise ValueError("the server returned no top log-probabilities; it must support logprobs=true with "
                     f"top_logprobs (vLLM, SGLang do); got {str(reply)[:300]!r}")


def _nonempty(top: list[dict]) -> list[dict]:
    if not top:
        raise ValueError("the server returned an empty top_logprobs list")
    return top


def _run(coroutine):
    """Run a coroutine to completion from sync code, also when the caller is inside an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()
