"""Train a prompt-rewriting policy with TRL's GRPOTrainer on FingER rewards of the videos it leads to.

The policy rewrites a user's prompt for a video model; a diffusers Wan pipeline turns the rewrite
into a video; FingER scores that video against the user's original prompt. Everything defaults to
tiny random models, so the whole loop runs on a CPU in about a minute:

    python examples/trl_grpo_prompt_rewriter.py
    python examples/trl_grpo_prompt_rewriter.py --policy Qwen/Qwen2.5-0.5B-Instruct \\
        --pipeline Wan-AI/Wan2.1-T2V-1.3B-Diffusers --reward-url http://127.0.0.1:8000 --steps 200

With --reward-url the videos are scored by a running `finger-reward serve` (for example on
another GPU); otherwise by an in-process FingerReward (--finger-model, default: a tiny one).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

PROMPTS = [
    "a red circle moves from left to right",
    "a dog runs along a beach at sunset",
    "a glass of water tips over on a wooden table",
    "the camera slowly zooms in on an old clock tower",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", help="policy checkpoint (default: a tiny random chat LM)")
    parser.add_argument("--pipeline", help="diffusers Wan pipeline (default: a tiny random one)")
    parser.add_argument("--finger-model", help="FingER checkpoint for in-process scoring (default: a tiny random one)")
    parser.add_argument("--reward-url", help="score through a running finger-reward service instead")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default=None, help="output directory (default: a temporary one)")
    args = parser.parse_args()

    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from finger_reward import FingerReward
    from finger_reward.integrations.trl import FingerVideoReward
    from finger_reward.serve import FingerRewardClient
    from finger_reward.tiny import make_tiny_chat_model, make_tiny_model
    from finger_reward.tiny_wan import build_tiny_wan_pipeline

    work = Path(args.out or tempfile.mkdtemp(prefix="finger-trl-"))
    policy = args.policy or str(make_tiny_chat_model(work / "policy"))
    if args.pipeline:
        from diffusers import WanPipeline

        pipeline, size = WanPipeline.from_pretrained(args.pipeline), dict(height=480, width=832, num_frames=33)
    else:
        pipeline, size = build_tiny_wan_pipeline(), dict(height=32, width=32, num_frames=5)
    if args.reward_url:
        reward = FingerRewardClient(args.reward_url)
    else:
        reward = FingerReward.from_pretrained(args.finger_model or make_tiny_model(work / "finger-model"))

    reward_fn = FingerVideoReward(reward, pipeline=pipeline, prompt_column="original_prompt",
                                  pipeline_kwargs=dict(num_inference_steps=2 if not args.pipeline else 30, **size))
    dataset = Dataset.from_dict({
        "prompt": [[{"role": "user", "content": f"Rewrite this for a video model: {p}"}] for p in PROMPTS],
        "original_prompt": PROMPTS,
    })
    import torch

    on_gpu = torch.cuda.is_available()
    config = GRPOConfig(output_dir=str(work / "run"), per_device_train_batch_size=4, num_generations=4,
                        max_completion_length=16, max_steps=args.steps, logging_steps=1, beta=0.04,
                        learning_rate=1e-5, report_to="none", save_strategy="no", bf16=on_gpu, use_cpu=not on_gpu)
    trainer = GRPOTrainer(model=policy, reward_funcs=[reward_fn], args=config, train_dataset=dataset)
    trainer.train()
    for entry in trainer.state.log_history:
        if "rewards/finger_reward/mean" in entry:
            print(f"step {entry['step']}: FingER reward {entry['rewards/finger_reward/mean']:.4f}")


if __name__ == "__main__":
    main()
