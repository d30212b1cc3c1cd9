"""A real chat-completions server on 127.0.0.1 that answers with a tiny Qwen2.5-VL and true log-probabilities.

It does with a request what vLLM does: decodes each `video_url` data URL (every frame, at the
file's frame rate), renders the messages with the model's chat template (`continue_final_message`
ends the prompt right after the final assistant text), decodes greedily up to `max_tokens`,
cutting at `stop` strings, and returns each generated token's `top_logprobs` from the full
log-softmax, with token strings decoded one token at a time. Test knobs: `failures` (scripted
HTTP errors per question, `chat_server.Status`, the last step repeating, None for a real
answer), `delay` (seconds each request is held, to observe concurrency) and `logprobs=False`
(a server that ignores the logprobs request).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import threading
import time

import numpy as np
import torch

from finger_reward.engine.transformers_backend import _append_text_tokens
from tests.chat_server import JSONHandler, LoopbackServer, Status


class LogprobServer(LoopbackServer):
    """Start with `with LogprobServer(model, processor) as server:`; `server.url` is the OpenAI-style base URL."""

    def __init__(self, model, processor, *, failures: dict[str, list] | None = None, delay: float = 0.0,
                 logprobs: bool = True):
        self.model, self.processor, self.tokenizer = model, processor, processor.tokenizer
        self.failures, self.delay, self.logprobs = failures or {}, delay, logprobs
        self.requests: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self.lock, self.model_lock = threading.Lock(), threading.Lock()
        self._listen(self._handler())

    def count(self, question: str) -> int:
        return sum(r["question"] == question for r in self.requests)

    # ---- the model ------------------------------------------------------------------------------

    def next_logprobs(self, messages: list[dict], continue_final: bool = False) -> torch.Tensor:
        """Full log-softmax over the vocabulary at the next position (the answer position)."""
        with self.model_lock, torch.inference_mode():
            return self._logprobs(self._inputs(messages, continue_final))

    def _logprobs(self, inputs) -> torch.Tensor:
        return self.model(**inputs, logits_to_keep=1).logits[0, -1].float().log_softmax(-1)

    def _inputs(self, messages: list[dict], continue_final: bool):
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
        return self.processor(text=[text], videos=[v for v, _ in videos], video_metadata=[m for _, m in videos],
                              do_sample_frames=False, do_resize=False, return_tensors="pt")

    @staticmethod
    def _take_video(part: dict, videos: list) -> dict:
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
        t, h, w = frames.shape[:3]
        metadata = {"total_num_frames": t, "fps": fps, "frames_indices": list(range(t)), "height": h, "width": w}
        videos.append((torch.from_numpy(frames).permute(0, 3, 1, 2), metadata))
        return {"type": "video"}

    def complete(self, body: dict) -> dict:
        """A chat.completion answer for `body`, computed with the model."""
        continue_final = bool(body.get("continue_final_message"))
        max_tokens, stops = int(body.get("max_tokens") or 16), list(body.get("stop") or [])
        k = int(body.get("top_logprobs") or 0) if body.get("logprobs") and self.logprobs else None
        eos = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        generated, entries, finish, matched = [], [], "length", None
        with self.model_lock, torch.inference_mode():
            inputs = self._inputs(body["messages"], continue_final)
            for _ in range(max_tokens):
                logprobs = self._logprobs(inputs)
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
                inputs = _append_text_tokens(inputs, [token])
        text = self.tokenizer.decode(generated, skip_special_tokens=True)
        if matched:
            text = text[: text.index(matched)]
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                  "stop_reason": matched, "logprobs": {"content": entries} if k is not None else None}
        return {"id": "chatcmpl-tiny", "object": "chat.completion", "model": body["model"], "choices": [choice]}

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
                except Exception as err:  # a bad request: say why, as a server would
                    code, payload, headers = 500, {"error": {"message": repr(err)}}, {}
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
                    return step.code, {"error": {"message": "scripted failure"}}, headers
                if int(body.get("top_logprobs") or 0) > len(server.tokenizer):
                    return 400, {"error": {"message": "top_logprobs exceeds the vocabulary"}}, {}
                return 200, server.complete(body), {}

        return Handler
