"""Throughput of the HTTP reward service against direct batched scoring, measured in one process.

    python benchmarks/service.py                          # small random Qwen2.5-VL, 32 clients
    python benchmarks/service.py --model PATH --clients 32 --videos 128

Direct: `FingerReward.score(videos, prompts)` on all videos at once. Service: the same
FingerReward behind `LocalServer` on 127.0.0.1, `--clients` threads each sending one video
per request with `FingerRewardClient` (as RL workers do). Prints the median videos/s of both over
alternating runs, their ratio, and the service's p50/p99 request latency (last run).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
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
    args = parser.parse_args()

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


if __name__ == "__main__":
    main()
