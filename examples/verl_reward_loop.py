"""The reward part of one verl PPO/GRPO step, scored by FingER, run the way verl runs it (CPU, no GPU).

verl's rollout and actor training need GPUs; its reward loop does not. This example starts a FingER
service (a tiny random FingER model by default), writes a few synthetic videos (a clean clip and
defective ones) standing in for the videos a policy's rewritten prompts led to, builds verl's trainer
config from verl's own defaults plus configs/verl_finger_reward.yaml, and hands one step's DataProto
to verl's real `RewardLoopWorker`, which calls `FingerRewardManager`. It prints each sample's reward
and per-dimension scores, and how many HTTP requests the service received for the step (one):

    python examples/verl_reward_loop.py
    python examples/verl_reward_loop.py --reward-url http://127.0.0.1:8000   # a running `finger-reward serve`

(the service's token, if any, comes from FINGER_REWARD_TOKEN, as in training.)

Real training with this config NEEDS GPUs (verl's rollout and actor; FingER best on its own GPU).
From the repository root, with the original prompt in each row's extra_info["prompt"] and a
`video_fn` that turns a response (the rewritten prompt) into a video with your generator:

    finger-reward serve --config configs/serve.yaml --model <FingER checkpoint> --host 0.0.0.0 --token <secret>
    FINGER_REWARD_URL=http://<finger-host>:8000 FINGER_REWARD_TOKEN=<secret> \\
    python -m verl.trainer.main_ppo --config-dir=. +configs@_global_=verl_finger_reward \\
        algorithm.adv_estimator=grpo actor_rollout_ref.rollout.n=8 \\
        actor_rollout_ref.model.path=Qwen/Qwen2.5-1.5B-Instruct actor_rollout_ref.rollout.name=vllm \\
        data.train_files=<rewrites.parquet> data.val_files=<rewrites.parquet> \\
        reward.reward_kwargs.video_fn=<my_generator.py:generate> trainer.n_gpus_per_node=8

`--config-dir=. +configs@_global_=verl_finger_reward` merges configs/verl_finger_reward.yaml into
verl's ppo_trainer config (add `--cfg job` to print the merged config without training).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STYLES = ["", ", cinematic lighting", ", smooth motion, 4k", ", high detail", ", soft colours", ", steady camera"]


def verl_trainer_config(policy: str):
    """verl's default trainer config + configs/verl_finger_reward.yaml, as verl's trainer migrates it."""
    import verl
    from omegaconf import OmegaConf
    from verl.experimental.reward_loop.reward_loop import migrate_legacy_reward_impl

    defaults = OmegaConf.load(Path(verl.__file__).parent / "trainer" / "config" / "_generated_ppo_trainer.yaml")
    excerpt = OmegaConf.load(REPO / "configs" / "verl_finger_reward.yaml")
    config = OmegaConf.merge(defaults, excerpt, {"actor_rollout_ref": {"model": {"path": policy}}})
    return migrate_legacy_reward_impl(config)


def step_batch(tokenizer, prompts: list[str], responses: list[str], extra_infos: list[dict]):
    """One step's DataProto as verl's trainer builds it: left-padded prompts, right-padded responses."""
    import numpy as np
    import torch
    from verl import DataProto

    pad = tokenizer.pad_token_id
    prompt_ids = [tokenizer.encode(p) for p in prompts]
    response_ids = [tokenizer.encode(r) for r in responses]
    p_len, r_len = max(map(len, prompt_ids)), max(map(len, response_ids))
    left = torch.tensor([[pad] * (p_len - len(p)) + p for p in prompt_ids])
    right = torch.tensor([r + [pad] * (r_len - len(r)) for r in response_ids])
    mask = torch.tensor([[0] * (p_len - len(p)) + [1] * (len(p) + len(r)) + [0] * (r_len - len(r))
                         for p, r in zip(prompt_ids, response_ids)])
    n = len(prompts)
    return DataProto.from_dict(
        tensors={"prompts": left, "responses": right, "attention_mask": mask, "input_ids": torch.cat([left, right], 1)},
        non_tensors={"data_source": np.array(["finger_video"] * n, dtype=object),
                     "reward_model": np.array([{"style": "rule", "ground_truth": ""}] * n, dtype=object),
                     "extra_info": np.array(extra_infos, dtype=object)})


def scoring_requests(url: str) -> int:
    """Requests the service has answered so far (its /metrics counter, all statuses)."""
    import httpx

    from finger_reward.chat_http import auth_headers

    # /metrics needs the service's token when it has one
    text = httpx.get(f"{url}/metrics", headers=auth_headers(os.environ.get("FINGER_REWARD_TOKEN"))).text
    return sum(int(float(n)) for n in re.findall(r'^finger_requests_total\{status="\d+"\} ([0-9.e+]+)$', text, re.M))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reward-url", help="a running finger-reward service (default: start one in this process)")
    parser.add_argument("--finger-model", help="FingER checkpoint for the in-process service (default: a tiny random one)")
    parser.add_argument("--policy", help="the policy whose tokenizer verl uses (default: a tiny random chat LM)")
    parser.add_argument("--out", default=None, help="output directory (default: a temporary one)")
    args = parser.parse_args()

    from transformers import AutoTokenizer
    from verl.experimental.reward_loop.reward_loop import RewardLoopWorker

    from finger_reward import DIMENSIONS, FingerReward
    from finger_reward.serve import ServeConfig
    from finger_reward.serve.local import LocalServer
    from finger_reward.synthetic import make_world
    from finger_reward.tiny import make_tiny_chat_model, make_tiny_model

    work = Path(args.out or tempfile.mkdtemp(prefix="finger-verl-"))
    world = make_world(work / "world", num_scenes=1)  # one prompt: a clean clip and one clip per defect
    policy = args.policy or str(make_tiny_chat_model(work / "policy"))

    with contextlib.ExitStack() as stack:
        url = args.reward_url
        if url is None:
            reward = FingerReward.from_pretrained(args.finger_model or make_tiny_model(work / "finger-model"),
                                                  questions=world.bank_path)
            url = stack.enter_context(LocalServer(reward, ServeConfig(port=0))).url
        os.environ["FINGER_REWARD_URL"] = url  # the YAML leaves reward_url null: verl's workers read the env

        worker = RewardLoopWorker(verl_trainer_config(policy))  # loads FingerRewardManager as verl does
        clips = world.clips
        data = step_batch(AutoTokenizer.from_pretrained(policy),
                          prompts=[f"Rewrite this prompt for a video model: {c.prompt}" for c in clips],
                          responses=[c.prompt + STYLES[i % len(STYLES)] for i, c in enumerate(clips)],
                          extra_infos=[{"video": str(c.path), "prompt": c.prompt} for c in clips])

        before = scoring_requests(url)
        outputs = worker.loop.run_until_complete(worker.compute_score_batch(data))  # verl: one task per sample
        requests = scoring_requests(url) - before

    print(f"prompt: {clips[0].prompt}")
    print(f"{'sample':>6}  {'video':<24} {'reward':>7}  " + "  ".join(DIMENSIONS))
    for i, (clip, output) in enumerate(zip(clips, outputs)):
        info = output["reward_extra_info"]
        dims = "  ".join(f"{info[d]:>{len(d)}.4f}" for d in DIMENSIONS)
        print(f"{i:>6}  {clip.path.name:<24} {output['reward_score']:>7.4f}  {dims}")
    print(f"FingER service requests for this step: {requests} ({len(clips)} videos)")


if __name__ == "__main__":
    main()
