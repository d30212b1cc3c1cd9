"""GRPO training pass over a group: the clip encoded once per row against once per forward, one process.

    python benchmarks/grpo_step.py                                  # CPU: the "small" model, G=16, 4 rows per forward
    python benchmarks/grpo_step.py --config tiny --size 56 --seconds 2 --completion 4 --repeats 1   # seconds
    python benchmarks/grpo_step.py --config 7b --size 448 --seconds 24 --completion 256   # GPU only

A group of G completions of one question about one real .mp4 clip (as benchmarks/grpo_rollout.py builds
it), in forwards of `--forward-batch-size` rows, each with a backward pass of the summed log-probabilities:
the work of `VideoGRPOTrainer.compute_loss` over a group. The baseline gives every row its own copy of the
video (`share_video: false`, a plain forward); the other encodes each forward's clip once and gives its
features to every row (`trainers/shared_video.py`, the default). Prints seconds per group (median of
`--repeats`, alternating), peak memory, the largest difference of the log-probabilities, and the speed-up.
"""

from __future__ import annotations

import argparse

import torch

from finger_reward.rope import with_rope_positions
from finger_reward.trainers.grpo import _select_rows
from finger_reward.trainers.shared_video import forward_logits
from grpo_rollout import group_arguments, group_setup, timed
from measure import device_name


def group_inputs(single: dict, generations: int, completion: int, vocab: int) -> dict:
    """The prompt repeated for G rows, each followed by `completion` random tokens (positions come per forward)."""
    rows = {k: v.repeat(generations, *([1] * (v.dim() - 1))) if isinstance(v, torch.Tensor) else v
            for k, v in single.items()}
    tail = torch.randint(0, vocab, (generations, completion), device=single["input_ids"].device)
    rows["input_ids"] = torch.cat([rows["input_ids"], tail], 1)
    rows["attention_mask"] = torch.ones_like(rows["input_ids"])
    if "mm_token_type_ids" in rows:
        rows["mm_token_type_ids"] = torch.cat([rows["mm_token_type_ids"], torch.zeros_like(tail)], 1)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group_arguments(parser)
    parser.add_argument("--forward-batch-size", type=int, default=4, help="rows per forward (configs/grpo_*.yaml: 4)")
    parser.add_argument("--completion", type=int, default=32, help="completion tokens per row")
    args = parser.parse_args()
    device, dtype, processor, model, single = group_setup(parser, args)
    model.train()
    torch.manual_seed(0)
    group = group_inputs(single, args.generations, args.completion, len(processor.tokenizer))
    P, G, size = single["input_ids"].shape[1], args.generations, args.forward_batch_size

    def pass_over_group(share: bool):
        logps = []
        for start in range(0, G, size):
            part = with_rope_positions(model.config, _select_rows(group, slice(start, min(start + size, G))))
            keep = part["input_ids"].shape[1] - P + 1
            logits = forward_logits(model, part, logits_to_keep=keep, share=share)
            chosen = logits[:, :-1].float().log_softmax(-1).gather(-1, part["input_ids"][:, P:, None]).squeeze(-1)
            chosen.sum().backward()
            logps.append(chosen.detach())
        model.zero_grad(set_to_none=True)
        return torch.cat(logps)

    params = sum(p.numel() for p in model.parameters())
    print(f"config={args.config} params={params / 1e6:.1f}M device={device} ({device_name(device)}) dtype={dtype} G={G} "
          f"rows per forward={size} prompt={P} tokens (grid {single['video_grid_thw'][0].tolist()}) + {args.completion}")
    runs = timed({"clip per row": lambda: pass_over_group(False), "clip per forward": lambda: pass_over_group(True)},
                 args.repeats, device)
    for name, (seconds, memory, _) in runs.items():
        print(f"{name}: {seconds:.3f} s/group (forward + backward), peak memory {memory:.0f} MiB")
    gap = (runs["clip per row"][2] - runs["clip per forward"][2]).abs().max().item()
    print(f"max |d log p| clip per forward vs per row = {gap:.2e}")
    print(f"clip per forward / clip per row: {runs['clip per row'][0] / runs['clip per forward'][0]:.2f}x faster")


if __name__ == "__main__":
    main()
