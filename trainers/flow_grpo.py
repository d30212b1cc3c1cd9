"""Flow-GRPO for flow-matching text-to-video pipelines (Wan, LTX-Video), rewarded by FingER.

Online RL for a flow-matching video generator (Liu et al. 2025, "Flow-GRPO: Training Flow Matching
Models via Online RL", arXiv:2505.05470). Every step:

1. Sample: for each of `prompts_per_step` prompts, a group of `group_size` videos with an SDE
   sampler that keeps the marginals of the model's flow ODE but makes every denoising step a
   Gaussian transition, whose log-probability is recorded (`sde_step`).
2. Score: FingER scores the decoded videos (`FlowGRPOReward` around a local `FingerReward`, or
   around a `FingerRewardClient`, whose requests run in a thread while the next group is sampled).
3. Advantages: rewards normalised within their group, with the group's std floored at `std_floor`
   so that near-equal scores (reward-model noise) give small advantages rather than +-1
   (`group_advantages`). A video that could not be scored (NaN) gets advantage 0 and stays out of
   its group's statistics; it is never counted as a 0 reward.
4. Update: recompute each step's log-probability with the LoRA policy; PPO's clipped ratio times the
   advantage plus `beta` times the KL to the reference, which is the same transformer with its
   adapter disabled (`grpo_loss`).

Classifier-free guidance is on, as the model is sampled in use: the policy's velocity is the guided
v_u + s (v_c - v_u) (`guidance_scale`, per family by default: Wan 5.0, LTX-Video 3.0; 1.0 turns it
off; `negative_prompt` gives v_u). The SDE step and the update's recomputed log-probabilities both
use it, so the ratio and the KL are of the policy that sampled, and LoRA gradients flow through
both branches.

Held-out evaluation (`eval_prompts`, `eval_every`): before training, every `eval_every` steps and at
the end, fixed prompts are sampled with the deterministic ODE at fixed seeds, scored by FingER and
logged to metrics.jsonl as `eval/reward_mean` and `eval/<dimension>`; the videos are kept as mp4s
with one contact sheet per evaluation in `output_dir/eval/` (`trainers/held_out.py`).

Launch (one GPU; with N GPUs use `accelerate launch --num_processes N`: each process samples its
own `prompts_per_step` groups, gradients are averaged):

    accelerate launch -m finger_reward.trainers.flow_grpo --config configs/flow_grpo_wan.yaml \\
        --prompts prompts.txt --reward_model path/to/finger-model --output_dir runs/flow_grpo_wan

    # or score through a FingER service on other GPUs (token from FINGER_REWARD_TOKEN):
    finger-reward serve --model path/to/finger-model --host 0.0.0.0 --token <secret>
    accelerate launch -m finger_reward.trainers.flow_grpo --config configs/flow_grpo_wan.yaml \\
        --prompts prompts.txt --reward_url http://10.0.0.5:8000 --output_dir runs/flow_grpo_wan

Every field of `FlowGRPORecipe` is a flag (`--group_size 16`, `--dimension_weights '{"text_alignment": 2}'`);
flags win over the YAML, as in TRL's scripts.

The LoRA loads back with `WanPipeline.from_pretrained(base).load_lora_weights(output_dir)`.
Pipelines: WanPipeline (Wan2.1-T2V 1.3B / 14B, Wan2.2-TI2V-5B) and LTXPipeline (LTX-Video 0.9.x;
`trainers/video_models.py` holds what differs: latent layout, text mask, sigma schedule).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from finger_reward.recipes import from_yaml, parse_recipe, undo_yaml_coercion
from finger_reward.trainers.flow_matching import (
    MIXED_PRECISION, add_lora, load_pipeline, lora_parameters, per_sample, save_lora,
)
from finger_reward.trainers import held_out
from finger_reward.trainers.resume import CHECKPOINT_PREFIX, resume_training, save_training, start_log
from finger_reward.trainers.video_models import cat_texts, default_guidance_scale, text_rows, video_model, with_negative

logger = logging.getLogger(__name__)

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


# ---- the math: pure functions on tensors ---------------------------------------------------------


def sde_step(velocity: torch.Tensor, x_t: torch.Tensor, sigma, sigma_next, noise_level: float,
             generator: torch.Generator | None = None, prev_sample: torch.Tensor | None = None, *,
             sigma_max: float | None = None):
    """One step of Flow-GRPO's SDE sampler from noise level `sigma` down to `sigma_next`, with its log-probability.

    Flow-GRPO's Eq. 9 (the Euler-Maruyama step of its ODE-to-SDE conversion), with t = sigma and
    dt = sigma_next - sigma < 0:

        x_next = x_t + [v + s_t^2 / (2 t) * (x_t + (1 - t) v)] dt + s_t * sqrt(-dt) * eps,
        s_t = noise_level * sqrt(t / (1 - t)).

    The bracket is v - (s_t^2 / 2) * score, with the rectified-flow score -(x_t + (1 - t) v) / t:
    that correction keeps the marginals of the flow ODE dx = v dt. So the transition is Gaussian,
    N(mean, std^2 I) with std = s_t * sqrt(sigma - sigma_next).

    `sigma`, `sigma_next`: floats or (B,) tensors. `prev_sample` None draws the sample (noise from
    `generator`); given, it is scored instead (the policy update). `sigma_max` stands for sigma in
    1 - sigma, where s_t is infinite at sigma = 1 (a schedule's first step); Flow-GRPO uses the
    schedule's second sigma. Computed in float32. Returns `(prev_sample, log_prob, mean, std)`;
    `log_prob` (B,) is the log-density averaged over the non-batch dimensions, as Flow-GRPO's.
    """
    if not noise_level > 0:
        raise ValueError(f"noise_level must be > 0 (0 is the deterministic ODE step, which has no log-probability), "
                         f"got {noise_level}")
    v, x = velocity.float(), x_t.float()
    sigma = per_sample(torch.as_tensor(sigma, dtype=torch.float32, device=x.device), x)
    sigma_next = per_sample(torch.as_tensor(sigma_next, dtype=torch.float32, device=x.device), x)
    dt = sigma_next - sigma
    if (dt >= 0).any() or (sigma > 1).any() or (sigma_next < 0).any():
        raise ValueError("need 1 >= sigma > sigma_next >= 0: the sampler runs from noise (1) to data (0)")
    capped = sigma if sigma_max is None else sigma.clamp(max=sigma_max)
    if (capped >= 1).any():
        raise ValueError("sigma = 1 makes s_t = noise_level * sqrt(sigma / (1 - sigma)) infinite; pass sigma_max= "
                         "the schedule's second sigma, as Flow-GRPO does")
    s_t = noise_level * torch.sqrt(sigma / (1 - capped))
    score = -(x + (1 - sigma) * v) / sigma
    mean = x + (v - 0.5 * s_t**2 * score) * dt
    std = s_t * torch.sqrt(-dt)
    if prev_sample is None:
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float32,
                            device=generator.device if generator is not None else x.device)
        prev_sample = mean + std * noise.to(x.device)
    prev_sample = prev_sample.detach().float()
    log_prob = -((prev_sample - mean) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    return prev_sample, log_prob.mean(dim=tuple(range(1, x.dim()))), mean, std


def gaussian_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, std^2) || N(ref_mean, std^2)) per batch item, averaged over the other dims like `sde_step`'s log-prob.

    The exact KL of the two transitions. Flow-GRPO's KL term divides by s_t^2 instead of std^2 =
    s_t^2 * |dt|, i.e. it is this KL times the step size |dt|; its beta is therefore ~num_steps times ours.
    """
    kl = (mean - ref_mean) ** 2 / (2 * std**2)
    return kl.mean(dim=tuple(range(1, kl.dim())))


def group_advantages(rewards, group_ids, std_floor: float) -> torch.Tensor:
    """(r - group mean) / max(group std, std_floor) per item, as float32 (N,).

    The std is the population std of the group's finite rewards. The floor keeps a group of
    near-equal rewards (differences the reward model cannot really tell apart) at small advantages
    instead of inflating them to +-1. Non-finite rewards (failed videos) get advantage 0 and are left
    out of their group's mean and std. With the floor, |advantage| < sqrt(G - 1) always.
    """
    if not std_floor > 0:
        raise ValueError(f"std_floor must be > 0, got {std_floor}; it bounds how far tiny reward gaps are scaled up")
    r = (rewards.detach().cpu().numpy() if isinstance(rewards, torch.Tensor) else np.asarray(rewards)).astype(np.float64)
    ids = list(group_ids)
    if r.ndim != 1 or len(ids) != len(r):
        raise ValueError(f"need one group id per reward, got {len(ids)} ids for rewards of shape {r.shape}")
    advantages = np.zeros_like(r)
    for group in dict.fromkeys(ids):
        members = np.array([i for i, g in enumerate(ids) if g == group])
        valid = members[np.isfinite(r[members])]
        if valid.size:
            values = r[valid]
            advantages[valid] = (values - values.mean()) / max(values.std(), std_floor)
    return torch.from_numpy(advantages).float()


def grpo_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float,
              kl: torch.Tensor | None = None, beta: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO's clipped surrogate on one denoising step, plus beta times the KL to the reference.

        loss = mean_i max(-A_i r_i, -A_i clip(r_i, 1 - eps, 1 + eps)) + beta * mean_i KL_i,
        r_i = exp(log_prob_i - old_log_prob_i).

    A ratio outside [1 - eps, 1 + eps] in the direction the advantage pushes it gets no gradient.
    Metrics: policy_loss, kl, clip_fraction (|r - 1| > eps), approx_kl (mean of log-ratio^2 / 2).
    """
    if not clip_range > 0 or beta < 0:
        raise ValueError(f"need clip_range > 0 and beta >= 0, got clip_range={clip_range}, beta={beta}")
    if beta > 0 and kl is None:
        raise ValueError(f"beta={beta} needs kl (per-item KL to the reference); pass beta=0 to train without it")
    log_ratio = log_prob - old_log_prob.detach().to(log_prob)
    ratio = torch.exp(log_ratio)
    advantages = advantages.detach().to(ratio)
    clipped = ratio.clamp(1 - clip_range, 1 + clip_range)
    policy_loss = torch.maximum(-advantages * ratio, -advantages * clipped).mean()
    kl_mean = kl.mean() if kl is not None else torch.zeros((), device=ratio.device)
    loss = policy_loss + beta * kl_mean
    metrics = {
        "policy_loss": policy_loss.item(),
        "kl": kl_mean.item(),
        "clip_fraction": ((ratio - 1).abs() > clip_range).float().mean().item(),
        "approx_kl": (0.5 * log_ratio.detach() ** 2).mean().item(),
    }
    return loss, metrics


# ---- the recipe ----------------------------------------------------------------------------------


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class FlowGRPORecipe:
    """Every setting of a Flow-GRPO run; `configs/flow_grpo_wan.yaml` documents them for Wan2.1-T2V-1.3B."""

    pipeline: str = _opt("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "diffusers pipeline directory or hub id")
    prompts: str | None = _opt(None, "text file, one prompt per line (required)")
    reward_model: str | None = _opt(None, "FingER checkpoint, scored in-process")
    reward_questions: str | None = _opt(None, "question bank JSONL (default: template questions)")
    reward_url: str | None = _opt(None, "FingER service URL, instead of reward_model")
    reward_token: str | None = _opt(None, "service bearer token (default: env FINGER_REWARD_TOKEN)")
    reward_device: str | None = _opt(None, "device of the in-process FingER model (default: the trainer's)")
    dimension_weights: dict[str, float] | str | None = _opt(
        None, 'Eq. 4 weights per FingER dimension, e.g. {"text_alignment": 2} (default: overall)')
    group_size: int = _opt(8, "videos per prompt (G)")
    prompts_per_step: int = _opt(2, "groups sampled per step and process")
    num_inference_steps: int = _opt(10, "SDE sampling steps (all are trained on)")
    noise_level: float = _opt(0.7, "a in s_t = a * sqrt(t / (1 - t))")
    guidance_scale: float | None = _opt(None, "classifier-free guidance of the sampled policy (and of held-out samples); "
                                              "None: the family's default (Wan 5.0, LTX-Video 3.0); 1.0 turns it off")
    negative_prompt: str | None = _opt(None, "the prompt of the unconditional branch under guidance; None: the "
                                             "pipeline's default (empty for WanPipeline and LTXPipeline)")
    height: int = _opt(480, "video height, a multiple of 16")
    width: int = _opt(832, "video width, a multiple of 16")
    num_frames: int = _opt(33, "4k + 1 frames")
    max_sequence_length: int = _opt(512, "text-encoder tokens")
    learning_rate: float = _opt(1e-4, "AdamW learning rate of the LoRA weights")
    lora_rank: int = _opt(32, "LoRA rank on the attention projections")
    lora_alpha: int = _opt(64, "LoRA alpha (scale alpha / rank)")
    clip_range: float = _opt(1e-4, "PPO clip on the per-step ratio")
    beta: float = _opt(4e-4, "KL coefficient (0: no reference forward)")
    std_floor: float = _opt(0.05, "lower bound on a group's reward std")
    num_updates: int = _opt(2, "optimizer steps per step, over disjoint shares of its videos")
    train_batch_size: int = _opt(1, "videos per forward/backward in the update")
    max_grad_norm: float = _opt(1.0, "gradient clipping")
    gradient_checkpointing: bool = _opt(True, "recompute transformer blocks in backward")
    max_steps: int = _opt(300, "training steps (sample, score, update)")
    seed: int = _opt(0, "prompt choice and sampling noise (plus the process rank)")
    output_dir: str | None = _opt(None, "LoRA, checkpoints and metrics.jsonl (required)")
    resume_from_checkpoint: str | None = _opt(None, "continue exactly from a checkpoint-N folder (or 'last': the newest "
                                                    "in output_dir)")
    mixed_precision: str = _opt("no", "no, fp16 or bf16 (frozen weights in that dtype)")
    save_steps: int = _opt(50, "checkpoint every this many steps")
    logging_steps: int = _opt(1, "log metrics every this many steps")
    eval_prompts: str | None = _opt(None, "held-out prompts file (.txt lines or .jsonl); None: no held-out evaluation")
    eval_every: int = _opt(25, "evaluate the held-out prompts every this many steps (and before the first, after the last)")
    eval_seed: int = _opt(0, "held-out video k of every prompt starts from the noise of seed eval_seed + k")
    eval_videos_per_prompt: int = _opt(1, "held-out videos per prompt (seeds eval_seed, eval_seed + 1, ...)")
    eval_num_inference_steps: int | None = _opt(None, "ODE steps of the held-out samples; None: num_inference_steps")

    def __post_init__(self):
        undo_yaml_coercion(self)
        if isinstance(self.dimension_weights, str):  # --dimension_weights '{"visual_quality": 2}'
            self.dimension_weights = _json_mapping("dimension_weights", self.dimension_weights)
        missing = [name for name in ("prompts", "output_dir") if getattr(self, name) is None]
        if missing:
            raise ValueError(f"{' and '.join(missing)} must be set (prompts: a text file with one prompt per line; "
                             "output_dir: where the LoRA and metrics go)")
        if (self.reward_model is None) == (self.reward_url is None):
            raise ValueError(f"set exactly one of reward_model (in-process FingER) and reward_url (FingER service); "
                             f"got reward_model={self.reward_model!r}, reward_url={self.reward_url!r}")
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2: advantages compare videos of one prompt, got {self.group_size}")
        positive = ("prompts_per_step", "num_inference_steps", "lora_rank", "num_updates", "train_batch_size",
                    "max_steps", "save_steps", "logging_steps", "noise_level", "learning_rate", "clip_range", "std_floor",
                    "eval_every", "eval_videos_per_prompt")
        bad = [f"{name}={getattr(self, name)}" for name in positive if not getattr(self, name) > 0]
        if bad:
            raise ValueError(f"must be > 0: {', '.join(bad)}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0 (0 turns the KL term off), got {self.beta}")
        if self.guidance_scale is not None and not self.guidance_scale >= 1:
            raise ValueError(f"guidance_scale must be >= 1 (1.0 samples without guidance; None takes the family's "
                             f"default), got {self.guidance_scale}")
        if self.eval_num_inference_steps is not None and not self.eval_num_inference_steps > 0:
            raise ValueError(f"eval_num_inference_steps must be > 0 (None: num_inference_steps), "
                             f"got {self.eval_num_inference_steps}")
        if self.num_updates > self.group_size * self.prompts_per_step:
            raise ValueError(f"num_updates={self.num_updates} is more than the {self.group_size * self.prompts_per_step} "
                             "videos of a step; each update needs at least one")
        if self.num_frames % 4 != 1 or self.height % 16 or self.width % 16:
            raise ValueError(f"Wan needs num_frames = 4k + 1 and height, width multiples of 16; got num_frames="
                             f"{self.num_frames}, height={self.height}, width={self.width}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision={self.mixed_precision!r} is not one of {list(MIXED_PRECISION)}")

    @classmethod
    def from_yaml(cls, path: str | Path | None = None, **overrides) -> "FlowGRPORecipe":
        """Fields from a flat YAML file, then `overrides` (unknown keys are an error naming the valid ones)."""
        return from_yaml(cls, path, **overrides)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "reward_token"}  # no secrets in saved recipes


def _json_mapping(name: str, text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{name} must be a JSON object such as '{{\"visual_quality\": 2}}', got {text!r}: {error}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object mapping dimension to weight, got {text!r}")
    return value


def read_prompts(path: str | Path) -> list[str]:
    """The prompts file as `finger-reward select-pairs` reads it (.txt lines or .jsonl); empty is an error."""
    from finger_reward.cli import read_prompts as read_prompts_file

    prompts = read_prompts_file(path)
    if not prompts:
        raise ValueError(f"{path} has no prompts; write one prompt per line")
    return prompts


# ---- sampling ------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """A group: G videos of one prompt sampled with `sde_step`, their scores and advantages."""

    prompt: str
    text: dict[str, torch.Tensor]  # the transformer's text inputs, G rows each
    trajectory: torch.Tensor     # (G, T + 1, ...latent): the latents before step 0, after step 0, ..., final
    log_probs: torch.Tensor      # (G, T): log-prob of trajectory[:, j + 1] given trajectory[:, j]
    sigmas: torch.Tensor         # (T + 1,) float32, from 1 down to 0
    noise_level: float
    guidance_scale: float        # of the velocity that sampled (1.0: no guidance); `text` holds the negative prompt too
    frames: np.ndarray           # (G, F, H, W, 3) float32 in [0, 1]: the decoded videos
    rewards: np.ndarray | None = None      # (G,) float32, NaN where a video failed
    info: dict | None = None               # FlowGRPOReward's info: overall, per dimension, success, errors
    advantages: torch.Tensor | None = None  # (G,)


def model_dtype(transformer) -> torch.dtype:
    """The dtype of the frozen weights (LoRA weights are kept in float32)."""
    return next(p.dtype for name, p in transformer.named_parameters() if "lora_" not in name)


def sample_group(model, transformer, prompt: str, text: dict[str, torch.Tensor], *, group_size: int,
                 num_inference_steps: int, noise_level: float, generator: torch.Generator,
                 guidance_scale: float = 1.0) -> Rollout:
    """G videos of one prompt with the SDE sampler on the guided velocity, recording every step's log-prob.

    `text`: the prompt's text inputs, one row (with the negative prompt's, `with_negative`, under guidance)."""
    device = next(iter(text.values())).device
    text = {key: value.expand(group_size, *value.shape[1:]) for key, value in text.items()}
    sigmas = model.sampling_sigmas(num_inference_steps, device)
    if len(sigmas) != num_inference_steps + 1 or sigmas[-1] != 0:
        raise ValueError(f"{type(model.pipe.scheduler).__name__} gave sigmas {sigmas.tolist()}; Flow-GRPO needs "
                         "num_inference_steps + 1 flow-matching sigmas ending at 0")
    x = model.initial_noise(group_size, generator, device)
    dtype = model_dtype(transformer)
    states, log_probs = [x], []
    for j in range(num_inference_steps):
        v = model.guided_velocity(transformer, x.to(dtype), sigmas[j].expand(group_size), text, guidance_scale)
        x, log_prob, _, _ = sde_step(v, x, sigmas[j], sigmas[j + 1], noise_level, generator, sigma_max=float(sigmas[1]))
        states.append(x)
        log_probs.append(log_prob)
    return Rollout(prompt, text, torch.stack(states, 1), torch.stack(log_probs, 1), sigmas, noise_level,
                   guidance_scale, model.decode(x))


@torch.no_grad()
def sample_ode(model, transformer, text: dict[str, torch.Tensor], generators: list[torch.Generator], *,
               num_inference_steps: int, guidance_scale: float = 1.0) -> torch.Tensor:
    """Deterministic samples: the flow ODE dx = v dt with Euler steps x + (sigma_next - sigma) v on the guided
    velocity, as the pipeline's FlowMatchEulerDiscreteScheduler samples; video i starts from `generators[i]`'s noise.

    `text`: one row per video. Returns the final latents (float32), in the transformer's layout."""
    device = next(iter(text.values())).device
    sigmas = model.sampling_sigmas(num_inference_steps, device)
    x = torch.cat([model.initial_noise(1, g, device) for g in generators])
    dtype = model_dtype(transformer)
    for j in range(num_inference_steps):
        v = model.guided_velocity(transformer, x.to(dtype), sigmas[j].expand(len(x)), text, guidance_scale)
        x = x + (sigmas[j + 1] - sigmas[j]) * v.float()
    return x


def step_log_prob(model, transformer, trajectory: torch.Tensor, text: dict[str, torch.Tensor], sigmas: torch.Tensor,
                  j: int, noise_level: float, guidance_scale: float = 1.0):
    """(log_prob, mean, std) of the step trajectory[:, j] -> trajectory[:, j + 1] under `transformer`'s guided velocity."""
    x = trajectory[:, j]
    v = model.guided_velocity(transformer, x.to(model_dtype(transformer)), sigmas[j].expand(len(x)), text, guidance_scale)
    _, log_prob, mean, std = sde_step(v, x, sigmas[j], sigmas[j + 1], noise_level, prev_sample=trajectory[:, j + 1],
                                      sigma_max=float(sigmas[1]))
    return log_prob, mean, std


@torch.no_grad()
def rollout_log_probs(model, transformer, rollout: Rollout) -> torch.Tensor:
    """Recompute a rollout's (G, T) log-probs as the update does; equal to the recorded ones under the sampling policy."""
    steps = range(len(rollout.sigmas) - 1)
    return torch.stack([step_log_prob(model, transformer, rollout.trajectory, rollout.text, rollout.sigmas, j,
                                      rollout.noise_level, rollout.guidance_scale)[0] for j in steps], 1)


class _Scorer:
    """FlowGRPOReward behind futures: inline for a local model, in threads for a service (overlapping sampling)."""

    def __init__(self, reward_fn, background: bool, workers: int):
        self.reward_fn = reward_fn
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="finger-score") if background else None

    def submit(self, frames: np.ndarray, prompts: list[str]) -> Future:
        if self._pool is not None:
            return self._pool.submit(self.reward_fn, frames, prompts)
        future: Future = Future()
        try:
            future.set_result(self.reward_fn(frames, prompts))
        except Exception as err:
            future.set_exception(err)
        return future

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()


def encode_texts(model, prompts: list[str], recipe: FlowGRPORecipe) -> dict[str, torch.Tensor]:
    """The prompts' text inputs in the transformer's dtype, with the negative prompt's beside them under guidance."""
    dtype = model_dtype(model.pipe.transformer)

    def encode(texts: list[str]) -> dict[str, torch.Tensor]:
        return {key: value.to(dtype) if value.is_floating_point() else value
                for key, value in model.encode_prompts(texts, recipe.max_sequence_length).items()}

    text = encode(prompts)
    return text if recipe.guidance_scale == 1 else with_negative(text, encode([recipe.negative_prompt]))


def collect_rollouts(model, policy, scorer: _Scorer, prompts: list[str], recipe: FlowGRPORecipe,
                     generator: torch.Generator, autocast=nullcontext) -> list[Rollout]:
    """Sample a group per prompt; each group is scored (in the background with a service) while the next is sampled.

    `recipe` has its guidance resolved (`resolve_guidance`)."""
    text = encode_texts(model, prompts, recipe)
    rollouts, pending = [], []
    for i, prompt in enumerate(prompts):
        with autocast():
            rollout = sample_group(model, policy, prompt, text_rows(text, slice(i, i + 1)), group_size=recipe.group_size,
                                   num_inference_steps=recipe.num_inference_steps, noise_level=recipe.noise_level,
                                   generator=generator, guidance_scale=recipe.guidance_scale)
        rollouts.append(rollout)
        pending.append(scorer.submit(rollout.frames, [prompt] * recipe.group_size))
    for rollout, future in zip(rollouts, pending):
        rollout.rewards, rollout.info = future.result()
    group_ids = [i for i, r in enumerate(rollouts) for _ in range(len(r.rewards))]
    advantages = group_advantages(np.concatenate([r.rewards for r in rollouts]), group_ids, recipe.std_floor)
    for rollout, adv in zip(rollouts, advantages.split(recipe.group_size)):
        rollout.advantages = adv.to(rollout.trajectory.device)
    return rollouts


def rollout_metrics(rollouts: list[Rollout], std_floor: float) -> dict[str, float]:
    """Reward mean/std, per-dimension means, failures, advantage stats, and how often the std floor bound."""
    from finger_reward.questions import DIMENSIONS

    rewards = np.concatenate([r.rewards for r in rollouts]).astype(np.float64)
    ok = np.isfinite(rewards)
    metrics = {"reward_mean": float(rewards[ok].mean()) if ok.any() else math.nan,
               "reward_std": float(rewards[ok].std()) if ok.any() else math.nan, "failed": int((~ok).sum())}
    for dim in DIMENSIONS:
        values = np.concatenate([r.info[dim] for r in rollouts])
        if np.isfinite(values).any():
            metrics[f"reward/{dim}"] = float(np.nanmean(values))
    stds = [r.rewards[np.isfinite(r.rewards)].std() for r in rollouts if np.isfinite(r.rewards).sum() >= 2]
    metrics["group_std_mean"] = float(np.mean(stds)) if stds else math.nan
    metrics["floored_groups"] = float(np.mean([s < std_floor for s in stds])) if stds else math.nan
    advantages = torch.cat([r.advantages for r in rollouts]).abs()
    metrics.update(advantage_abs_mean=advantages.mean().item(), advantage_abs_max=advantages.max().item())
    if metrics["failed"]:
        errors = [e for r in rollouts for e in r.info["errors"] if e]
        logger.warning("%d of %d videos could not be scored (advantage 0); first error: %s",
                       metrics["failed"], len(rewards), errors[0] if errors else "NaN score")
    return metrics


# ---- the policy update ---------------------------------------------------------------------------


@contextmanager
def reference_model(transformer):
    """The reference policy: the same transformer with its LoRA adapter disabled."""
    transformer.disable_adapters()
    try:
        yield transformer
    finally:
        transformer.enable_adapters()


def policy_update(model, accelerator, policy, optimizer, rollouts: list[Rollout], recipe: FlowGRPORecipe,
                  generator: torch.Generator) -> dict[str, float]:
    """`num_updates` optimizer steps over shuffled, disjoint shares of the step's videos, each over every denoising step."""
    unwrapped = accelerator.unwrap_model(policy)
    trajectory = torch.cat([r.trajectory for r in rollouts])
    text = cat_texts([r.text for r in rollouts])
    old_log_probs = torch.cat([r.log_probs for r in rollouts])
    advantages = torch.cat([r.advantages for r in rollouts])
    sigmas, num_steps = rollouts[0].sigmas, len(rollouts[0].sigmas) - 1
    sums: dict[str, float] = defaultdict(float)
    forwards, start_log_ratio = 0, 0.0
    for update, share in enumerate(torch.randperm(len(trajectory), generator=generator).chunk(recipe.num_updates)):
        batches = share.split(recipe.train_batch_size)
        for b, idx in enumerate(batches):
            idx = idx.to(trajectory.device)
            for j in range(num_steps):
                last = b == len(batches) - 1 and j == num_steps - 1
                sync = nullcontext() if last else accelerator.no_sync(policy)  # all-reduce once per update
                with sync, accelerator.autocast():
                    kl = None
                    if recipe.beta > 0:
                        with torch.no_grad(), reference_model(unwrapped):
                            _, ref_mean, _ = step_log_prob(model, unwrapped, trajectory[idx], text_rows(text, idx),
                                                           sigmas, j, recipe.noise_level, recipe.guidance_scale)
                    log_prob, mean, std = step_log_prob(model, policy, trajectory[idx], text_rows(text, idx), sigmas, j,
                                                        recipe.noise_level, recipe.guidance_scale)
                    if recipe.beta > 0:
                        kl = gaussian_kl(mean, ref_mean, std)
                    loss, step_metrics = grpo_loss(log_prob, old_log_probs[idx, j], advantages[idx],
                                                   recipe.clip_range, kl, recipe.beta)
                    accelerator.backward(loss * (len(idx) / len(share) / num_steps))
                for key, value in step_metrics.items():
                    sums[key] += value
                forwards += 1
                if update == 0:  # still the sampling policy: the ratio must be 1 up to numerics
                    start_log_ratio = max(start_log_ratio, (log_prob - old_log_probs[idx, j]).abs().max().item())
        sums["grad_norm"] += float(accelerator.clip_grad_norm_(lora_parameters(unwrapped), recipe.max_grad_norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    metrics = {key: value / (recipe.num_updates if key == "grad_norm" else forwards) for key, value in sums.items()}
    return {**metrics, "start_log_ratio": start_log_ratio}


# ---- the run ---------------------------------------------------------------------------------------


def resolve_guidance(recipe: FlowGRPORecipe, pipe) -> FlowGRPORecipe:
    """The recipe with `guidance_scale` and `negative_prompt` taken from the pipeline's family where they are None."""
    scale = recipe.guidance_scale if recipe.guidance_scale is not None else default_guidance_scale(pipe)
    if scale is None:
        raise ValueError(f"no default guidance_scale for {type(pipe).__name__}; set guidance_scale (1.0: no guidance)")
    negative = recipe.negative_prompt if recipe.negative_prompt is not None else ""  # what both pipelines use for None
    return replace(recipe, guidance_scale=float(scale), negative_prompt=negative)


def evaluate_held_out(model, transformer, prompts: list[str], recipe: FlowGRPORecipe, reward_fn, out_dir: Path,
                      step: int, fps: float) -> dict[str, float]:
    """The held-out evaluation after `step` updates: `sample_ode` of every prompt at the seeds eval_seed + k,
    guided as the policy samples, scored and saved by `held_out.evaluate`; returns its `eval/...` metrics."""
    text = encode_texts(model, prompts, recipe)
    seeds = [recipe.eval_seed + k for k in range(recipe.eval_videos_per_prompt)]
    steps = recipe.eval_num_inference_steps or recipe.num_inference_steps

    def sample(i: int, seeds: list[int]) -> np.ndarray:
        rows = text_rows(text, torch.tensor([i] * len(seeds), device=next(iter(text.values())).device))
        latents = sample_ode(model, transformer, rows, [torch.Generator().manual_seed(s) for s in seeds],
                             num_inference_steps=steps, guidance_scale=recipe.guidance_scale)
        return model.decode(latents)

    return held_out.evaluate(sample, prompts, seeds, reward_fn, out_dir, step, fps=fps)


def load_reward(recipe: FlowGRPORecipe, device):
    """A FingerRewardClient for reward_url, else FingerReward from reward_model; failed videos score NaN."""
    if recipe.reward_url is not None:
        from finger_reward.serve.client import FingerRewardClient

        token = recipe.reward_token or os.environ.get("FINGER_REWARD_TOKEN")
        return FingerRewardClient(recipe.reward_url, token=token, on_error="nan")
    from finger_reward.reward import FingerReward

    return FingerReward.from_pretrained(recipe.reward_model, questions=recipe.reward_questions,
                                        device=recipe.reward_device or device, on_error="nan")


def train(recipe: FlowGRPORecipe, *, pipe=None, reward=None,
          on_rollouts: Callable[[int, list[Rollout]], Any] | None = None) -> list[dict[str, float]]:
    """Run Flow-GRPO for `recipe.max_steps` steps and save the LoRA; returns each step's metrics.

    `pipe` and `reward` (a FingerReward or FingerRewardClient) replace loading them from the
    recipe. `on_rollouts(step, rollouts)` sees each step's scored groups before the update.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from finger_reward.integrations.diffusers import FlowGRPOReward, pipeline_fps
    from finger_reward.serve.client import FingerRewardClient

    accelerator = Accelerator(mixed_precision=recipe.mixed_precision)
    rank = accelerator.process_index
    torch.manual_seed(recipe.seed + rank)
    prompts = read_prompts(recipe.prompts)
    eval_prompts = read_prompts(recipe.eval_prompts) if recipe.eval_prompts is not None else []
    pipe = pipe if pipe is not None else load_pipeline(recipe.pipeline, MIXED_PRECISION[recipe.mixed_precision])
    video = video_model(pipe, num_frames=recipe.num_frames, height=recipe.height, width=recipe.width)
    recipe = resolve_guidance(recipe, pipe)
    fps = pipeline_fps(pipe)  # the rate FingER samples the videos against (Wan 16, LTX-Video 24)
    pipe.to(accelerator.device)
    pipe.vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    transformer = add_lora(pipe.transformer, rank=recipe.lora_rank, alpha=recipe.lora_alpha)
    for param in lora_parameters(transformer):
        param.data = param.data.float()
    if recipe.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.eval()  # no dropout anywhere: the update must recompute the policy that sampled
    optimizer = torch.optim.AdamW(lora_parameters(transformer), lr=recipe.learning_rate)
    policy, optimizer = accelerator.prepare(transformer, optimizer)

    reward = reward if reward is not None else load_reward(recipe, accelerator.device)
    reward_fn = FlowGRPOReward(reward, dimension_weights=recipe.dimension_weights, video_fps=fps)
    scorer = _Scorer(reward_fn, background=isinstance(reward, FingerRewardClient), workers=min(recipe.prompts_per_step, 8))
    output_dir = Path(recipe.output_dir)
    choose = random.Random(recipe.seed + rank)
    generator = torch.Generator().manual_seed(recipe.seed + rank)
    model = accelerator.unwrap_model(policy)
    loop = {"optimizer": optimizer, "generator": generator, "prompt_choice": choose}
    history: list[dict[str, float]] = []
    if recipe.resume_from_checkpoint:
        history = resume_training(recipe.resume_from_checkpoint, output_dir, rank, model, loop)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=2), encoding="utf-8")
        start_log(output_dir / "metrics.jsonl", history)

    def evaluate_at(step: int) -> dict[str, float]:  # main process only; the others wait for it
        if not eval_prompts or not (step == 0 or step % recipe.eval_every == 0 or step == recipe.max_steps):
            return {}
        metrics = {}
        if accelerator.is_main_process:
            with accelerator.autocast():
                metrics = evaluate_held_out(video, model, eval_prompts, recipe, reward_fn, output_dir / "eval", step, fps)
        accelerator.wait_for_everyone()
        return metrics

    if not history and eval_prompts:  # the base model's point of the held-out curve
        history.append({"step": 0, **evaluate_at(0)})
        if accelerator.is_main_process:
            with open(output_dir / "metrics.jsonl", "a", encoding="utf-8") as log:
                log.write(json.dumps(history[-1]) + "\n")
    first = history[-1]["step"] + 1 if history else 1
    progress = tqdm(range(first, recipe.max_steps + 1), initial=first - 1, total=recipe.max_steps, desc="flow-grpo",
                    disable=not accelerator.is_local_main_process)
    try:
        for step in progress:
            chosen = [prompts[choose.randrange(len(prompts))] for _ in range(recipe.prompts_per_step)]
            start = time.perf_counter()
            rollouts = collect_rollouts(video, policy, scorer, chosen, recipe, generator, accelerator.autocast)
            metrics = {"step": step, **rollout_metrics(rollouts, recipe.std_floor)}
            if on_rollouts is not None:
                on_rollouts(step, rollouts)
            sampled = time.perf_counter()
            metrics.update(policy_update(video, accelerator, policy, optimizer, rollouts, recipe, generator))
            metrics.update({"time/rollout_s": sampled - start, "time/update_s": time.perf_counter() - sampled})
            evaluated = time.perf_counter()
            held = evaluate_at(step)
            if held:
                metrics.update({**held, "time/eval_s": time.perf_counter() - evaluated})
            history.append(metrics)
            progress.set_postfix(reward=f"{metrics['reward_mean']:.4f}", kl=f"{metrics['kl']:.2e}")
            if accelerator.is_main_process:
                with open(output_dir / "metrics.jsonl", "a", encoding="utf-8") as log:
                    log.write(json.dumps(metrics) + "\n")
                if step % recipe.logging_steps == 0:
                    logger.info("step %d: %s", step, {k: round(v, 6) for k, v in metrics.items()})
            if step % recipe.save_steps == 0 and step < recipe.max_steps:
                checkpoint = output_dir / f"{CHECKPOINT_PREFIX}-{step}"
                if accelerator.is_main_process:
                    save_lora(type(pipe), pipe.transformer, checkpoint)
                save_training(checkpoint, rank, model, history, loop)
                accelerator.wait_for_everyone()
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            save_lora(type(pipe), pipe.transformer, output_dir)
    finally:
        scorer.close()
    return history


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    return train(parse_recipe(FlowGRPORecipe, argv))


if __name__ == "__main__":
    main()
