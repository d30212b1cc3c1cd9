"""The reward service on Ray Serve under faults: one of 2 CPU replicas SIGKILLed while 16 clients send a steady
stream, and a retry that lands on the other replica answered from the shared result store. Real local Ray (2 CPUs),
real HTTP on 127.0.0.1, tiny model. Waits for readiness and recovery with generous timeouts, never fixed sleeps.
The store's own rules (TTL, bounds, conflicts, working without it) are checked in process, without Ray."""

import asyncio
import base64
import os
import signal
import socket
import threading
import time

import httpx
import pytest

from finger_reward.serve.api import RequestError, ResultCache
from finger_reward.serve.ray_cache import ResultStore, SharedResults
from finger_reward.serve import FingerRewardClient, ServeConfig
from tests import serve_checks

pytestmark = pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`")  # Ray Serve's config

PROMPTS = ["a red circle moves right", "a blue square stays still"]
CLIENTS = 16


class InProcess:
    """A `ResultStore` called as a Serve `DeploymentHandle` is (`handle.get.remote(...)`, awaited), in this process."""

    def __init__(self, store: ResultStore | None):
        self.store = store

    def __getattr__(self, method: str):
        return type("Method", (), {"remote": staticmethod(getattr(self.store, method))})


def test_store_keeps_the_first_answer_within_its_ttl_and_bounds(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr("finger_reward.serve.ray_cache.time.monotonic", lambda: clock[0])
    store = ResultStore(ttl_s=10, max_entries=3, max_bytes=10)
    run = asyncio.run
    assert run(store.put("a", b"d", b"1234")) and not run(store.put("a", b"d", b"5678"))  # the first answer stays
    assert run(store.get("a", b"d")) == ("hit", b"1234") and run(store.get("a", b"x")) == ("conflict", None)
    assert run(store.put("b", b"d", b"12345")) and run(store.put("c", b"d", b"12"))  # 11 bytes: "a" goes
    assert run(store.get("a", b"d")) == ("miss", None) and run(store.get("b", b"d"))[0] == "hit"
    assert not run(store.put("big", b"d", b"x" * 11))  # larger than the whole store: not kept
    clock[0] = 10.0  # ttl_s later
    assert run(store.get("b", b"d")) == ("miss", None)
    assert run(store.stats()) == {"entries": 0, "bytes": 0, "hit": 2, "conflict": 1, "miss": 2, "stored": 3,
                                  "duplicates": 1, "too_large": 1, "evicted": 1, "expired": 2}
    with pytest.raises(ValueError, match="ttl_s > 0"):
        ResultStore(ttl_s=0)


def test_shared_results_answer_another_replicas_request_without_scoring():
    """Two replicas' caches over one store: the second answers the first's key from the store; a key reused for
    another body is 422 there too; with no store reachable a replica still scores and answers."""
    scored = []

    def scoring(answer):
        async def run():
            scored.append(answer)
            return 200, {"results": [answer, float("nan")]}, 2
        return run

    async def main():
        store = InProcess(ResultStore())
        first, second = (SharedResults(ResultCache(300, 16), store) for _ in range(2))
        status, payload, videos = await first.get_or_run("k", b"d", scoring("a"))
        assert (status, payload["results"][0], videos) == (200, "a", 2)
        assert await second.get_or_run("k", b"d", scoring("b")) == (200, {"results": ["a", None]}, 2)  # NaN: null
        assert scored == ["a"] and (first.hits, second.hits) == (0, 1)
        await second.get_or_run("k2", b"d", scoring("c"))
        with pytest.raises(RequestError) as conflict:
            await first.get_or_run("k2", b"x", scoring("d"))
        assert conflict.value.status == 422 and scored == ["a", "c"]
        alone = SharedResults(ResultCache(300, 16), InProcess(None), timeout_s=1)  # nothing to call
        assert (await alone.get_or_run("k", b"d", scoring("e")))[0] == 200 and scored[-1] == "e"

    asyncio.run(main())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout: float, what: str, every: float = 0.2):
    """Poll `condition` until it returns something true; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout} s")


@pytest.fixture(scope="module")
def bank_path(tmp_path_factory):
    return serve_checks.write_bank(tmp_path_factory.mktemp("ray_faults") / "bank.jsonl", PROMPTS)


@pytest.fixture(scope="module")
def direct(tiny_model_dir, bank_path, mp4_paths):
    """Expected results, computed without the service."""
    return serve_checks.direct_scores(tiny_model_dir, bank_path, mp4_paths, PROMPTS)


@pytest.fixture(scope="module")
def url(tiny_model_dir, bank_path, direct):
    """Two CPU replicas of the tiny evaluator (and their result store) on a local Ray with 2 CPUs."""
    ray = pytest.importorskip("ray")
    from finger_reward.serve.ray_app import replica_pids, run_ray, shutdown_ray

    ray.init(num_cpus=2, include_dashboard=False)
    try:
        config = ServeConfig(model=str(tiny_model_dir), questions=str(bank_path), port=free_port(), replicas=2,
                             num_cpus_per_replica=0.5, max_wait_ms=20)
        url = run_ray(config, blocking=False)  # returns once both replicas are up
        wait_for(lambda: len(replica_pids()) == 2, 120, "two live replica processes")
        yield url
    finally:
        shutdown_ray()


def store_stats() -> dict:
    from ray import serve

    from finger_reward.serve.ray_app import APP_NAME, STORE

    return serve.get_deployment_handle(STORE, app_name=APP_NAME).stats.remote().result(timeout_s=60)


@pytest.mark.slow
def test_retry_on_the_other_replica_is_answered_from_the_shared_store(url, direct, mp4_paths):
    """The same Idempotency-Key sent again until Ray Serve routes it to the replica that did not score it: that
    replica answers from the store (a store hit) instead of scoring it again (a second `put`, counted)."""
    body = {"videos": [base64.b64encode(mp4_paths[1].read_bytes()).decode()], "prompts": PROMPTS[0]}
    headers = {"Idempotency-Key": "shared-store-test"}
    before = store_stats()
    first = httpx.post(f"{url}/v1/score", json=body, headers=headers, timeout=120)
    assert first.status_code == 200
    got = FingerRewardClient(url).score([mp4_paths[1]], PROMPTS[0])[0]  # the client's reading of the same answer
    serve_checks.assert_same(got, direct[(str(mp4_paths[1]), PROMPTS[0])], tol=1e-5)

    def answered_by_the_other_replica():
        again = httpx.post(f"{url}/v1/score", json=body, headers=headers, timeout=120)
        assert again.status_code == 200 and again.json() == first.json()
        return store_stats().get("hit", 0) > before.get("hit", 0)

    # Each repeat goes to either replica (Ray Serve's choice): the chance of 60 missing the other is 2**-60.
    wait_for(answered_by_the_other_replica, 120, "a repeat routed to the other replica", every=0)
    after = store_stats()
    assert after.get("duplicates", 0) == before.get("duplicates", 0)  # not scored a second time
    assert after["stored"] - before.get("stored", 0) == 2  # this key and the client's own request, once each
    reused = httpx.post(f"{url}/v1/score", json={**body, "prompts": PROMPTS[1]}, headers=headers, timeout=120)
    assert reused.status_code == 422 and "shared-store-test" in reused.json()["error"]["message"]


class Load:
    """`CLIENTS` threads, each with its own `FingerRewardClient` (retries on), scoring one video per request until
    stopped; every request is recorded by id (client, sequence number) when sent and again when it ends."""

    def __init__(self, url: str, mp4_paths):
        self.url, self.paths = url, mp4_paths
        self.sent, self.ended, self.retried = {}, {}, []
        self.lock, self.stop = threading.Lock(), threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(c,), daemon=True) for c in range(CLIENTS)]

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=300)

    def _client(self, c: int) -> None:
        client = FingerRewardClient(self.url, backoff=0.2, max_retries=8, on_error="nan")
        n = 0
        while not self.stop.is_set():
            job = (str(self.paths[(c + n) % 3]), PROMPTS[(c + n) % 2])
            with self.lock:
                self.sent[(c, n)] = job
            try:
                outcome = client.score([job[0]], job[1])[0]
            except Exception as err:  # noqa: BLE001 - a lost request is what the test counts
                outcome = err
            with self.lock:
                self.ended[(c, n)] = outcome
                self.retried.extend(client.stats.retried)
            n += 1

    def answered(self) -> int:
        with self.lock:
            return len(self.ended)


@pytest.mark.slow
def test_killed_replica_every_request_answered_once_and_replica_restored(url, direct, mp4_paths):
    from ray import serve

    from finger_reward.serve.ray_app import APP_NAME, DEPLOYMENT, replica_pids

    victim, survivor = replica_pids()
    before = store_stats()
    with Load(url, mp4_paths) as load:
        wait_for(lambda: load.answered() >= 2 * CLIENTS, 180, "answers flowing from all clients")
        os.kill(victim, signal.SIGKILL)

        def restored():
            pids = replica_pids()
            running = serve.status().applications[APP_NAME].deployments[DEPLOYMENT].replica_states.get("RUNNING")
            return len(pids) == 2 and victim not in pids and survivor in pids and running == 2

        wait_for(restored, 180, "Ray Serve restarting the killed replica", every=0.5)
        restored_at = load.answered()
        wait_for(lambda: load.answered() >= restored_at + 2 * CLIENTS, 180, "answers after the restart")
    assert not any(thread.is_alive() for thread in load.threads), "a client is still waiting for an answer"

    assert load.ended.keys() == load.sent.keys()  # none lost: every request sent has ended, once (checked there)
    failed = {key: o for key, o in load.ended.items() if isinstance(o, Exception) or not o.ok}
    assert not failed, f"{len(failed)} of {len(load.sent)} requests failed, e.g. {next(iter(failed.values()))}"
    for key, result in load.ended.items():
        serve_checks.assert_same(result, direct[load.sent[key]], tol=1e-5)
    # The kill hit requests in flight (16 clients keep both replicas busy): Ray Serve answered those with a plain 500,
    # and the client sent them again.
    assert any("HTTP 500" in problem for problem in load.retried), load.retried
    after = store_stats()  # every request's key stored once: none scored-and-answered twice
    assert after["stored"] - before.get("stored", 0) == len(load.sent)
    assert after.get("duplicates", 0) == before.get("duplicates", 0)
