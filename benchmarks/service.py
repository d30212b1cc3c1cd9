"""Throughput of the HTTP reward service against direct batched scoring, measured in one process.

    python benchmarks/service.py                          # small random Qwen2.5-VL, 32 clients
    python benchmarks/service.py --model PATH --clients 32 --videos 128
    python benchmarks/service.py --soak 120 [--model PATH] [--soak-clients 64]
    python benchmarks/service.py --ray --kill-replica [--clients 16] [--kill-after 10] [--run-after 10]

Direct: `FingerReward.score(videos, prompts)` on all videos at once. Service: the same
FingerReward behind `LocalServer` on 127.0.0.1, `--clients` threads each sending one video
per request with `FingerRewardClient` (as RL workers do). Prints the median videos/s of both over
alternating runs, their ratio, and the service's p50/p99 request latency (last run).

Then, for `--wan-clips` Wan-size clips (81x480x832 uint8 at 16 fps; a smooth panning scene, and
the same with +-8 noise as a hard case for compression), one request each way: bytes on the wire
per clip against the raw base64 .npy the client used to send (the baseline, encoded in this
process), and the client's preparation time (sample, resize, compress) beside the request time
(scoring) per clip, with the largest difference from in-process scores of the same arrays.

`--soak SECONDS` instead starts a real `finger-reward serve` process on 127.0.0.1 and sends mixed
requests from `--soak-clients` threads for that long: good videos, corrupt videos (each must fail
alone, the rest of its request scored) and malformed bodies (400). It prints throughput, p50/p99
latency, the outcomes by kind, and the server process's resident memory (VmRSS, and its peak
VmHWM) after warm-up and at the end, so a leak shows as growth.

`--ray --kill-replica` deploys the service on a local Ray (`--ray-cpus`, default 2) with 2 CPU replicas, sends a
steady stream of one-video requests from `--clients` threads (each its own `FingerRewardClient`, retries on), and
after `--kill-after` seconds SIGKILLs one replica's process. It prints requests sent, answered (with the direct
score), retried (and why), failed, lost; the seconds until Ray Serve runs 2 replicas again; requests/s before the
kill, until recovery and after it (ratios against before); and the shared result store's counts (a duplicate is a
request scored twice).
"""

from __future__ import annotations

import argparse
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from finger_reward import FingerReward, Question
from finger_reward.engine import TransformersEngine, default_device_dtype
from finger_reward.questions import DIMENSIONS
from finger_reward.serve import FingerRewardClient, ServeConfig
from finger_reward.serve.local import LocalServer
from finger_reward.synthetic import write_video
from finger_reward.tiny import build_model, build_processor


def make_videos(root: Path, count: int, size: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        blocks = rng.integers(0, 256, size=(16, size // 16, size // 16, 3), dtype=np.uint8)
        paths.append(write_video(blocks.repeat(16, 1).repeat(16, 2), root / f"v{i}.mp4", fps=8))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint (default: random model of --hidden/--layers)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--videos", type=int, default=96)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each path; medians are printed")
    parser.add_argument("--wan-clips", type=int, default=4, help="Wan-size clips for the transport figures (0: skip)")
    parser.add_argument("--soak", type=float, default=0, help="seconds of mixed load on a `finger-reward serve` process")
    parser.add_argument("--soak-clients", type=int, default=64)
    parser.add_argument("--ray", action="store_true", help="run on a local Ray Serve (with --kill-replica)")
    parser.add_argument("--kill-replica", action="store_true", help="SIGKILL one of 2 replicas under load")
    parser.add_argument("--ray-cpus", type=int, default=2)
    parser.add_argument("--kill-after", type=float, default=10, help="seconds of load before the kill")
    parser.add_argument("--run-after", type=float, default=10, help="seconds of load after recovery")
    args = parser.parse_args()
    if args.ray != args.kill_replica:
        parser.error("--ray and --kill-replica go together: the Ray run is the killed-replica drill")
    if args.soak:
        return soak(args)
    if args.kill_replica:
        return kill_replica(args)

    prompt = "a red circle moves from left to right"
    questions = [Question(prompt, DIMENSIONS[i % 5], "red circle", f"Question {i} about the red circle?", i % 2 == 0)
                 for i in range(args.questions)]
    if args.model:
        engine = TransformersEngine.from_pretrained(args.model)
    else:
        device, dtype = default_device_dtype()
        processor = build_processor()
        engine = TransformersEngine(build_model(processor.tokenizer, hidden_size=args.hidden, num_layers=args.layers).to(device, dtype), processor)
    reward = FingerReward(engine, questions=questions, max_pixels=args.size * args.size)

    with tempfile.TemporaryDirectory() as tmp:
        videos = make_videos(Path(tmp), args.videos, args.size)
        reward.score(videos[:2], prompt)  # warm-up
        config = ServeConfig(port=0, max_batch_size=args.max_batch_size, max_queue=4 * args.clients)
        with LocalServer(reward, config) as server:
            client = FingerRewardClient(server.url, videos_per_request=1)
            client.score(videos[:2], prompt)  # warm-up

            def one(video):
                t = time.perf_counter()
                result = client.score([video], prompt)[0]
                return time.perf_counter() - t, result

            # Alternate the two paths so that drift on a shared machine hits both alike.
            direct_rates, service_rates = [], []
            for _ in range(args.repeats):
                start = time.perf_counter()
                direct = reward.score(videos, prompt)
                direct_rates.append(len(videos) / (time.perf_counter() - start))
                start = time.perf_counter()
                with ThreadPoolExecutor(args.clients) as pool:
                    timed = list(pool.map(one, videos))
                service_rates.append(len(videos) / (time.perf_counter() - start))
    direct_rate, service_rate = statistics.median(direct_rates), statistics.median(service_rates)

    latencies = sorted(t for t, _ in timed)
    worst = max(abs(r.overall - d.overall) for (_, r), d in zip(timed, direct))
    print(f"device={engine.device} videos={len(videos)} questions/video={args.questions} clients={args.clients} "
          f"size={args.size} max_batch_size={args.max_batch_size}")
    print(f"direct batched : {direct_rate:8.2f} videos/s (median of {args.repeats})")
    print(f"service (HTTP) : {service_rate:8.2f} videos/s   p50 {statistics.median(latencies) * 1000:.0f} ms   "
          f"p99 {latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1000:.0f} ms")
    print(f"ratio          : {service_rate / direct_rate:8.2f}   max |overall difference| = {worst:.1e}")
    if args.wan_clips:
        at_default = FingerReward(engine, questions=questions)  # the default sampling: 2 fps, 448x448 pixels
        wan_size(at_default, prompt, args.wan_clips, args.max_batch_size)


def wan_clip(seed: int, noise: int, frames: int = 81, height: int = 480, width: int = 832) -> np.ndarray:
    """uint8 (frames, H, W, 3): a smooth random scene panning 2 px a frame, plus uniform noise of +-`noise`."""
    import torch

    g = torch.Generator().manual_seed(seed)
    field = torch.nn.functional.interpolate(torch.rand(1, 3, 24, 40, generator=g), mode="bicubic",
                                            size=(height + 2 * frames, width + 2 * frames), align_corners=False)
    field = (field.clamp(0, 1) * 255)[0].permute(1, 2, 0).numpy()
    video = np.stack([field[2 * t: 2 * t + height, 2 * t: 2 * t + width] for t in range(frames)])
    if noise:
        video = video + np.random.default_rng(seed).integers(-noise, noise + 1, size=video.shape)
    return np.clip(np.rint(video), 0, 255).astype(np.uint8)


def wan_size(reward, prompt: str, count: int, max_batch_size: int) -> None:
    """Wan-size clips through the client in one request: bytes per clip, preparation and scoring time."""
    import base64
    import io

    print(f"\nWan-size clips (81x480x832 uint8 at 16 fps), {count} per request, server sampling {reward.sampling()}")
    config = ServeConfig(port=0, max_batch_size=max(max_batch_size, count))
    with LocalServer(reward, config) as server:
        client = FingerRewardClient(server.url, videos_per_request=count)
        for label, noise in (("smooth scene", 0), ("scene + noise", 8)):
            videos = [wan_clip(seed, noise) for seed in range(count)]
            start = time.perf_counter()
            buffer = io.BytesIO()
            np.save(buffer, videos[0], allow_pickle=False)
            raw = len(base64.b64encode(buffer.getvalue()))
            raw_s = time.perf_counter() - start
            scores = client.score(videos, prompt, video_fps=16)
            stats = client.stats
            direct = reward.score(videos, prompt, video_fps=16)
            worst = max(abs(a.overall - b.overall) for a, b in zip(scores, direct))
            print(f"{label:14}: {stats.bytes_sent / count / 1e6:7.2f} MB/clip on the wire vs {raw / 1e6:.1f} MB raw "
                  f".npy base64 ({raw / (stats.bytes_sent / count):.0f}x fewer); {stats.requests} request(s); "
                  f"{scores[0].sampled['frames']} frames at {scores[0].sampled['width']}x{scores[0].sampled['height']}")
            print(f"{'':14}  client preparation {stats.prepare_s / count * 1000:6.0f} ms/clip (raw .npy encoding "
                  f"{raw_s * 1000:.0f} ms), request incl. scoring {stats.request_s / count * 1000:6.0f} ms/clip "
                  f"(preparation/request {stats.prepare_s / stats.request_s:.2f}); max |overall difference| {worst:.1e}")


# ---- soak --------------------------------------------------------------------------------------------------


def _memory(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MB, from /proc (Linux)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return tuple(int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_server(model: str, port: int) -> subprocess.Popen:
    import httpx

    server = subprocess.Popen([sys.executable, "-m", "finger_reward.cli", "serve", "--model", model, "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.5)
    server.kill()
    raise SystemExit("the server did not become healthy in 120 s")


def soak(args) -> None:
    """Mixed good and bad requests from many clients against a real server process; outcomes, latency, memory."""
    import httpx

    from finger_reward.tiny import make_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(make_tiny_model(Path(tmp) / "model"))
        good = make_videos(Path(tmp), 8, 64)
        corrupt = Path(tmp) / "corrupt.mp4"
        corrupt.write_bytes(b"\x00not a video" * 64)
        port = _free_port()
        server = _start_server(model, port)
        url = f"http://127.0.0.1:{port}"
        try:
            client = FingerRewardClient(url, videos_per_request=2, on_error="nan")
            client.score(good[:2], "a red circle moves")  # warm-up
            start_memory = _memory(server.pid)
            outcomes, latencies, lock = Counter(), [], threading.Lock()
            stop = time.perf_counter() + args.soak

            def worker(seed: int) -> None:
                rng, session = random.Random(seed), httpx.Client(timeout=600)
                own = FingerRewardClient(url, videos_per_request=2, on_error="nan")
                while time.perf_counter() < stop:
                    kind = rng.choices(["good", "corrupt", "malformed"], weights=[6, 2, 1])[0]
                    t = time.perf_counter()
                    try:
                        if kind == "malformed":
                            code = session.post(f"{url}/v1/score", content=b"{not json").status_code
                            outcome = f"malformed: HTTP {code}"
                        else:
                            videos = [rng.choice(good), corrupt if kind == "corrupt" else rng.choice(good)]
                            scores = own.score(videos, "a red circle moves")
                            ok = [s.ok for s in scores]
                            outcome = f"{kind}: " + ("scored" if all(ok) else "bad video failed alone" if ok == [True, False]
                                                      else f"unexpected {ok}")
                    except Exception as err:  # counted by kind; a soak must not stop at the first error
                        outcome = f"{kind}: {type(err).__name__}"
                    with lock:
                        outcomes[outcome] += 1
                        latencies.append(time.perf_counter() - t)

            threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.soak_clients)]
            began = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            elapsed = time.perf_counter() - began
            end_memory = _memory(server.pid)
        finally:
            server.terminate()
            server.wait(timeout=120)
    latencies.sort()
    total = sum(outcomes.values())
    print(f"soak: {args.soak:.0f} s, {args.soak_clients} clients, server `finger-reward serve --model "
          f"{args.model or 'tiny random'}` on 127.0.0.1")
    print(f"requests: {total} in {elapsed:.1f} s = {total / elapsed:.2f}/s; latency p50 "
          f"{statistics.median(latencies) * 1000:.0f} ms, p99 {latencies[min(total - 1, int(0.99 * total))] * 1000:.0f} ms")
    for outcome, count in sorted(outcomes.items()):
        print(f"  {outcome:<40} {count}")
    print(f"server memory after warm-up: RSS {start_memory[0]:.0f} MB (peak {start_memory[1]:.0f} MB); "
          f"at the end: RSS {end_memory[0]:.0f} MB (peak {end_memory[1]:.0f} MB)")


# ---- a killed Ray Serve replica ---------------------------------------------------------------------------


def _ray_load(url: str, clients: int, jobs: list, expected: dict, stop: threading.Event) -> tuple[list, list]:
    """Threads scoring one video per request until `stop`: (request records, threads). A record is
    [sent_at, ended_at, outcome, retried problems]; outcome is "answered", "wrong", "failed: ..." or None (no end)."""
    records, lock = [], threading.Lock()

    def worker(c: int) -> None:
        client = FingerRewardClient(url, backoff=0.2, max_retries=8, on_error="nan")
        n = c
        while not stop.is_set():
            video, prompt = jobs[n % len(jobs)]
            record = [time.perf_counter(), None, None, []]
            with lock:
                records.append(record)
            try:
                result = client.score([video], prompt)[0]
                good = result.ok and abs(result.overall - expected[video, prompt]) <= 1e-5
                outcome = "answered" if good else "wrong" if result.ok else f"failed: {result.error}"
            except Exception as err:  # counted; the drill must not stop at the first error
                outcome = f"failed: {type(err).__name__}: {err}"
            record[1:] = time.perf_counter(), outcome, list(client.stats.retried)
            n += clients

    threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in range(clients)]
    for thread in threads:
        thread.start()
    return records, threads


def kill_replica(args) -> None:
    """2 replicas under steady load, one SIGKILLed: every request's end, the recovery time, the store's counts."""
    import os
    import signal

    import ray
    from ray import serve

    from finger_reward.serve.ray_app import APP_NAME, DEPLOYMENT, STORE, replica_pids, run_ray, shutdown_ray
    from finger_reward.tiny import make_tiny_model

    prompts = ["a red circle moves right", "a blue square stays still"]
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(make_tiny_model(Path(tmp) / "model"))
        videos = [str(v) for v in make_videos(Path(tmp), 4, 64)]
        direct = FingerReward.from_pretrained(model)
        expected = {(v, p): direct.score([v], p)[0].overall for v in videos for p in prompts}
        ray.init(num_cpus=args.ray_cpus, include_dashboard=False)
        try:
            url = run_ray(ServeConfig(model=model, port=_free_port(), replicas=2, num_cpus_per_replica=0.5),
                          blocking=False)
            FingerRewardClient(url).score(videos[:2], prompts[0])  # warm-up
            victim, survivor = replica_pids()
            stop = threading.Event()
            records, threads = _ray_load(url, args.clients, list(expected), expected, stop)
            start = time.perf_counter()
            time.sleep(args.kill_after)
            os.kill(victim, signal.SIGKILL)
            killed = time.perf_counter()
            while True:  # recovered: a new replica process is up and Serve reports 2 running
                pids = replica_pids()
                states = serve.status().applications[APP_NAME].deployments[DEPLOYMENT].replica_states
                if len(pids) == 2 and victim not in pids and states.get("RUNNING") == 2:
                    break
                time.sleep(0.2)
            recovered = time.perf_counter()
            time.sleep(args.run_after)
            stop.set()
            for thread in threads:
                thread.join(timeout=600)
            end = time.perf_counter()
            store = serve.get_deployment_handle(STORE, app_name=APP_NAME).stats.remote().result()
        finally:
            shutdown_ray()

    outcomes = Counter(r[2] or "no answer (lost)" for r in records)
    reasons = Counter(problem for r in records for problem in r[3])

    def rate(a: float, b: float) -> float:  # requests that ended in [a, b), per second
        return sum(1 for r in records if r[1] is not None and a <= r[1] < b) / (b - a)

    before, during, after = rate(start, killed), rate(killed, recovered), rate(recovered, end)
    print(f"killed replica: Ray Serve on a local Ray ({args.ray_cpus} CPUs), 2 replicas of "
          f"{args.model or 'the tiny random model'}, {args.clients} clients, one video per request; "
          f"SIGKILL after {args.kill_after:.0f} s")
    print(f"requests sent {len(records)}, answered {outcomes['answered']}, retried "
          f"{sum(1 for r in records if r[3])} ({sum(reasons.values())} attempts sent again), failed "
          f"{sum(n for o, n in outcomes.items() if o.startswith('failed'))}, wrong score {outcomes['wrong']}, "
          f"lost {outcomes['no answer (lost)']}")
    for reason, count in reasons.most_common():
        print(f"  retried after {reason!r}: {count}")
    for outcome, count in outcomes.items():
        if outcome.startswith("failed"):
            print(f"  {outcome}: {count}")
    print(f"seconds to recovery (2 replicas running, the killed one replaced): {recovered - killed:.1f}")
    print(f"requests/s before the kill {before:.1f}, until recovery {during:.1f} ({during / before:.2f}x), "
          f"after {after:.1f} ({after / before:.2f}x)")
    print(f"result store: {store.get('stored', 0)} answers stored (one per key, warm-up included), "
          f"{store.get('hit', 0)} retries answered from it on the other replica, "
          f"{store.get('duplicates', 0)} requests scored twice; {store}")


if __name__ == "__main__":
    main()
