"""Answer probabilities from an OpenAI-compatible server (vLLM, SGLang) that hosts the FingER model.

    engine = OpenAIEngine("http://gpu-box:8000/v1", "finger-qwen2.5-vl-7b")
    reward = FingerReward(engine, questions="bank.jsonl")

Each question is one chat-completions request with the local engine's messages (prompts.py:
system turn, then the video, then the question), greedy, asking for `logprobs` with
`top_logprobs=K`; Eq. 1 is then applied to the Yes/No spellings among the top K
(top_logprobs.py). In reason mode a first request generates the reason, stopping where the local
engine stops (at `</reason>` or `<answer>`), and a second continues the assistant message closed
the way the local engine closes it (`continue_final_message`, vLLM and SGLang) for one token.

The video goes as a `video_url` block holding a `data:video/mp4;base64,...` URL: vLLM takes it
(checked against its docs and media loader, which base64-decodes data URLs and reads the file with
its video backend); SGLang's chat API takes `video_url` blocks too (data URLs not checked here).
What is sent is the clip's sampled frames re-encoded at the sampled frame rate, not the original
file: the server then sees the frames, size and fps the local engine uses, so `fps`, `max_frames`
and `max_pixels` mean the same; a SlowFast clip goes as its two pathway videos between the same
text markers (prompts.video_blocks), each at its mean frame rate, as the local engine gives them
to the processor. Frames are encoded losslessly by default; `video_codec="h264"` sends far fewer
bytes, at the cost of exactness. On the server, keep every frame sent (vLLM samples 32 frames
unless started with `--media-io-kwargs '{"video": {"num_frames": -1}}'`) and a pixel range that
holds the clip's frame size (Qwen2.5-VL's video processor: 128*28*28 to 768*28*28), or pass
`mm_processor_kwargs` in `extra_body`; the frames already lie on the patch grid.

Prefix caching is the server's job (vLLM `--enable-prefix-caching`): every request for a video
carries identical video bytes after the identical system text, and a video's first question is
sent alone before the rest, so the others find its prefix cached. All requests share one httpx
connection pool, at most `concurrency` in flight; 429/5xx answers and timeouts are retried with
back-off (chat_http.py).
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction

import torch
from tqdm.auto import tqdm

from finger_reward import prompts
from finger_reward.chat_http import RetryPolicy, apost_json, auth_headers, resolve_endpoint
from finger_reward.engine.top_logprobs import answer_from_top_logprobs
from finger_reward.engine.reasoning import closing_tags, extract_reason
from finger_reward.engine.transformers_backend import Answers
from finger_reward.errors import FingerError
from finger_reward.video import PATCH_FACTOR, Clip

logger = logging.getLogger(__name__)

VIDEO_CODECS = ("lossless", "h264")


class AnswerError(FingerError):
    """A question about a video could not be answered by the server; names both."""

    def __init__(self, video: str, question: str, problem: str):
        self.video, self.question = video, question
        super().__init__(f"video {video}: question {question!r}: {problem}")


@dataclass(frozen=True)
class _Answer:
    p_yes: float
    p_no: float
    missing_variant: str | None
    reason: str | None


class OpenAIEngine:
    """The engine interface of `FingerReward` (`answer`, `answer_many`, `patch_factor`) over HTTP.

    `model` is the model's name at the endpoint. `top_logprobs` is K (OpenAI and vLLM's default
    limit is 20). A question whose Yes or No spellings are all outside the top K keeps the
    probability from the set present and is flagged (`Answers.missing_variant`); one with
    neither fails its video. `extra_body` is merged into every request (e.g. vLLM's
    `mm_processor_kwargs`). `patch_factor` is 28 for Qwen2.5-VL, 32 for Qwen3-VL.
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
        top_logprobs: int = 20,
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
        self.patch_factor, self.warm_prefix = patch_factor, warm_prefix
        self.extra_body, self.progress = dict(extra_body or {}), progress

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
                first = [await self._ask(session, clip, urls, questions[0])] if self.warm_prefix else []
                rest = await asyncio.gather(*(self._ask(session, clip, urls, q) for q in questions[len(first):]),
                                            return_exceptions=True)
            except Exception as err:
                return err
        errors = [r for r in rest if isinstance(r, BaseException)]
        if errors:
            return errors[0]
        answers = first + list(rest)
        flags = [a.missing_variant for a in answers]
        for question, flag in zip(questions, flags):
            if flag:
                logger.warning("video %s: no %s spelling in the top %d tokens for %r; its probability comes from the "
                               "other set alone", clip.name, flag.capitalize(), self.top_logprobs, question)
        return Answers(torch.tensor([[a.p_yes, a.p_no] for a in answers], dtype=torch.float32),
                       [a.reason for a in answers] if self.mode == "reason" else None,
                       flags if any(flags) else None)

    async def _ask(self, session: "_Session", clip: Clip, urls: list[str], question: str) -> _Answer:
        messages = chat_messages(question, self.mode, clip, urls)
        try:
            reason = None
            if self.mode == "reason":
                text, close = await self._reason(session, messages)
                reason = extract_reason(text)
                messages = messages + [{"role": "assistant", "content": text + close}]
            top = await self._answer_logprobs(session, messages)
            answer = answer_from_top_logprobs(top)
        except Exception as err:
            raise AnswerError(clip.name, question, str(err)) from err
        session.bar.update()
        return _Answer(answer.p_yes, answer.p_no, answer.missing_variant, reason)

    # ---- requests -------------------------------------------------------------------------------

    async def _post(self, session: "_Session", body: dict) -> dict:
        async with session.requests:
            return await apost_json(session.client, f"{self.base_url}/chat/completions",
                                    {"model": self.model, "temperature": self.temperature, **body, **self.extra_body},
                                    headers=auth_headers(self.api_key), policy=self.policy)

    async def _answer_logprobs(self, session: "_Session", messages: list[dict]) -> list[dict]:
        """The top-K list at the next token: the answer position."""
        body = {"messages": messages, "max_tokens": 1, "logprobs": True, "top_logprobs": self.top_logprobs}
        if messages[-1]["role"] == "assistant":
            body.update(continue_final_message=True, add_generation_prompt=False)
        reply = await self._post(session, body)
        try:
            top = _choice(reply)["logprobs"]["content"][0]["top_logprobs"]
        except (KeyError, IndexError, TypeError):
            raise ValueError("the server returned no top log-probabilities; it must support logprobs=true with "
                             f"top_logprobs (vLLM, SGLang do); got {str(reply)[:300]!r}") from None
        if not top:
            raise ValueError("the server returned an empty top_logprobs list")
        return top

    async def _reason(self, session: "_Session", messages: list[dict]) -> tuple[str, str]:
        """The generated reason text, and what closes it so the next token is the answer (as the local engine)."""
        stops = [prompts.REASON_CLOSE, prompts.ANSWER_OPEN]
        reply = await self._post(session, {"messages": messages, "max_tokens": self.max_new_tokens, "stop": stops})
        choice = _choice(reply)
        text = (choice.get("message") or {}).get("content") or ""
        # vLLM reports the stop string it matched as stop_reason, SGLang as matched_stop.
        return text, closing(text, choice.get("stop_reason", choice.get("matched_stop")))


@dataclass
class _Session:
    """What one `answer_many` call shares: the connection pool, the in-flight bounds and the progress bar."""

    client: object
    requests: asyncio.Semaphore
    videos: asyncio.Semaphore
    bar: tqdm


def closing(text: str, matched_stop) -> str:
    """What follows a generated reason so that the next token is the answer, as in the local engine.

    Servers trim the stop string they matched (`matched_stop`): after `<answer>` it is put back;
    after `</reason>`, running out of tokens or an end-of-turn token, `</reason><answer>` follows.
    Text that still ends with a stop string needs only what is missing.
    """
    if matched_stop == prompts.ANSWER_OPEN and not text.endswith(prompts.ANSWER_OPEN):
        return prompts.ANSWER_OPEN
    return closing_tags(text)


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
    pathway its mean rate, so the server derives the same temporal positions from the file.
    """
    urls = []
    for frames, meta in clip.videos:
        fps = meta["fps"] * len(meta["frames_indices"]) / meta["total_num_frames"]
        urls.append("data:video/mp4;base64," + base64.b64encode(encode_frames(frames, fps, codec)).decode("ascii"))
    return urls


def encode_frames(frames: torch.Tensor, fps: float, codec: str = "lossless") -> bytes:
    """uint8 frames (T, C, H, W) as mp4 bytes: lossless RGB H.264 (libx264rgb, crf 0), or H.264 4:2:0 at crf 18.

    The frame rate is stored as a fraction (denominator <= 1000), so 2 fps or 16/9 fps read back exactly.
    """
    import av

    array = frames.permute(0, 2, 3, 1).contiguous().numpy()
    name, pix_fmt, crf = ("libx264rgb", "rgb24", "0") if codec == "lossless" else ("libx264", "yuv420p", "18")
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream(name, rate=Fraction(fps).limit_denominator(1000))
        stream.height, stream.width, stream.pix_fmt = array.shape[1], array.shape[2], pix_fmt
        stream.options = {"crf": crf, "preset": "ultrafast"}
        for frame in array:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def _choice(reply: dict) -> dict:
    try:
        return reply["choices"][0]
    except (KeyError, IndexError, TypeError):
        raise ValueError(f"malformed chat-completions response: {str(reply)[:300]!r}") from None


def _run(coroutine):
    """Run a coroutine to completion from sync code, also when the caller is inside an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()
