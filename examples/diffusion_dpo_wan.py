"""Diffusion-DPO of a Wan text-to-video model on preference pairs chosen by FingER, end to end.

Three stages, each the library's own code:

1. Pairs: `select_dpo_pairs` generates N candidates per prompt with the pipeline, scores them with
   FingER and keeps (best, worst) as (chosen, rejected) in pairs.jsonl.
2. Training: the Diffusion-DPO trainer (`finger_reward.trainers.diffusion_dpo`) trains a LoRA on
   those pairs; the first loss is ln 2 (the LoRA starts at zero, policy = reference).
3. Use: the saved LoRA is loaded into a fresh pipeline with `load_lora_weights` and one video made.

Everything defaults to tiny random models (a tiny Wan pipeline, a tiny FingER), so the loop runs
on a CPU in well under a minute:

    python examples/diffusion_dpo_wan.py
    python examples/diffusion_dpo_wan.py --out runs/dpo_example --steps 4

Real size (Wan2.1-T2V-1.3B at 33 x 480 x 832 here; one GPU for generation and training):

    python examples/diffusion_dpo_wan.py --pipeline Wan-AI/Wan2.1-T2V-1.3B-Diffusers \\
        --finger-model path/to/finger-model --out runs/dpo_example --steps 20

or, as separate jobs over a real prompt set:

    finger-reward select-pairs --pipeline Wan-AI/Wan2.1-T2V-1.3B-Diffusers --prompts prompts.txt \\
        --model path/to/finger-model --num-candidates 4 --out runs/pairs
    accelerate launch -m finger_reward.trainers.diffusion_dpo --config configs/dpo_wan.yaml \\
        --pairs_file runs/pairs/pairs.jsonl --output_dir runs/dpo_wan

Scoring on a FingER service on another GPU: on that machine run

    finger-reward serve --model path/to/finger-model --host 0.0.0.0 --port 8000 --token T

and here pass `--reward-url http://host:8000` (the token from `--reward-token` or the environment
variable FINGER_REWARD_TOKEN=T). Never bind a service to 0.0.0.0 without a token.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from pathlib import Path

PROMPTS = [
    "a red kite flies over a green hill",
    "a dog runs along a beach at sunset",
    "a glass of water tips over on a wooden table",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", help="diffusers Wan pipeline (default: a tiny random one)")
    parser.add_argument("--finger-model", help="FingER checkpoint for in-process scoring (default: a tiny random one)")
    parser.add_argument("--reward-url", help="score through a running finger-reward service instead")
    parser.add_argument("--reward-token", default=os.environ.get("FINGER_REWARD_TOKEN"),
                        help="service bearer token (default: $FINGER_REWARD_TOKEN)")
    parser.add_argument("--num-candidates", type=int, default=3, help="videos generated per prompt")
    parser.add_argument("--steps", type=int, default=3, help="Diffusion-DPO optimizer steps")
    parser.add_argument("--out", default=None, help="output directory (default: a temporary one)")
    args = parser.parse_args()

    import torch
    from diffusers import WanPipeline

    from finger_reward import FingerReward
    from finger_reward.dpo_pairs import select_dpo_pairs
    from finger_reward.serve import FingerRewardClient
    from finger_reward.tiny import make_tiny_model
    from finger_reward.tiny_wan import make_tiny_wan_pipeline
    from finger_reward.trainers.diffusion_dpo import DPORecipe, train

    work = Path(args.out or tempfile.mkdtemp(prefix="finger-dpo-"))
    if args.pipeline:
        pipeline_path = args.pipeline
        size = dict(num_frames=33, height=480, width=832)
        steps, extra = 30, dict(mixed_precision="bf16", gradient_checkpointing=True, lora_rank=64, lora_alpha=64)
        dtype = {"default": torch.bfloat16, "vae": torch.float32}
    else:
        pipeline_path = str(make_tiny_wan_pipeline(work / "tiny-wan"))
        size = dict(num_frames=5, height=32, width=32)
        steps, extra = 2, dict(mixed_precision="no", max_sequence_length=16, lora_rank=4, lora_alpha=4,
                               learning_rate=1e-2)
        dtype = torch.float32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = WanPipeline.from_pretrained(pipeline_path, dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    if args.reward_url:
        reward = FingerRewardClient(args.reward_url, token=args.reward_token)
    else:
        reward = FingerReward.from_pretrained(args.finger_model or make_tiny_model(work / "finger-model"))

    # 1. Pairs: N candidates per prompt, scored by FingER; best against worst.
    pairs_file = select_dpo_pairs(pipe, PROMPTS, reward, work / "pairs", num_candidates=args.num_candidates,
                                  strategy="best_worst", pipeline_kwargs=dict(num_inference_steps=steps, **size),
                                  progress=False)
    pairs = [json.loads(line) for line in pairs_file.read_text(encoding="utf-8").splitlines()] \
        if pairs_file.exists() else []
    for pair in pairs:
        print(f"pair: chosen {pair['chosen_score']:.4f} (seed {pair['chosen_seed']}) vs rejected "
              f"{pair['rejected_score']:.4f} (seed {pair['rejected_seed']}): {pair['prompt']}")
    if not pairs:
        raise SystemExit("no pairs: every prompt's candidates scored the same; add prompts or candidates")

    # 2. Diffusion-DPO on those pairs (a LoRA on the transformer; the reference is the adapter-free model).
    recipe = DPORecipe(pretrained_model=pipeline_path, pairs_file=str(pairs_file), output_dir=str(work / "lora"),
                       max_steps=args.steps, save_steps=0, logging_steps=1, **size, **extra)
    result = train(recipe, pipe=pipe)
    for record in result["history"]:
        print(f"step {record['step']}: DPO loss {record['loss']:.4f} "
              f"(implicit accuracy {record['implicit_accuracy']:.2f})")
    print(f"ln 2 = {math.log(2):.4f}; LoRA in {result['output_dir']}")

    # 3. The LoRA in a fresh pipeline, and one video from it.
    del pipe
    tuned = WanPipeline.from_pretrained(pipeline_path, dtype=dtype).to(device)
    tuned.set_progress_bar_config(disable=True)
    tuned.load_lora_weights(result["output_dir"])
    video = tuned(PROMPTS[0], num_inference_steps=steps, output_type="np",
                  generator=torch.Generator().manual_seed(0), **size).frames[0]
    import numpy as np

    from finger_reward.synthetic import write_video

    path = work / "after_dpo.mp4"
    write_video((np.clip(video, 0, 1) * 255).round().astype(np.uint8), path, fps=16)
    print(f"video after DPO: {path} ({video.shape[0]} frames, {video.shape[1]}x{video.shape[2]})")


if __name__ == "__main__":
    main()
