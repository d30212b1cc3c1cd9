"""The reward service on Ray Serve: a real local Ray (2 CPUs), real HTTP on 127.0.0.1, tiny model."""

import base64
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests import serve_checks
from tests.serve_checks import corrupt_video_fails_alone
from finger_reward.serve import FingerRewardClient, ServeConfig

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`"),  # inside Ray Serve's config
]

PROMPTS = ["a red circle moves right", "a blue square stays still", "a dog runs"]
AUTH = {"Authorization": "Bearer secret"}


def test_import_does_not_import_ray():
    code = "import sys, finger_reward.serve.ray_app; assert 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, process=None, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process is None or process.poll() is None, "the server exited"
        try:
            if httpx.get(f"{url}/v1/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not become healthy in {timeout} s")


@pytest.fixture(scope="module")
def bank_path(tmp_path_factory):
    return serve_checks.write_bank(tmp_path_factory.mktemp("ray") / "bank.jsonl", PROMPTS)


@pytest.fixture(scope="module")
def allowed_dir(tmp_path_factory, mp4_paths):
    root = tmp_path_factory.mktemp("allowed")
    (root / "clip.mp4").write_bytes(mp4_paths[0].read_bytes())
    return root


@pytest.fixture(scope="module")
def direct(tiny_model_dir, bank_path, mp4_paths):
    """Expected results, computed without the service."""
    return serve_checks.direct_scores(tiny_model_dir, bank_path, mp4_paths, PROMPTS)


@pytest.fixture(scope="module")
def url(tiny_model_dir, bank_path, allowed_dir):
    ray = pytest.importorskip("ray")
    from finger_reward.serve.ray_app import run_ray, shutdown_ray

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        config = ServeConfig(model=str(tiny_model_dir), questions=str(bank_path), port=port, replicas=1,
                             num_cpus_per_replica=0.5, token="secret", allow_path=str(allowed_dir), max_wait_ms=20)
        yield run_ray(config, blocking=False)
    finally:
        shutdown_ray()


# Runs before the module's cluster starts (fixtures start on first use), so two clusters never share the 2 cores.
def test_cli_serve_on_ray_and_sigterm(tiny_model_dir, bank_path, mp4_paths, direct, tmp_path):
    port = free_port()
    command = [sys.executable, "-m", "finger_reward.cli", "serve", "--model", str(tiny_model_dir),
               "--questions", str(bank_path), "--port", str(port), "--replicas", "1"]
    with open(tmp_path / "log.txt", "w+") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_healthy(url, process)
            assert_same(FingerRewardClient(url).score([mp4_paths[1]], PROMPTS[0])[0], direct[(str(mp4_paths[1]), PROMPTS[0])])
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=60) == 0
        finally:
            if process.poll() is None:
                process.kill()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/v1/health")


def assert_same(got, want):
    serve_checks.assert_same(got, want, tol=1e-5)


def client(url):
    return FingerRewardClient(url, token="secret", backoff=0.05)


def test_client_equals_direct_scoring(url, direct, mp4_paths):
    got = client(url).score(mp4_paths, PROMPTS[0])
    for path, result in zip(mp4_paths, got):
        assert result.video == str(path)
        assert_same(result, direct[(str(path), PROMPTS[0])])


def test_concurrent_requests_each_get_their_own_result(url, direct, mp4_paths):
    jobs = [([mp4_paths[i % 3], mp4_paths[(i + 1) % 3]], PROMPTS[i % 3]) for i in range(16)]
    shared = client(url)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda job: shared.score(*job), jobs))
    for (paths, prompt), results in zip(jobs, answers):
        assert len(results) == 2
        for path, result in zip(paths, results):
            assert result.prompt == prompt
            assert_same(result, direct[(str(path), prompt)])
    metrics = httpx.get(f"{url}/metrics", headers=AUTH).text
    assert 'finger_requests_total{status="200"}' in metrics
    assert 'finger_batch_size_bucket{le="1.0"} ' in metrics and batched_videos(metrics) > 0


def batched_videos(metrics: str) -> int:
    """How many batches held more than one video, from the Prometheus text."""
    counts = dict(line.rsplit(" ", 1) for line in metrics.splitlines() if line.startswith("finger_batch_size_"))
    return int(float(counts["finger_batch_size_count"])) - int(float(counts['finger_batch_size_bucket{le="1.0"}']))


def test_corrupt_video_fails_alone(url, direct, mp4_paths):
    corrupt_video_fails_alone(client(url), url, "secret", mp4_paths, direct, PROMPTS[1], PROMPTS[2],
                              junk=bytes(range(256)) * 20, n_good=4, tol=1e-5)


def test_token_required(url):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        response = httpx.post(f"{url}/v1/score", headers=headers, json={"videos": ["AAAA"], "prompts": "p"})
        assert response.status_code == 401 and "token" in response.json()["error"]["message"]


def test_paths_only_inside_the_allowed_directory(url, allowed_dir, direct, mp4_paths):
    def by_path(path):
        return httpx.post(f"{url}/v1/score", headers=AUTH, timeout=60,
                          json={"videos": [{"path": str(path)}], "prompts": PROMPTS[0]})

    for outside in ("../x.mp4", "/etc/passwd"):
        response = by_path(outside)
        assert response.status_code == 403 and "outside the allowed directory" in response.json()["error"]["message"]
    inside = by_path("clip.mp4")
    assert inside.status_code == 200
    assert inside.json()["results"][0]["overall"] == pytest.approx(direct[(str(mp4_paths[0]), PROMPTS[0])].overall, abs=1e-5)


def test_health_and_metrics(url):
    health = httpx.get(f"{url}/v1/health").json()
    assert health["status"] == "ok" and health["max_payload_bytes"] == 256 * 2**20
    assert health["sampling"] == {"fps": 2.0, "max_frames": 48, "max_pixels": 200704, "patch_factor": 28,
                                  "slowfast": None}  # each replica reports how it samples, as the one-process server
    assert client(url).health() == health
    assert httpx.get(f"{url}/metrics").status_code == 401  # the token guards the metrics too
    assert httpx.get(f"{url}/openapi.json", headers=AUTH).json()["components"]["schemas"]["ScoreRequest"]
    text = httpx.get(f"{url}/metrics", headers=AUTH).text
    for name in ("finger_requests_total", "finger_batch_size_bucket", "finger_queue_depth",
                 'finger_videos_total{outcome="scored"}'):
        assert name in text


def test_overload_503_then_client_retries(url, tiny_model_dir, bank_path, direct, mp4_paths):
    """Redeploys the app with a one-request queue (last test: it replaces the module's service)."""
    from ray import serve

    from finger_reward.serve.ray_app import APP_NAME, build_deployment

    config = ServeConfig(model=str(tiny_model_dir), questions=str(bank_path), replicas=1, num_cpus_per_replica=0.5,
                         max_batch_size=1, max_queue=1)
    serve.run(build_deployment(config), name=APP_NAME, route_prefix="/")
    body = {"videos": [base64.b64encode(mp4_paths[2].read_bytes()).decode()], "prompts": PROMPTS[2]}
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda _: httpx.post(f"{url}/v1/score", json=body, timeout=60).status_code, range(8)))
    assert 503 in statuses and 200 in statuses
    patient = FingerRewardClient(url, backoff=0.05, max_retries=20)
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda _: patient.score([mp4_paths[2]], PROMPTS[2])[0], range(6)))
    for result in results:
        assert_same(result, direct[(str(mp4_paths[2]), PROMPTS[2])])
