"""The service under faults, on 127.0.0.1: a connection dropped after scoring, SIGTERM with requests in flight."""

import base64
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from finger_reward import FingerReward
from finger_reward.serve import FingerRewardClient, ServeConfig
from finger_reward.serve.local import LocalServer
from tests import serve_checks
from tests.serve_checks import assert_same

PROMPTS = ["a red circle moves right", "a blue square stays still"]


@pytest.fixture(scope="module")
def bank_path(tmp_path_factory):
    return serve_checks.write_bank(tmp_path_factory.mktemp("faults") / "bank.jsonl", PROMPTS)


@pytest.fixture(scope="module")
def reward(tiny_model_dir, bank_path):
    return FingerReward.from_pretrained(tiny_model_dir, questions=bank_path)


class DroppingProxy:
    """A TCP relay to `upstream` that reads the server's first `drop` answers to a POST in full and then closes the
    client's connection instead of passing them on: the request was scored, the caller never heard."""

    def __init__(self, upstream: tuple[str, int], drop: int = 1):
        self.upstream, self.drop, self.dropped = upstream, drop, 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(conn,), daemon=True).start()

    def _relay(self, conn):
        with conn, socket.create_connection(self.upstream) as server:
            while True:
                request = _read_message(conn)
                if request is None:
                    return
                server.sendall(request)
                answer = _read_message(server)
                if request.startswith(b"POST") and self.dropped < self.drop:
                    self.dropped += 1
                    return  # closes the client's connection with the answer unsent
                conn.sendall(answer)

    def close(self):
        self.listener.close()


def _read_message(sock) -> bytes | None:
    """One HTTP/1.1 message with a Content-Length body, or None when the peer closed."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def test_retry_after_a_dropped_answer_is_not_scored_twice(reward, mp4_paths):
    with LocalServer(reward, ServeConfig(port=0, max_wait_ms=5)) as server:
        proxy = DroppingProxy(server.server.servers[0].sockets[0].getsockname()[:2])
        try:
            scored = server.api.telemetry.videos_scored
            client = FingerRewardClient(proxy.url, backoff=0.05)
            got = client.score(mp4_paths[:2], PROMPTS[0])
            assert proxy.dropped == 1 and client.stats.requests == 1
            for path, result in zip(mp4_paths, got):
                assert_same(result, reward.score([path], PROMPTS[0])[0])
            assert server.api.telemetry.videos_scored - scored == 2  # scored once, answered twice
            assert server.api.results.hits == 1
            assert server.api.telemetry.requests[200] == 2

            # The same drop without the id: the retry is scored again, which is what the cache prevents.
            body = {"videos": [{"data": base64.b64encode(mp4_paths[2].read_bytes()).decode()}], "prompts": PROMPTS[1]}
            proxy.drop, scored = 2, server.api.telemetry.videos_scored  # one more drop
            with pytest.raises(httpx.TransportError):
                httpx.post(f"{proxy.url}/v1/score", json=body, timeout=60)
            assert httpx.post(f"{proxy.url}/v1/score", json=body, timeout=60).status_code == 200
            assert server.api.telemetry.videos_scored - scored == 2
            # An id is for one body: reused for another, 422; refusals (here 403) are not kept, retries are judged afresh.
            keyed = {"Idempotency-Key": "k1"}
            assert httpx.post(f"{server.url}/v1/score", json=body, headers=keyed, timeout=60).status_code == 200
            other = httpx.post(f"{server.url}/v1/score", json={**body, "prompts": PROMPTS[0]}, headers=keyed, timeout=60)
            assert other.status_code == 422 and "k1" in other.json()["error"]["message"]
            refused = {"videos": [{"path": "x.mp4"}], "prompts": "p"}
            for _ in range(2):
                assert httpx.post(f"{server.url}/v1/score", json=refused, headers={"Idempotency-Key": "k2"}).status_code == 403
            assert server.api.results.hits == 1
        finally:
            proxy.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def received_videos(url: str) -> float:
    """Videos the server holds or has scored, from its metrics."""
    lines = httpx.get(f"{url}/metrics").text.splitlines()
    values = dict(line.rsplit(" ", 1) for line in lines if not line.startswith("#"))
    return float(values["finger_queue_depth"]) + float(values['finger_videos_total{outcome="scored"}'])


def test_sigterm_drains_requests_in_flight(tiny_model_dir, bank_path, reward, mp4_paths, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "finger_reward.cli", "serve", "--model", str(tiny_model_dir),
               "--questions", str(bank_path), "--port", str(port)]
    with open(tmp_path / "log.txt", "w+") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 90
            while time.time() < deadline and process.poll() is None:
                try:
                    if httpx.get(f"{url}/v1/health").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.3)
            client = FingerRewardClient(url, max_retries=0, concurrency=6)  # no retry hides a lost answer; 12 connections
            client.health()
            jobs = [list(mp4_paths) for _ in range(12)]  # 36 videos, seconds of scoring on 2 cores
            with ThreadPoolExecutor(len(jobs)) as pool:
                answers = [pool.submit(client.score, videos, PROMPTS[i % 2]) for i, videos in enumerate(jobs)]
                while received_videos(url) < 36:  # every request received: now stop the server
                    time.sleep(0.01)
                assert not any(a.done() for a in answers)
                process.send_signal(signal.SIGTERM)
                time.sleep(0.5)
                assert process.poll() is None, "exited without finishing its requests"
                with pytest.raises(httpx.ConnectError):  # stopped accepting while it drains
                    httpx.get(f"{url}/v1/health")
                results = [a.result(timeout=120) for a in answers]
            assert process.wait(timeout=60) == 0
        finally:
            if process.poll() is None:
                process.kill()
        log.seek(0)
        text = log.read()
    for i, got in enumerate(results):
        for path, result in zip(mp4_paths, got):
            assert_same(result, reward.score([path], PROMPTS[i % 2])[0], tol=1e-5)
    assert text.count("POST /v1/score 200 videos=3") == len(jobs), text[-2000:]
