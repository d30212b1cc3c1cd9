"""GRPO rollout: `generate` on the prompt repeated G times against one shared prefill (`sample_group`), one process.

    python benchmarks/grpo_rollout.py                                # CPU: the "small" model, G=16
    python benchmarks/grpo_rollout.py --config tiny --size 56 --seconds 2 --max-new-tokens 4 --repeats 1   # seconds
    python benchmarks/grpo_rollout.py --config 7b --size 448 --seconds 8 --max-new-tokens 256   # GPU only

Both paths sample G completions of one reason-mode question about one real .mp4 clip
(finger_reward.synthetic, decoded at 2 fps under a size x size pixel budget), with the
trainer's settings (temperature 1, top_p 1, top_k 0, the placeholders suppressed, <|im_end|>
ends a row). The baseline is `VideoGRPOTrainer.rollout`'s former call: `model.generate` on the
processor output repeated G times, so the vision tower and the prompt run G times. Weights are
random, so rows rarely end early and both paths decode about `--max-new-tokens` steps. Prints
the seconds per group of each (median of `--repeats`, the two paths alternating, after a
warm-up), the speed-up, the tokens written, and peak memory (CPU: the process's peak RSS;
CUDA: max_memory_allocated).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from engine import build
from finger_reward.engine import default_device_dtype
from finger_reward.engine.inputs import placeholder_token_ids, processor_inputs
from finger_reward.prompts import split_prompt
from finger_reward.rope import with_rope_positions
from finger_reward.synthetic import random_scene, render, write_video
from finger_reward.tiny import build_processor
from finger_reward.trainers.rollout import sample_group
from finger_reward.video import load_video
from measure import device_name, peak_mb, peak_reset


def prompt_inputs(processor, path: Path, size: int, device) -> dict:
    """The trainer's reason-mode prompt for one question about the clip (batch 1)."""
    split = split_prompt(processor, "reason")
    clip = load_video(path, fps=2.0, max_frames=64, max_pixels=size * size)
    inputs = processor_inputs(processor, split.prefix + split.text_after_video("Does the red square move to the left?"), clip)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def group_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every GRPO-group benchmark takes: model, G, clip, repeats, threads, device."""
    parser.add_argument("--config", choices=["tiny", "small", "7b"], default="small")
    parser.add_argument("--generations", type=int, default=16, help="G, completions per question (paper: 16)")
    parser.add_argument("--size", type=int, default=336, help="frame pixel budget is size x size (paper: 448)")
    parser.add_argument("--seconds", type=float, default=4.0, help="clip length; sampled at 2 fps")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per path (median), after one warm-up")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device")


def group_setup(parser: argparse.ArgumentParser, args):
    """(device, dtype, processor, model, prompt): the random model of `--config` and the trainer's prompt about a
    real .mp4 clip of `--seconds` (batch 1)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = default_device_dtype(args.device)
    if args.config == "7b" and device.type != "cuda":
        parser.error("--config 7b needs a CUDA GPU (about 17 GB of bf16 weights)")
    processor = build_processor()
    model = build(args.config, processor, device, dtype, None)
    with tempfile.TemporaryDirectory() as tmp:
        frames = render(random_scene(np.random.default_rng(0)), num_frames=int(args.seconds * 8), height=args.size,
                        width=args.size)
        single = prompt_inputs(processor, write_video(frames, Path(tmp) / "clip.mp4", fps=8), args.size, device)
    return device, dtype, processor, model, single


def timed(runs: dict, repeats: int, device) -> dict[str, tuple[float, float, torch.Tensor]]:
    """Per named `run()`: (median seconds, peak MiB, last output), after one warm-up call each.

    The timed calls alternate between the runs, so a change in the machine's load (2 shared cores
    here) falls on both alike.
    """
    for run in runs.values():
        run()
    seconds = {name: [] for name in runs}
    peaks = dict.fromkeys(runs, 0.0)
    outputs = {}
    for _ in range(repeats):
        for name, run in runs.items():
            peak_reset(device)
            start = time.perf_counter()
            outputs[name] = run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds[name].append(time.perf_counter() - start)
            peaks[name] = max(peaks[name], peak_mb(device))
    return {name: (statistics.median(seconds[name]), peaks[name], outputs[name]) for name in runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group_arguments(parser)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="torch seed before the sampling runs")
    args = parser.parse_args()
    device, dtype, processor, model, single = group_setup(parser, args)
    model.eval()
    tokenizer = processor.tokenizer
    ends, pad = [tokenizer.convert_tokens_to_ids("<|im_end|>")], tokenizer.pad_token_id
    options = dict(max_new_tokens=args.max_new_tokens, temperature=1.0, top_p=1.0)
    suppressed = placeholder_token_ids(processor)
    G = args.generations

    repeated = {k: v.repeat(G, *([1] * (v.dim() - 1))) if isinstance(v, torch.Tensor) else v for k, v in single.items()}
    P = single["input_ids"].shape[1]
    video_tokens = int((single["input_ids"] == processor.video_token_id).sum())

    def baseline():
        return model.generate(**with_rope_positions(model.config, repeated), do_sample=True, top_k=0, eos_token_id=ends,
                              pad_token_id=pad, suppress_tokens=suppressed, **options)

    def shared():
        return sample_group(model, single, G, eos_token_ids=ends, pad_token_id=pad, suppress_tokens=suppressed, **options)

    params = sum(p.numel() for p in model.parameters())
    print(f"config={args.config} params={params / 1e6:.1f}M device={device} ({device_name(device)}) dtype={dtype} "
          f"G={G} prompt={P} tokens ({video_tokens} video, grid {single['video_grid_thw'][0].tolist()}) "
          f"clip={args.size}x{args.size}, {args.seconds:g} s at 2 fps, max_new_tokens={args.max_new_tokens}")
    torch.manual_seed(args.seed)
    with torch.no_grad():
        runs = timed({"generate x G": baseline, "shared prefill": shared}, args.repeats, device)
    for name, (seconds, memory, out) in runs.items():
        written = int((out[:, P:] != pad).sum())
        print(f"{name}: {seconds:.3f} s/group, {written} tokens written, peak memory {memory:.0f} MiB")
    base, ours = runs["generate x G"][0], runs["shared prefill"][0]
    print(f"shared prefill / generate x G: {base / ours:.2f}x faster")


if __name__ == "__main__":
    main()
