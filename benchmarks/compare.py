"""Two-video comparison (`FingerReward.compare`) cost, measured in one process against scoring the two videos alone.

    python benchmarks/compare.py                        # random small Qwen2.5-VL, CPU or GPU
    python benchmarks/compare.py --model PATH --seconds 5 --size 448

Per pair, with the five dimension questions: the baseline answers five questions about each video
alone (what `score` costs for the two videos); then the comparison asked in one order, in both
orders (compare's default), and one order through the plain one-question-per-forward loop (the
reference the shared two-video prefix must equal). Prints ms per pair (CPU: the process's CPU
time, so other work on a shared machine does not count), ratios to the baseline and the largest
P(A) difference between the shared prefix and the plain loop.
"""

from __future__ import annotations

import argparse
import time

import torch

from finger_reward import prompts
from finger_reward.engine import TransformersEngine, default_device_dtype
from finger_reward.preference import pair_max_frames
from finger_reward.questions.record import DIMENSIONS
from finger_reward.tiny import build_model, build_processor
from finger_reward.video import load_video


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint directory or hub id (default: random model of --hidden/--layers)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=4.0, help="clip length, sampled at 2 fps")
    parser.add_argument("--size", type=int, default=224, help="frame height and width in pixels")
    parser.add_argument("--max-frames", type=int, default=48, help="the reward's max_frames (a pair gets half per video)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device")
    args = parser.parse_args()

    device, dtype = default_device_dtype(args.device)
    if args.model:
        engine = TransformersEngine.from_pretrained(args.model, device=device, dtype=dtype)
        model, processor = engine.model, engine.processor
    else:
        processor = build_processor()
        model = build_model(processor.tokenizer, hidden_size=args.hidden, num_layers=args.layers).to(device, dtype)
    engine = TransformersEngine(model, processor)
    plain = TransformersEngine(model, processor, share_prefix=False)

    n = int(args.seconds * 2)
    gen = torch.Generator().manual_seed(0)
    frames = [torch.rand(n, 3, args.size, args.size, generator=gen) for _ in range(2)]
    options = dict(fps=2.0, max_pixels=args.size * args.size, patch_factor=engine.patch_factor)
    alone = [load_video(f, max_frames=args.max_frames, name=f"v{i}", **options) for i, f in enumerate(frames)]
    paired = [load_video(f, max_frames=pair_max_frames(args.max_frames), name=f"v{i}", **options)
              for i, f in enumerate(frames)]
    single_q = [f"Is the {d.replace('_', ' ')} of the video good?" for d in DIMENSIONS]
    pair_q = [prompts.pair_question(d, "a benchmark prompt") for d in DIMENSIONS]
    a, b = paired

    # On CPU the process's CPU time is timed (wall time on a shared machine measures the neighbours); on CUDA, wall time.
    clock = time.perf_counter if device.type == "cuda" else time.process_time

    def timed(run):
        run()  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = clock()
        for _ in range(args.repeats):
            out = run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (clock() - start) / args.repeats, out

    t_base, _ = timed(lambda: engine.answer_many(alone, [single_q, single_q]))
    t_one, one = timed(lambda: engine.compare_many([(a, b)], [pair_q]))
    t_both, _ = timed(lambda: engine.compare_many([(a, b), (b, a)], [pair_q, pair_q]))
    t_plain, ref = timed(lambda: plain.compare_many([(a, b)], [pair_q]))
    gap = (one[0].probs - ref[0].probs).abs().max().item()
    tokens = sum(c.token_counts(engine.patch_factor)[0] for c in paired)
    print(f"device={device} dtype={dtype} clock={clock.__name__} frames per video alone={alone[0].frames.shape[0]} in a pair={a.frames.shape[0]} "
          f"size={tuple(a.frames.shape[2:])} pair video tokens={tokens} questions={len(pair_q)}")
    print(f"two videos scored alone : {t_base * 1000:9.1f} ms/pair (baseline)")
    print(f"compare, one order      : {t_one * 1000:9.1f} ms/pair   {t_one / t_base:5.2f}x baseline")
    print(f"compare, both orders    : {t_both * 1000:9.1f} ms/pair   {t_both / t_base:5.2f}x baseline, "
          f"{t_both / t_one:5.2f}x one order")
    print(f"compare, plain loop     : {t_plain * 1000:9.1f} ms/pair   shared prefix {t_plain / t_one:5.2f}x faster, "
          f"max |dP(A)| = {gap:.2e}")


if __name__ == "__main__":
    main()
