"""Plain loop vs per-video shared prefix vs cross-video batching, answer mode, in one process.

    python benchmarks/engine.py                              # random small Qwen2.5-VL, CPU or GPU
    python benchmarks/engine.py --videos 8 --questions 16 --max-batch-tokens 65536

Prints videos/s for the three engines, their ratios, and the largest probability difference
from the plain loop.
"""

from __future__ import annotations

import argparse
import time

import torch

from finger_reward.engine import TransformersEngine, default_device_dtype
from finger_reward.tiny import build_model, build_processor
from finger_reward.video import load_video


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--frames", type=int, default=10, help="frames per clip (2 fps)")
    parser.add_argument("--size", type=int, default=224, help="frame height and width in pixels")
    parser.add_argument("--max-batch-tokens", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device")
    args = parser.parse_args()

    device, dtype = default_device_dtype(args.device)
    processor = build_processor()
    model = build_model(processor.tokenizer, hidden_size=args.hidden, num_layers=args.layers).to(device, dtype)
    plain = TransformersEngine(model, processor, share_prefix=False)
    shared = TransformersEngine(model, processor, question_batch_size=args.questions)
    batched = TransformersEngine(model, processor, question_batch_size=args.questions,
                                 max_batch_tokens=args.max_batch_tokens)

    clips = [load_video(torch.rand(args.frames, 3, args.size, args.size, generator=torch.Generator().manual_seed(i)),
                        fps=2.0, max_pixels=args.size * args.size, name=f"bench{i}") for i in range(args.videos)]
    questions = [f"Question {i}: does the object number {i} keep its shape and colour?" for i in range(args.questions)]
    per_clip = [questions] * len(clips)

    def one_by_one(engine):
        return torch.stack([engine.answer(clip, questions).probs for clip in clips])

    def together(engine):
        return torch.stack([a.probs for a in engine.answer_many(clips, per_clip)])

    def timed(run, engine, repeats):
        run(engine)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            probs = run(engine)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return len(clips) * repeats / (time.perf_counter() - start), probs

    v_plain, p_plain = timed(one_by_one, plain, max(1, args.repeats // 3))
    v_shared, p_shared = timed(one_by_one, shared, args.repeats)
    v_batched, p_batched = timed(together, batched, args.repeats)
    groups = batched._groups({i: batched._prefix_inputs(c) for i, c in enumerate(clips)},
                             {i: [batched._suffix_ids(q) for q in questions] for i in range(len(clips))})
    print(f"device={device} dtype={dtype} videos={len(clips)} questions={args.questions} frames={args.frames} "
          f"size={args.size} max_batch_tokens={args.max_batch_tokens} groups={[len(g) for g in groups]}")
    print(f"plain loop         : {v_plain:8.2f} videos/s")
    print(f"shared prefix      : {v_shared:8.2f} videos/s   {v_shared / v_plain:6.2f}x plain")
    print(f"batched over videos: {v_batched:8.2f} videos/s   {v_batched / v_plain:6.2f}x plain   "
          f"{v_batched / v_shared:5.2f}x shared")
    print(f"max |dP| vs plain  : shared {(p_shared - p_plain).abs().max():.2e}   "
          f"batched {(p_batched - p_plain).abs().max():.2e}")


if __name__ == "__main__":
    main()
