"""Flow-GRPO of a Wan text-to-video model with FingER rewards, scored through the FingER service.

Each step samples groups of videos with an SDE sampler, scores them with FingER, normalises the
rewards within each group and updates a LoRA with the clipped GRPO objective
(`finger_reward.trainers.flow_grpo`). Rewards come over HTTP: by default this script starts a
FingER `LocalServer` in-process (a tiny random FingER, on a free port, with a bearer token) and
points the trainer at it through `reward_url`, the same path a run with the service on another
GPU takes; there a group's scoring runs in a thread while the next group is sampled.

Everything defaults to tiny random models, so the loop runs on a CPU in under a minute:

    python examples/flow_grpo_wan.py
    python examples/flow_grpo_wan.py --out runs/flow_grpo_example --steps 4

Real size: FingER on its own GPU (or machine), the trainer on another:

    # on the FingER machine (never bind 0.0.0.0 without a token)
    finger-reward serve --model path/to/finger-model --host 0.0.0.0 --port 8000 --token T
    # on the training machine (prompts.txt: one prompt per line)
    FINGER_REWARD_TOKEN=T accelerate launch -m finger_reward.trainers.flow_grpo \\
        --config configs/flow_grpo_wan.yaml --prompts prompts.txt --reward_url http://host:8000 \\
        --output_dir runs/flow_grpo_wan

or this script against that service with the real pipeline:

    FINGER_REWARD_TOKEN=T python examples/flow_grpo_wan.py --pipeline Wan-AI/Wan2.1-T2V-1.3B-Diffusers \\
        --reward-url http://host:8000 --steps 50 --out runs/flow_grpo_example
"""

from __future__ import annotations

import argparse
import os
import secrets
import tempfile
from contextlib import nullcontext
from pathlib import Path

PROMPTS = [
    "a red circle moves from left to right",
    "a dog runs along a beach at sunset",
    "a glass of water tips over on a wooden table",
    "the camera slowly zooms in on an old clock tower",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", help="diffusers Wan pipeline (default: a tiny random one)")
    parser.add_argument("--finger-model", help="FingER checkpoint for the in-process service (default: a tiny random one)")
    parser.add_argument("--reward-url", help="use this running finger-reward service instead of starting one")
    parser.add_argument("--reward-token", default=os.environ.get("FINGER_REWARD_TOKEN"),
                        help="that service's bearer token (default: $FINGER_REWARD_TOKEN)")
    parser.add_argument("--steps", type=int, default=3, help="Flow-GRPO steps (sample, score, update)")
    parser.add_argument("--out", default=None, help="output directory (default: a temporary one)")
    args = parser.parse_args()

    from finger_reward import FingerReward
    from finger_reward.serve import ServeConfig
    from finger_reward.serve.local import LocalServer
    from finger_reward.tiny import make_tiny_model
    from finger_reward.tiny_wan import make_tiny_wan_pipeline
    from finger_reward.trainers.flow_grpo import FlowGRPORecipe, train

    work = Path(args.out or tempfile.mkdtemp(prefix="finger-flow-grpo-"))
    work.mkdir(parents=True, exist_ok=True)
    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    if args.pipeline:
        sizes = dict(pipeline=args.pipeline, height=480, width=832, num_frames=33, group_size=8, prompts_per_step=2,
                     num_inference_steps=10, mixed_precision="bf16", gradient_checkpointing=True)
    else:
        sizes = dict(pipeline=str(make_tiny_wan_pipeline(work / "tiny-wan")), height=32, width=32, num_frames=5,
                     group_size=4, prompts_per_step=2, num_inference_steps=3, max_sequence_length=16,
                     mixed_precision="no", gradient_checkpointing=False, lora_rank=4, lora_alpha=8,
                     learning_rate=1e-2, clip_range=0.2, beta=0.1, std_floor=0.01)

    if args.reward_url:
        service, token = nullcontext(None), args.reward_token
    else:  # the service in this process, on a free loopback port; a token all the same
        token = secrets.token_urlsafe(16)
        reward = FingerReward.from_pretrained(args.finger_model or make_tiny_model(work / "finger-model"))
        service = LocalServer(reward, ServeConfig(port=0, token=token, max_wait_ms=5))
    with service as server:
        url = args.reward_url or server.url
        print(f"FingER service: {url}")
        recipe = FlowGRPORecipe(prompts=str(prompts), reward_url=url, reward_token=token, output_dir=str(work / "run"),
                                max_steps=args.steps, save_steps=max(args.steps, 1), logging_steps=1, seed=0, **sizes)
        history = train(recipe)
        if server is not None:
            print(f"videos scored by the service: {server.batcher.telemetry.videos_scored}")
    for metrics in history:
        dims = " ".join(f"{k.split('/', 1)[1]}={v:.4f}" for k, v in metrics.items() if k.startswith("reward/"))
        print(f"step {metrics['step']}: reward mean {metrics['reward_mean']:.4f} | {dims} | kl {metrics['kl']:.2e}")
    print(f"LoRA in {work / 'run'} (pipe.load_lora_weights(...))")


if __name__ == "__main__":
    main()
