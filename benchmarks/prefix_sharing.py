"""Shared-prefix engine vs the plain one-question-per-forward loop, measured in one process.

    python benchmarks/prefix_sharing.py                      # random small Qwen2.5-VL, CPU or GPU
    python benchmarks/prefix_sharing.py --model PATH --questions 20 --seconds 5

Prints seconds per video for both paths, their ratio, and the largest probability difference.
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
    parser.add_argument("--model", help="checkpoint directory or hub id (default: random model of --hidden/--layers)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--questions", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=5.0, help="clip length at 2 fps")
    parser.add_argument("--size", type=int, default=224, help="frame height and width in pixels")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mode", choices=["answer", "reason"], default="answer")
    parser.add_argument("--device")
    args = parser.parse_args()

    device, dtype = default_device_dtype(args.device)
    if args.model:
        shared = TransformersEngine.from_pretrained(args.model, device=device, dtype=dtype, mode=args.mode)
        model, processor = shared.model, shared.processor
    else:
        processor = build_processor()
        model = build_model(processor.tokenizer, hidden_size=args.hidden, num_layers=args.layers).to(device, dtype)
    options = dict(mode=args.mode, max_new_tokens=32)
    shared = TransformersEngine(model, processor, question_batch_size=args.questions, **options)
    plain = TransformersEngine(model, processor, share_prefix=False, **options)

    frames = torch.rand(int(args.seconds * 2), 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    clip = load_video(frames, fps=2.0, max_pixels=args.size * args.size, name="bench")
    questions = [f"Question {i}: does the object number {i} keep its shape and colour?" for i in range(args.questions)]
    video_tokens = clip.frames.shape[0] // 2 * (clip.frames.shape[2] // 28) * (clip.frames.shape[3] // 28)

    def timed(engine):
        engine.answer(clip, questions)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.repeats):
            probs = engine.answer(clip, questions).probs
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / args.repeats, probs

    t_plain, p_plain = timed(plain)
    t_shared, p_shared = timed(shared)
    print(f"device={device} dtype={dtype} mode={args.mode} questions={args.questions} "
          f"frames={clip.frames.shape[0]} size={tuple(clip.frames.shape[2:])} video_tokens~{video_tokens}")
    print(f"plain loop   : {t_plain * 1000:9.1f} ms/video")
    print(f"shared prefix: {t_shared * 1000:9.1f} ms/video")
    print(f"speed-up     : {t_plain / t_shared:9.2f}x   max |dP| = {(p_plain - p_shared).abs().max():.2e}")


if __name__ == "__main__":
    main()
