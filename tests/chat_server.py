"""A real chat-completions HTTP server on 127.0.0.1 that replays scripted LLM replies.

Each prompt (the last user turn, "Prompt: ...") has a script: a list of steps used one per
request, the last one repeating. A step is a reply text, `Status(code, retry_after)` for an
HTTP error, or `Slow(seconds, text)` for a reply that arrives late.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Status:
    code: int
    retry_after: float | None = None
    message: str = "scripted failure"  # the error body's message


@dataclass
class Slow:
    seconds: float
    text: str


class LoopbackServer:
    """A ThreadingHTTPServer on 127.0.0.1 (at a free port unless given), served from a daemon thread inside `with`."""

    def _listen(self, handler: type, host: str = "127.0.0.1", port: int = 0) -> None:
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.url = f"http://{host}:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


class JSONHandler(BaseHTTPRequestHandler):
    """Quiet request handler that answers with JSON."""

    def log_message(self, *args):
        pass

    def _send(self, code, payload, headers=None):
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client timed out and left


class ChatServer(LoopbackServer):
    """Start with `with ChatServer(scripts) as server:`; `server.url` is the OpenAI-style base URL."""

    def __init__(self, scripts: dict[str, list], default: str = "I am not sure what you mean."):
        self.scripts, self.default = scripts, default
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self._listen(self._handler())

    def count(self, prompt: str) -> int:
        return sum(r["prompt"] == prompt for r in self.requests)

    def _next_step(self, prompt: str):
        with self.lock:
            seen = self.count(prompt)
            self.requests.append({"prompt": prompt})
        script = self.scripts.get(prompt, [self.default])
        return script[min(seen, len(script) - 1)]

    def _handler(self):
        server = self

        class Handler(JSONHandler):
            def do_POST(self):
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][-1]["content"].removeprefix("Prompt: ")
                step = server._next_step(prompt)
                server.requests[-1].update(auth=self.headers.get("Authorization"), body=body)
                if isinstance(step, Status):
                    headers = {"Retry-After": str(step.retry_after)} if step.retry_after is not None else {}
                    return self._send(step.code, {"error": {"message": step.message}}, headers)
                if isinstance(step, Slow):
                    time.sleep(step.seconds)
                    step = step.text
                reply = {"id": "chatcmpl-test", "object": "chat.completion", "model": body["model"],
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": step}}]}
                self._send(200, reply)

        return Handler
