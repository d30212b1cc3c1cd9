"""The batched reward service in one process: real uvicorn on 127.0.0.1, real HTTP, tiny model."""

import base64
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from finger_reward import FingerReward, VideoError
from finger_reward.serve import Batcher, FingerRewardClient, QueueFull, ServeConfig, ServiceError
from finger_reward.serve.local import LocalServer
from finger_reward.serve.telemetry import Telemetry
from tests import serve_checks
from tests.serve_checks import assert_same, corrupt_video_fails_alone

PROMPTS = ["a red circle moves right", "a blue square stays still", "a dog runs", "a cat sleeps"]


@pytest.fixture(scope="module")
def bank_path(tmp_path_factory):
    return serve_checks.write_bank(tmp_path_factory.mktemp("serve") / "bank.jsonl", PROMPTS)


@pytest.fixture(scope="module")
def reward(tiny_model_dir, bank_path):
    return FingerReward.from_pretrained(tiny_model_dir, questions=bank_path)


@pytest.fixture(scope="module")
def allowed_dir(tmp_path_factory, mp4_paths):
    root = tmp_path_factory.mktemp("allowed")
    (root / "clip.mp4").write_bytes(mp4_paths[0].read_bytes())
    (root / "escape.mp4").symlink_to(mp4_paths[1])  # a link pointing outside the directory
    return root


@pytest.fixture(scope="module")
def server(tiny_model_dir, bank_path, allowed_dir):
    reward = FingerReward.from_pretrained(tiny_model_dir, questions=bank_path)
    config = ServeConfig(port=0, token="secret", allow_path=str(allowed_dir), max_wait_ms=5)
    with LocalServer(reward, config) as running:
        yield running


@pytest.fixture(scope="module")
def direct(reward, mp4_paths):
    """Expected results, computed without the service."""
    return {(str(p), prompt): reward.score([p], prompt)[0] for p in mp4_paths for prompt in PROMPTS}


def client(server, **kw):
    return FingerRewardClient(server.url, token="secret", **{"backoff": 0.05, **kw})


def test_client_equals_direct_scoring(server, reward, mp4_paths):
    frames = torch.rand(5, 3, 56, 84, generator=torch.Generator().manual_seed(0))
    videos = [mp4_paths[0], mp4_paths[1].read_bytes(), frames]
    got = client(server).score(videos, PROMPTS[:3])
    want = reward.score(videos, PROMPTS[:3])
    for g, w in zip(got, want):
        assert_same(g, w)
    assert got[0].video == str(mp4_paths[0]) and got[2].video == "#2"
    assert client(server)(videos, PROMPTS[:3]) == pytest.approx([w.overall for w in want], abs=1e-6)


def test_64_concurrent_requests_each_answered_once(server, mp4_paths, direct):
    jobs = [(mp4_paths[i % 3], PROMPTS[i % 4]) for i in range(64)]
    before = server.api.telemetry.requests.get(200, 0)
    shared = client(server, videos_per_request=1)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda job: shared.score([job[0]], job[1])[0], jobs))
    for (path, prompt), result in zip(jobs, results):
        assert result.prompt == prompt
        assert_same(result, direct[(str(path), prompt)])
    assert server.api.telemetry.requests.get(200, 0) - before == 64
    telemetry = server.api.telemetry  # some batch held more than one video
    assert telemetry.value("finger_batch_size_count") > telemetry.value("finger_batch_size_bucket", le="1.0")


def test_corrupt_video_fails_alone(server, mp4_paths, direct):
    corrupt_video_fails_alone(client(server), server.url, "secret", mp4_paths, direct, PROMPTS[0], PROMPTS[1],
                              junk=b"\x00not a video" * 50, n_good=6)


def test_bad_requests_name_the_problem(server):
    headers = {"Authorization": "Bearer secret"}
    post = lambda body: httpx.post(f"{server.url}/v1/score", headers=headers, content=body)  # noqa: E731
    assert post(b"{not json").json()["error"]["message"].startswith("body is not valid JSON")
    cases = [
        ({"videos": []}, 'with "videos" and "prompts"'),
        ({"videos": [], "prompts": "p"}, "non-empty list"),
        ({"videos": ["AAAA", "AAAA"], "prompts": ["p"]}, "list of 2 strings"),
        ({"videos": ["%%%"], "prompts": "p"}, "video #0: not valid base64"),
        ({"videos": [{"npy": "AAAA"}], "prompts": "p"}, 'video #0: "npy" is not a .npy array'),
        ({"videos": [{"data": "AAAA", "path": "x"}], "prompts": "p"}, "video #0: expected"),
    ]
    for body, message in cases:
        response = httpx.post(f"{server.url}/v1/score", headers=headers, json=body)
        assert response.status_code == 400 and message in response.json()["error"]["message"], body
    missing = httpx.post(f"{server.url}/v1/score", headers=headers,
                         json={"videos": [base64.b64encode(b"x").decode()], "prompts": "a prompt nobody asked"})
    assert missing.status_code == 400
    assert httpx.get(f"{server.url}/v1/nothing").status_code == 404
    assert httpx.get(f"{server.url}/v1/score").status_code == 405


def test_token_required(server, mp4_paths):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        response = httpx.post(f"{server.url}/v1/score", headers=headers, json={"videos": ["AAAA"], "prompts": "p"})
        assert response.status_code == 401 and "token" in response.json()["error"]["message"]
    with pytest.raises(ServiceError, match="HTTP 401"):
        FingerRewardClient(server.url, token="wrong").score([mp4_paths[0]], PROMPTS[0])
    assert httpx.get(f"{server.url}/v1/health").json()["status"] == "ok"  # health needs no token


def test_paths_only_inside_the_allowed_directory(server, allowed_dir, direct, mp4_paths):
    headers = {"Authorization": "Bearer secret"}

    def by_path(path):
        return httpx.post(f"{server.url}/v1/score", headers=headers, json={"videos": [{"path": str(path)}], "prompts": PROMPTS[0]})

    inside = by_path("clip.mp4")
    assert inside.status_code == 200
    assert inside.json()["results"][0]["overall"] == pytest.approx(direct[(str(mp4_paths[0]), PROMPTS[0])].overall, abs=1e-6)
    assert by_path(allowed_dir / "clip.mp4").status_code == 200
    for outside in ("../clip.mp4", "/etc/passwd", "escape.mp4", str(mp4_paths[1])):
        response = by_path(outside)
        assert response.status_code == 403 and "outside the allowed directory" in response.json()["error"]["message"]
    sent_by_path = client(server, send_paths=True).score([allowed_dir / "clip.mp4"], PROMPTS[0])[0]
    assert sent_by_path.ok


def test_health_and_metrics(server, reward):
    health = httpx.get(f"{server.url}/v1/health").json()
    assert health == {"status": "ok", "sampling": reward.sampling(), "max_payload_bytes": 256 * 2**20}
    assert health["sampling"] == {"fps": 2.0, "max_frames": 48, "max_pixels": 200704, "patch_factor": 28,
                                  "slowfast": None}  # the tiny evaluator's finger_reward.json
    assert httpx.get(f"{server.url}/metrics").status_code == 401  # a server with a token guards its metrics
    text = httpx.get(f"{server.url}/metrics", headers={"Authorization": "Bearer secret"}).text
    for name in ("finger_requests_total", "finger_batch_size_bucket", "finger_request_latency_seconds_count",
                 "finger_queue_depth", 'finger_videos_total{outcome="scored"}', "finger_batch_latency_seconds_bucket"):
        assert name in text
    assert 'finger_request_latency_seconds_bucket{le="120.0"}' in text  # buckets for seconds-long scoring


def test_openapi_and_docs_describe_the_video_forms(server, small_server):
    assert httpx.get(f"{server.url}/openapi.json").status_code == 401  # every route but health needs the token
    assert httpx.get(f"{server.url}/docs").status_code == 401
    schema = httpx.get(f"{small_server.url}/openapi.json").json()
    body = schema["paths"]["/v1/score"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/ScoreRequest"}
    forms = schema["components"]["schemas"]["ScoreRequest"]["properties"]["videos"]["items"]["anyOf"]
    refs = {form.get("$ref", form.get("type")) for form in forms}
    for form in ("DataVideo", "NpyVideo", "PathVideo"):
        assert f"#/components/schemas/{form}" in refs
        assert schema["components"]["schemas"][form]["description"]
    assert "VideoResult" in schema["components"]["schemas"] and "/v1/health" in schema["paths"]
    docs = httpx.get(f"{small_server.url}/docs")
    assert docs.status_code == 200 and "/openapi.json" in docs.text


@pytest.fixture(scope="module")
def small_server(tiny_model_dir, bank_path):
    reward = FingerReward.from_pretrained(tiny_model_dir, questions=bank_path)
    with LocalServer(reward, ServeConfig(port=0, max_queue=1, max_payload_mb=0.05, max_batch_size=1)) as running:
        yield running


def test_payload_limit_413(small_server, mp4_paths):
    big = {"videos": [base64.b64encode(os.urandom(80_000)).decode()], "prompts": PROMPTS[0]}
    response = httpx.post(f"{small_server.url}/v1/score", json=big)
    assert response.status_code == 413 and "over the limit" in response.json()["error"]["message"]
    # the client never sends what the service would refuse: that video fails alone, before sending
    careful = FingerRewardClient(small_server.url, on_error="nan")
    too_big, fine = careful.score([os.urandom(80_000), mp4_paths[1]], PROMPTS[0])
    assert "over the service's limit of 52428 bytes" in too_big.error and "#0 (bytes)" in too_big.error
    assert fine.ok and careful.stats.requests == 1
    assert FingerRewardClient(small_server.url).score([mp4_paths[1]], PROMPTS[0])[0].ok


def test_full_queue_429_then_client_retries(small_server, mp4_paths):
    body = {"videos": [base64.b64encode(mp4_paths[2].read_bytes()).decode()], "prompts": PROMPTS[2]}
    with ThreadPoolExecutor(6) as pool:
        statuses = list(pool.map(lambda _: httpx.post(f"{small_server.url}/v1/score", json=body).status_code, range(6)))
    assert 429 in statuses and 200 in statuses
    patient = FingerRewardClient(small_server.url, backoff=0.05, max_retries=20)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: patient.score([mp4_paths[2]], PROMPTS[2])[0], range(4)))
    assert all(r.ok for r in results) and len({round(r.overall, 6) for r in results}) == 1
    assert httpx.get(f"{small_server.url}/v1/health").status_code == 200


def test_client_unreachable_and_pickling(mp4_paths):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = FingerRewardClient(f"http://127.0.0.1:{port}", max_retries=1, backoff=0.01)
    with pytest.raises(ServiceError, match="cannot reach the service"):
        dead.score([mp4_paths[0]], PROMPTS[0])
    clone = pickle.loads(pickle.dumps(dead))
    assert clone.url == dead.url and clone.__name__ == "finger_reward"
    with pytest.raises(ServiceError, match="cannot reach the service"):  # sampling needs the server's settings
        dead.score([torch.zeros(5, 3, 56, 56)], PROMPTS[0])


def test_client_gives_up_on_a_closed_port_within_2_seconds(mp4_paths):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    dead = FingerRewardClient(f"http://127.0.0.1:{port}")  # default retries and back-off
    start = time.monotonic()
    with pytest.raises(ServiceError) as caught:
        dead.score([mp4_paths[0]], PROMPTS[0])
    assert time.monotonic() - start < 2.0
    message = str(caught.value)
    assert f"127.0.0.1:{port}" in message and "finger-reward serve" in message and "\n" not in message


def test_client_decode_errors_name_the_file(server, tmp_path, mp4_paths):
    junk = tmp_path / "holiday.mp4"
    junk.write_text("not a video, just text\n")
    results = client(server, on_error="nan").score([junk, mp4_paths[0]], PROMPTS[0])
    assert str(junk) in results[0].error and "not a video file" in results[0].error, results[0].error
    assert results[1].ok


def test_a_plain_path_string_gets_a_hint_of_the_path_form(server):
    response = httpx.post(f"{server.url}/v1/score", headers={"Authorization": "Bearer secret"},
                          json={"videos": ["videos/clip.mp4"], "prompts": PROMPTS[0]})
    message = response.json()["error"]["message"]
    assert response.status_code == 400 and "not valid base64" in message
    assert '{"path": "videos/clip.mp4"}' in message and "--allow-path" in message


def test_client_bad_frames_fail_alone(server, reward, mp4_paths):
    results = client(server, on_error="nan").score([torch.zeros(3, 4, 5), mp4_paths[0]], PROMPTS[0])
    assert "3 dims" in results[0].error and "#0" in results[0].error
    assert_same(results[1], reward.score([mp4_paths[0]], PROMPTS[0])[0])


# ---- the in-process batcher and FingerReward.submit ---------------------------------------------------

def test_submit_futures_equal_score(reward, mp4_paths, direct):
    futures = [reward.submit(p, PROMPTS[i % 4]) for i, p in enumerate(mp4_paths)]
    bad = reward.submit(b"garbage bytes", PROMPTS[0])
    for i, (path, future) in enumerate(zip(mp4_paths, futures)):
        assert_same(future.result(timeout=60), direct[(str(path), PROMPTS[i % 4])])
    with pytest.raises(VideoError, match="cannot be decoded"):
        bad.result(timeout=60)
    reward.close()


def test_batcher_token_budget_and_queue(reward, mp4_paths):
    jobs = reward.prepare([mp4_paths[0]], [PROMPTS[0]])
    budget = jobs[0].tokens * 2  # two videos fit in a batch, a third does not
    with Batcher(reward, max_batch_size=8, max_batch_tokens=budget, max_wait_ms=200, max_queue=6,
                 telemetry=Telemetry()) as batcher:
        futures = batcher.submit_many([mp4_paths[0]] * 6, [PROMPTS[0]] * 6)
        with pytest.raises(QueueFull, match="6 of 6"):
            batcher.submit(mp4_paths[0], PROMPTS[0], block=False)
        assert all(f.result(timeout=60).ok for f in futures)
        sizes = batcher.telemetry
        assert sizes.value("finger_batch_size_count") >= 3 and sizes.value("finger_batch_size_sum") == 6
        assert sizes.value("finger_batch_size_bucket", le="2.0") == sizes.value("finger_batch_size_count")  # none above 2
        with pytest.raises(QueueFull, match="more than the whole queue"):
            batcher.submit_many([mp4_paths[0]] * 7, [PROMPTS[0]] * 7)


# ---- `finger-reward serve` as a process -------------------------------------------------------------

def test_cli_serve_and_sigterm(tiny_model_dir, bank_path, mp4_paths):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "finger_reward.cli", "serve", "--model", str(tiny_model_dir),
                                "--questions", str(bank_path), "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                if httpx.get(f"{url}/v1/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        assert FingerRewardClient(url).score([mp4_paths[0]], PROMPTS[0])[0].ok
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert "serving" in process.stderr.read()


def test_serve_config_from_yaml(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text("port: 9001\nmax_batch_size: 4\n")
    config = ServeConfig.from_yaml(path, port=9002, token=None)
    assert (config.port, config.max_batch_size, config.host) == (9002, 4, "127.0.0.1")
    path.write_text("prot: 1\n")
    with pytest.raises(ValueError, match="unknown key.*prot.*valid keys"):
        ServeConfig.from_yaml(path)


def test_client_close_and_reopen(server, mp4_paths):
    with client(server) as c:
        first = c.score([mp4_paths[0]], PROMPTS[0])[0]
        pool = c._http
        c.score(mp4_paths, PROMPTS[0])  # several threads, one connection pool
        assert c._http is pool and not pool.is_closed
    assert pool.is_closed and c._http is None
    assert c.score([mp4_paths[0]], PROMPTS[0])[0].overall == pytest.approx(first.overall)
    c.close()


def test_access_log_one_line_per_request_without_the_body(server, mp4_paths, caplog):
    data = base64.b64encode(mp4_paths[0].read_bytes()).decode()
    with caplog.at_level("INFO", logger="finger_reward.serve.access"):
        response = httpx.post(f"{server.url}/v1/score", headers={"Authorization": "Bearer secret"},
                              json={"videos": [data, data], "prompts": PROMPTS[0]})
        assert response.status_code == 200
        httpx.get(f"{server.url}/v1/nothing")
    lines = [r.getMessage() for r in caplog.records if r.name == "finger_reward.serve.access"]
    assert len(lines) == 2, lines
    assert lines[0].startswith("POST /v1/score 200 videos=2 ") and "client=127.0.0.1:" in lines[0]
    assert lines[1].startswith("GET /v1/nothing 404 videos=0 ")
    assert data[:64] not in "".join(lines) and PROMPTS[0] not in "".join(lines)
