"""Flow-GRPO: the SDE step, advantages and loss by hand; the loop on the real tiny Wan pipeline and tiny FingER model."""

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finger_reward import FingerReward
from finger_reward.integrations.diffusers import pipeline_videos
from finger_reward.recipes import parse_recipe
from finger_reward.serve import ServeConfig
from finger_reward.serve.local import LocalServer
from finger_reward.tiny_wan import make_tiny_wan_pipeline
from finger_reward.trainers.flow_grpo import (
    FlowGRPORecipe, encode_texts, gaussian_kl, group_advantages, grpo_loss, load_pipeline, main, reference_model,
    resolve_guidance, rollout_log_probs, sample_ode, sde_step, step_log_prob, train,
)
from finger_reward.trainers.flow_matching import predict_velocity
from finger_reward.trainers.held_out import contact_sheet
from finger_reward.trainers.video_models import default_guidance_scale, split_negative, video_model

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "flow_grpo_wan.yaml"
PROMPTS = ["a red circle moves left", "a dog runs across the road", "a blue ball flies up"]
EVAL_PROMPTS = ["a green square slides right", "a yellow star spins"]
TINY = dict(group_size=2, prompts_per_step=2, num_inference_steps=3, height=32, width=32, num_frames=5,
            max_sequence_length=16, lora_rank=4, lora_alpha=8, learning_rate=1e-2, clip_range=0.2, beta=0.1,
            std_floor=0.01, num_updates=2, train_batch_size=1, mixed_precision="no", seed=0)


# ---- sde_step ------------------------------------------------------------------------------------


def paper_mean_std(v, x, sigma, sigma_next, a):
    """Flow-GRPO's Euler-Maruyama step written from the reverse SDE: drift v - s_t^2/2 * score."""
    s_t = a * math.sqrt(sigma / (1 - sigma))
    score = -(x + (1 - sigma) * v) / sigma  # rectified flow: E[noise | x_t] = x_t + (1 - t) v
    return x + (v - 0.5 * s_t**2 * score) * (sigma_next - sigma), s_t * math.sqrt(sigma - sigma_next)


def test_sde_step_log_prob_is_the_gaussian_density():
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 4, 2, 4, 4, generator=g), torch.randn(3, 4, 2, 4, 4, generator=g)
    prev, log_prob, mean, std = sde_step(v, x, 0.8, 0.5, 0.7, generator=torch.Generator().manual_seed(1))
    want_mean, want_std = paper_mean_std(v, x, 0.8, 0.5, 0.7)
    torch.testing.assert_close(mean, want_mean, atol=1e-6, rtol=1e-6)
    assert std.flatten().tolist() == pytest.approx([want_std])
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(prev, want_mean + want_std * eps, atol=1e-6, rtol=1e-6)  # noise from the generator
    want = torch.distributions.Normal(want_mean, want_std).log_prob(prev).mean(dim=(1, 2, 3, 4))
    torch.testing.assert_close(log_prob, want, atol=1e-5, rtol=1e-6)
    assert log_prob.shape == (3,)

    _, scored, _, _ = sde_step(v, x, 0.8, 0.5, 0.7, prev_sample=prev)  # the update's path: score a given sample
    torch.testing.assert_close(scored, log_prob, atol=1e-6, rtol=0)
    _, far, _, _ = sde_step(v, x, 0.8, 0.5, 0.7, prev_sample=prev + 2 * want_std)
    assert (far < log_prob - 1).all()


def test_sde_step_keeps_the_flow_marginals():
    """Data at one point c: x_t ~ N((1 - t) c, t^2) and v = (x_t - c) / t exactly; one SDE step lands on N((1 - t') c, t'^2).

    The sign of the drift correction matters: flipped, the std after the step is ~2% too large.
    """
    c, t, t_next = 0.3, 0.5, 0.49
    g = torch.Generator().manual_seed(0)
    x = (1 - t) * c + t * torch.randn(400_000, 1, generator=g)
    prev, _, _, _ = sde_step((x - c) / t, x, t, t_next, 0.7, generator=g)
    assert prev.mean().item() == pytest.approx((1 - t_next) * c, abs=3e-3)
    assert prev.std().item() == pytest.approx(t_next, rel=3e-3)


def test_sde_step_per_item_sigmas_and_the_first_step():
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    prev = torch.randn(2, 3, 4, generator=g)
    _, both, _, _ = sde_step(v, x, torch.tensor([1.0, 0.5]), torch.tensor([0.8, 0.2]), 0.7, prev_sample=prev, sigma_max=0.8)
    _, first, mean, std = sde_step(v[:1], x[:1], 1.0, 0.8, 0.7, prev_sample=prev[:1], sigma_max=0.8)
    _, second, _, _ = sde_step(v[1:], x[1:], 0.5, 0.2, 0.7, prev_sample=prev[1:], sigma_max=0.8)
    torch.testing.assert_close(both, torch.cat([first, second]))
    # at sigma = 1, Flow-GRPO puts sigma_max (the schedule's second sigma) in 1 - sigma
    assert std.item() == pytest.approx(0.7 * math.sqrt(1 / (1 - 0.8)) * math.sqrt(0.2))
    with pytest.raises(ValueError, match="sigma_max"):
        sde_step(v, x, 1.0, 0.8, 0.7, prev_sample=prev)
    with pytest.raises(ValueError, match="noise_level must be > 0"):
        sde_step(v, x, 0.5, 0.2, 0.0, prev_sample=prev)
    with pytest.raises(ValueError, match="sigma > sigma_next"):
        sde_step(v, x, 0.2, 0.5, 0.7, prev_sample=prev)


def test_gaussian_kl_matches_torch():
    g = torch.Generator().manual_seed(0)
    mean, ref = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    std = torch.tensor(0.3)
    want = torch.distributions.kl_divergence(torch.distributions.Normal(mean, std), torch.distributions.Normal(ref, std))
    torch.testing.assert_close(gaussian_kl(mean, ref, std), want.mean(dim=(1, 2)))


# ---- group_advantages ----------------------------------------------------------------------------


def test_group_advantages_by_hand():
    adv = group_advantages([0.2, 0.4, 0.9, 0.5], ["a", "a", "b", "b"], std_floor=0.01)
    assert adv.dtype == torch.float32
    assert adv.tolist() == pytest.approx([-1, 1, 1, -1], abs=1e-6)  # (r - mean) / population std, per group
    assert group_advantages(torch.tensor([0.2, 0.4, 0.9, 0.5]), [0, 0, 1, 1], 0.01).tolist() == pytest.approx(adv.tolist())


def test_std_floor_keeps_near_equal_rewards_small():
    near = [0.500, 0.502, 0.501]  # std 8.2e-4: noise, not a preference
    assert group_advantages(near, [0, 0, 0], std_floor=0.05).tolist() == pytest.approx([-0.02, 0.02, 0.0], abs=1e-6)
    unfloored = group_advantages(near, [0, 0, 0], std_floor=1e-9).tolist()
    assert unfloored == pytest.approx([-1.2247, 1.2247, 0.0], abs=1e-3)  # what plain GRPO would make of it
    # a real gap is untouched by the floor
    assert group_advantages([0.3, 0.7], [0, 0], std_floor=0.05).tolist() == pytest.approx([-1, 1])


def test_nan_rewards_get_zero_advantage_and_stay_out_of_the_statistics():
    adv = group_advantages([0.2, math.nan, 0.6, 0.9, math.nan], [0, 0, 0, 1, 1], std_floor=0.01)
    assert adv.tolist() == pytest.approx([-1, 0, 1, 0, 0], abs=1e-6)  # group 1: one valid reward, nothing to compare
    as_zero = group_advantages([0.2, 0.0, 0.6], [0, 0, 0], std_floor=0.01)  # what a silent 0 would have done
    assert as_zero[0].item() > -0.5 and as_zero[1].item() < -1
    assert group_advantages([math.nan, math.nan], [0, 0], 0.01).tolist() == [0, 0]
    with pytest.raises(ValueError, match="std_floor must be > 0"):
        group_advantages([0.1, 0.2], [0, 0], std_floor=0)
    with pytest.raises(ValueError, match="one group id per reward"):
        group_advantages([0.1, 0.2], [0], std_floor=0.1)


# ---- grpo_loss -----------------------------------------------------------------------------------


def test_grpo_loss_clips_the_ratio_where_the_advantage_pushes_it():
    log_prob = torch.tensor([0.5, -0.5, 0.5, -0.5], requires_grad=True)  # ratios e^0.5 = 1.65 and e^-0.5 = 0.61
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss, metrics = grpo_loss(log_prob, torch.zeros(4), advantages, clip_range=0.2)
    e, ie = math.exp(0.5), math.exp(-0.5)
    # A > 0, r > 1.2: clipped at 1.2. A > 0, r < 0.8: unclipped. A < 0, r > 1.2: unclipped. A < 0, r < 0.8: clipped at 0.8.
    assert loss.item() == pytest.approx((-1.2 - ie + e + 0.8) / 4)
    loss.backward()
    assert log_prob.grad.tolist() == pytest.approx([0, -ie / 4, e / 4, 0])
    assert metrics["clip_fraction"] == 1.0 and metrics["kl"] == 0
    assert metrics["approx_kl"] == pytest.approx(0.125)

    inside = torch.tensor([0.05, -0.05], requires_grad=True)
    loss, metrics = grpo_loss(inside, torch.zeros(2), torch.tensor([1.0, -2.0]), clip_range=0.2)
    loss.backward()
    assert metrics["clip_fraction"] == 0
    assert inside.grad.tolist() == pytest.approx([-math.exp(0.05) / 2, 2 * math.exp(-0.05) / 2])


def test_grpo_loss_adds_beta_times_kl():
    log_prob, old, adv = torch.zeros(2), torch.zeros(2), torch.tensor([1.0, -1.0])
    kl = torch.tensor([0.2, 0.4])
    loss, metrics = grpo_loss(log_prob, old, adv, 0.1, kl=kl, beta=0.5)
    assert loss.item() == pytest.approx(0.0 + 0.5 * 0.3) and metrics["kl"] == pytest.approx(0.3)
    with pytest.raises(ValueError, match="needs kl"):
        grpo_loss(log_prob, old, adv, 0.1, beta=0.5)


# ---- the recipe ----------------------------------------------------------------------------------


def test_recipe_from_the_wan_yaml_with_overrides(tmp_path):
    recipe = FlowGRPORecipe.from_yaml(CONFIG, prompts="p.txt", reward_model="m", output_dir=str(tmp_path))
    assert recipe.pipeline == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers" and recipe.mixed_precision == "bf16"
    assert recipe.clip_range == 1e-4 and isinstance(recipe.beta, float) and recipe.std_floor == 0.05
    assert FlowGRPORecipe.from_yaml(CONFIG, prompts="p", reward_model="m", output_dir="o", learning_rate="3e-4").learning_rate == 3e-4
    with pytest.raises(ValueError, match="unknown key.*grop_size.*valid keys"):
        FlowGRPORecipe.from_yaml(CONFIG, grop_size=4)
    with pytest.raises(ValueError, match="prompts and output_dir must be set"):
        FlowGRPORecipe.from_yaml(CONFIG, reward_model="m")
    with pytest.raises(ValueError, match="exactly one of reward_model"):
        FlowGRPORecipe.from_yaml(CONFIG, prompts="p", output_dir="o", reward_model="m", reward_url="http://x")
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        FlowGRPORecipe(prompts="p", output_dir="o", reward_model="m", group_size=1)
    with pytest.raises(ValueError, match="learning_rate must be a number, got 'fast'"):
        FlowGRPORecipe(prompts="p", output_dir="o", reward_model="m", learning_rate="fast")
    with pytest.raises(ValueError, match="4k \\+ 1"):
        FlowGRPORecipe(prompts="p", output_dir="o", reward_model="m", num_frames=8)


def test_recipe_flags_win_over_the_yaml_as_in_trl(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("prompts: p.txt\noutput_dir: out\nreward_model: m\nlearning_rate: 1e-4\nmixed_precision: no\n"
                      "dimension_weights: {visual_quality: 1, text_alignment: 2}\n")
    recipe = parse_recipe(FlowGRPORecipe, ["--config", str(config), "--group_size", "16", "--learning_rate", "3e-5"])
    assert (recipe.group_size, recipe.learning_rate, recipe.mixed_precision) == (16, 3e-5, "no")
    assert recipe.dimension_weights == {"visual_quality": 1, "text_alignment": 2}
    flags = ["--config", str(config), "--dimension_weights", '{"text_alignment": 3}']
    assert parse_recipe(FlowGRPORecipe, flags).dimension_weights == {"text_alignment": 3}
    with pytest.raises(ValueError, match="dimension_weights must be a JSON object"):
        parse_recipe(FlowGRPORecipe, ["--config", str(config), "--dimension_weights", "text_alignment=3"])
    config.write_text(config.read_text() + "grop_size: 4\n")
    with pytest.raises(ValueError, match="grop_size"):
        parse_recipe(FlowGRPORecipe, ["--config", str(config)])


# ---- the loop on the tiny pipeline ---------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow_grpo")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    (root / "eval.txt").write_text("\n".join(EVAL_PROMPTS) + "\n", encoding="utf-8")
    return {"root": root, "pipeline": make_tiny_wan_pipeline(root / "pipeline"), "prompts": root / "prompts.txt",
            "eval_prompts": root / "eval.txt"}


def snapshot(pipe) -> dict[str, torch.Tensor]:
    return {f"{part}.{name}": p.detach().clone() for part in ("transformer", "vae", "text_encoder")
            for name, p in getattr(pipe, part).named_parameters()}


@pytest.fixture(scope="module")
def run(files, tiny_model_dir):
    """Two steps at 32x32, 5 frames, 3 SDE steps, G=2, FingER in-process (loaded from the recipe's reward_model),
    Wan's default guidance (5.0), held-out evaluation of two prompts before training and after the last step."""
    pipe = load_pipeline(str(files["pipeline"]), torch.float32)
    recipe = FlowGRPORecipe(pipeline=str(files["pipeline"]), prompts=str(files["prompts"]), reward_model=str(tiny_model_dir),
                            output_dir=str(files["root"] / "out"), max_steps=2, save_steps=1,
                            eval_prompts=str(files["eval_prompts"]), eval_every=2, eval_seed=7, **TINY)
    video = video_model(pipe, num_frames=recipe.num_frames, height=recipe.height, width=recipe.width)
    seen = {}

    def on_rollouts(step, rollouts):  # before the update: the transformer is the policy that sampled
        seen[step] = {"rollouts": rollouts, "recomputed": [rollout_log_probs(video, pipe.transformer, r) for r in rollouts],
                      "reference": [_with_adapter_off(video, pipe.transformer, r) for r in rollouts],
                      "unguided": [_unguided(video, pipe.transformer, r) for r in rollouts]}
        if step == 1:
            seen["weights"] = snapshot(pipe)
            seen["step0"] = [_first_update_terms(video, pipe.transformer, r, recipe) for r in rollouts]

    history = train(recipe, pipe=pipe, on_rollouts=on_rollouts)
    return {"pipe": pipe, "recipe": recipe, "history": history, "seen": seen}


def _with_adapter_off(video, transformer, rollout):
    with reference_model(transformer):
        return rollout_log_probs(video, transformer, rollout)


def _unguided(video, transformer, rollout):
    """The rollout's log-probs as an update that forgot the guidance would compute them."""
    rollout = copy.copy(rollout)
    rollout.guidance_scale = 1.0
    return rollout_log_probs(video, transformer, rollout)


@torch.no_grad()
def _first_update_terms(video, transformer, rollout, recipe):
    """Per denoising step, what the first update computes: log-ratio to the sampling policy, KL to the reference,
    and the loss, on the guided velocity."""
    terms = []
    for j in range(len(rollout.sigmas) - 1):
        args = (rollout.trajectory, rollout.text, rollout.sigmas, j, rollout.noise_level, rollout.guidance_scale)
        log_prob, mean, std = step_log_prob(video, transformer, *args)
        with reference_model(transformer):
            _, ref_mean, _ = step_log_prob(video, transformer, *args)
        kl = gaussian_kl(mean, ref_mean, std)
        loss, metrics = grpo_loss(log_prob, rollout.log_probs[:, j], rollout.advantages, recipe.clip_range, kl, recipe.beta)
        terms.append({"log_ratio": (log_prob - rollout.log_probs[:, j]).abs().max().item(), "kl": kl.abs().max().item(),
                      "loss": loss.item(), "want_loss": -rollout.advantages.mean().item(), **metrics})
    return terms


def test_recorded_log_probs_equal_a_recomputation(run):
    for step in (1, 2):
        for rollout, recomputed in zip(run["seen"][step]["rollouts"], run["seen"][step]["recomputed"]):
            assert rollout.log_probs.shape == (2, 3) and rollout.trajectory.shape[:2] == (2, 4)
            assert rollout.guidance_scale == 5.0 and "negative_encoder_hidden_states" in rollout.text  # Wan's default
            assert torch.isfinite(rollout.log_probs).all()
            torch.testing.assert_close(recomputed, rollout.log_probs, atol=1e-4, rtol=0)
    assert all(m["start_log_ratio"] < 1e-4 for m in run["history"] if m["step"])  # the first update starts on-policy
    # the check can fail: the same trajectories under the unguided velocity are another policy
    gap = max((u - r.log_probs).abs().max().item() for r, u in zip(run["seen"][1]["rollouts"], run["seen"][1]["unguided"]))
    assert gap > 1e-3  # 10x the tolerance above (log-probs are means over the latent's elements)


def test_first_update_under_guidance_keeps_the_on_policy_identities(run):
    """Before any update, with guidance as without: ratio 1, KL to the reference 0 (the LoRA starts at zero), nothing
    clipped, so the loss is -mean(advantage) at every denoising step."""
    for terms in run["seen"]["step0"]:
        for t in terms:
            assert t["log_ratio"] < 1e-4 and t["kl"] < 1e-10 and t["clip_fraction"] == 0
            assert t["loss"] == pytest.approx(t["want_loss"], abs=1e-4)
            assert t["policy_loss"] == pytest.approx(t["want_loss"], abs=1e-4)
    # the check can fail: after step 1's update the policy is no longer the reference
    step2 = run["seen"][2]
    gap = max((ref - r.log_probs).abs().max().item() for r, ref in zip(step2["rollouts"], step2["reference"]))
    assert gap > 1e-4


def test_rewards_are_finger_scores_of_the_decoded_videos(run, tiny_model_dir):
    reward = FingerReward.from_pretrained(tiny_model_dir)
    assert run["history"][0]["step"] == 0  # the held-out evaluation of the base model
    for step, metrics in zip((1, 2), run["history"][1:]):
        rollouts = run["seen"][step]["rollouts"]
        all_rewards = []
        for rollout in rollouts:
            assert rollout.frames.shape == (2, 5, 32, 32, 3) and 0 <= rollout.frames.min() <= rollout.frames.max() <= 1
            videos = pipeline_videos(rollout.frames)
            direct = [s.overall for s in reward.score(videos, rollout.prompt, video_fps=16)]  # at Wan's frame rate
            assert rollout.rewards.tolist() == pytest.approx(direct, abs=1e-6)
            unrated = [s.overall for s in reward.score(videos, rollout.prompt)]  # frames taken as sampled at 2 fps
            assert max(abs(a - b) for a, b in zip(unrated, direct)) > 1e-6  # so the frame rate did reach FingER
            assert rollout.prompt in PROMPTS and rollout.info["success"].all()
            all_rewards += direct
        assert metrics["reward_mean"] == pytest.approx(np.mean(all_rewards), abs=1e-6)
        assert metrics["reward_std"] == pytest.approx(np.std(all_rewards), abs=1e-6)
        assert {"reward/visual_quality", "clip_fraction", "kl", "advantage_abs_mean", "grad_norm"} <= set(metrics)
        advantages = torch.cat([r.advantages for r in rollouts])
        want = group_advantages(all_rewards, [0, 0, 1, 1], TINY["std_floor"])
        torch.testing.assert_close(advantages, want)


def test_only_lora_weights_change(run):
    before, after = run["seen"]["weights"], snapshot(run["pipe"])
    assert before.keys() == after.keys()
    lora = [name for name in before if "lora_" in name]
    assert lora and all(name.startswith("transformer.") for name in lora)
    for name in before:
        if name in lora:
            assert not torch.equal(before[name], after[name]), f"{name} did not train"
        else:
            assert torch.equal(before[name], after[name]), f"frozen {name} changed"
    trainable = [name for name, p in run["pipe"].transformer.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)


def test_saved_lora_loads_into_the_pipeline(run, files):
    out = Path(run["recipe"].output_dir)
    assert (out / "checkpoint-1" / "pytorch_lora_weights.safetensors").exists()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1, 2]
    fresh = load_pipeline(str(files["pipeline"]), torch.float32)
    g = torch.Generator().manual_seed(0)
    x, embeds = torch.randn(1, 16, 2, 4, 4, generator=g), torch.randn(1, 16, 32, generator=g)
    with torch.no_grad():
        base = predict_velocity(fresh.transformer, x, torch.tensor([0.6]), embeds)
        fresh.load_lora_weights(out)
        loaded = predict_velocity(fresh.transformer, x, torch.tensor([0.6]), embeds)
        trained = predict_velocity(run["pipe"].transformer, x, torch.tensor([0.6]), embeds)
    assert (trained - base).abs().max() > 1e-4
    torch.testing.assert_close(loaded, trained, atol=1e-5, rtol=1e-5)


def test_held_out_evaluation_is_deterministic_logged_and_saved(run, files, tiny_model_dir):
    """Before training and after the last step: the eval prompts at seed eval_seed, sampled with the guided ODE, scored,
    logged as eval/*, saved as mp4s, scores.jsonl and a contact sheet; the base model's samples are reproducible."""
    from finger_reward.integrations.diffusers import FlowGRPOReward
    from finger_reward.video import load_video

    out = Path(run["recipe"].output_dir)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    evaluated = {r["step"]: r for r in rows if "eval/reward_mean" in r}
    assert sorted(evaluated) == [0, 2]  # eval_every=2: before training and at max_steps=2
    assert {"eval/visual_quality", "eval/text_alignment", "eval/failed"} <= set(evaluated[0])
    assert "time/eval_s" in evaluated[2] and "reward_mean" in evaluated[2] and "reward_mean" not in evaluated[0]

    # step 0 is the base model: a fresh pipeline's guided ODE samples at the same seed give the same frames and scores
    pipe = load_pipeline(str(files["pipeline"]), torch.float32)
    video = video_model(pipe, num_frames=5, height=32, width=32)
    recipe = resolve_guidance(run["recipe"], pipe)
    text = encode_texts(video, EVAL_PROMPTS, recipe)
    frames = np.concatenate([video.decode(sample_ode(video, pipe.transformer, {k: v[i:i + 1] for k, v in text.items()},
                                                     [torch.Generator().manual_seed(7)], num_inference_steps=3,
                                                     guidance_scale=5.0)) for i in range(2)])
    reward = FlowGRPOReward(FingerReward.from_pretrained(tiny_model_dir), video_fps=16.0)  # Wan's rate
    want = [reward(frames[i:i + 1], [p]) for i, p in enumerate(EVAL_PROMPTS)]
    assert evaluated[0]["eval/reward_mean"] == pytest.approx(np.mean([w[0][0] for w in want]), abs=1e-6)
    assert evaluated[0]["eval/visual_quality"] == pytest.approx(np.mean([w[1]["visual_quality"][0] for w in want]), abs=1e-6)
    scores = [json.loads(line) for line in (out / "eval" / "step-000000" / "scores.jsonl").read_text().splitlines()]
    assert [(s["prompt"], s["seed"], s["video"]) for s in scores] == [(EVAL_PROMPTS[0], 7, "000-seed7.mp4"),
                                                                       (EVAL_PROMPTS[1], 7, "001-seed7.mp4")]
    for i, score in enumerate(scores):
        clip = load_video(out / "eval" / "step-000000" / score["video"], fps=1e6, max_frames=1 << 20,
                          max_pixels=1 << 30, patch_factor=1)
        assert clip.frames.shape == (5, 3, 32, 32) and clip.fps == pytest.approx(16.0)  # Wan's rate
        assert score["reward"] == pytest.approx(float(want[i][0][0]), abs=1e-6)
    # the policy changed, so the final evaluation differs (the check can fail)
    assert evaluated[2]["eval/reward_mean"] != evaluated[0]["eval/reward_mean"]

    sheet = np.asarray(Image.open(out / "eval" / "step-000000.png"))
    assert sheet.shape == (2 * 32 + 2, 5 * 32 + 4 * 2, 3)  # a row per video, every one of its 5 frames
    np.testing.assert_array_equal(sheet[:32, :32], np.round(frames[0, 0] * 255).astype(np.uint8))
    assert (out / "eval" / "step-000002.png").is_file() and not (out / "eval" / "step-000001.png").exists()


def test_contact_sheet_spreads_frames_evenly():
    videos = [np.full((9, 4, 6, 3), t, dtype=np.uint8) + np.arange(9, dtype=np.uint8)[:, None, None, None] * 10
              for t in (0, 100)]
    sheet = contact_sheet(videos, columns=3, gap=1)
    assert sheet.shape == (2 * 4 + 1, 3 * 6 + 2, 3)
    assert [sheet[0, k * 7, 0] for k in range(3)] == [0, 40, 80]  # frames 0, 4, 8
    assert [sheet[5, k * 7, 0] for k in range(3)] == [100, 140, 180]
    assert (sheet[4] == 255).all() and (sheet[:, 6] == 255).all()  # the gaps
    with pytest.raises(ValueError, match="one frame size"):
        contact_sheet([videos[0], videos[0][:, :2]])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        contact_sheet([np.full((2, 4, 4, 3), 2.0)])


def test_guided_ode_equals_the_pipelines_own_sampling():
    """Our guided velocity and ODE are the pipeline's: WanPipeline (guidance 5) and LTXPipeline (3) sampling the
    same noise give the same latents; without guidance they do not (so the check can fail)."""
    from finger_reward.tiny_ltx import build_tiny_ltx_pipeline
    from finger_reward.tiny_wan import build_tiny_wan_pipeline

    for build, frames, extra in ((build_tiny_wan_pipeline, 5, {}), (build_tiny_ltx_pipeline, 9, {"frame_rate": 25})):
        pipe = build(seed=0)
        video = video_model(pipe, num_frames=frames, height=32, width=32)
        recipe = resolve_guidance(FlowGRPORecipe(prompts="p", output_dir="o", reward_model="m", max_sequence_length=16,
                                                 num_frames=frames, height=32, width=32), pipe)
        assert recipe.guidance_scale == default_guidance_scale(pipe) and recipe.negative_prompt == ""
        text = encode_texts(video, ["a red circle moves"], recipe)
        want = pipe("a red circle moves", num_frames=frames, height=32, width=32, num_inference_steps=3,
                    guidance_scale=recipe.guidance_scale, generator=torch.Generator().manual_seed(3),
                    output_type="latent", max_sequence_length=16, **extra).frames
        ours = sample_ode(video, pipe.transformer, text, [torch.Generator().manual_seed(3)], num_inference_steps=3,
                          guidance_scale=recipe.guidance_scale)
        torch.testing.assert_close(ours, want.float(), atol=1e-5, rtol=1e-5)
        unguided = sample_ode(video, pipe.transformer, text, [torch.Generator().manual_seed(3)], num_inference_steps=3)
        assert (unguided - want).abs().max() > 1e-3

        # the batched guided velocity is v_u + s (v_c - v_u) of two separate forwards
        cond, uncond = split_negative(text)
        x, sigmas = torch.randn_like(ours), torch.tensor([0.7])
        with torch.no_grad():
            v_c, v_u = (video.velocity(pipe.transformer, x, sigmas, t) for t in (cond, uncond))
            guided = video.guided_velocity(pipe.transformer, x, sigmas, text, 4.0)
        torch.testing.assert_close(guided, v_u + 4.0 * (v_c - v_u), atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="needs the negative prompt"):
            video.guided_velocity(pipe.transformer, x, sigmas, cond, 4.0)


def test_guidance_defaults_and_checks():
    from finger_reward.tiny_wan import build_tiny_wan_pipeline

    pipe = build_tiny_wan_pipeline(seed=0)
    assert default_guidance_scale(pipe) == 5.0 and default_guidance_scale(object()) is None
    base = dict(prompts="p", output_dir="o", reward_model="m")
    off = resolve_guidance(FlowGRPORecipe(**base, guidance_scale=1.0, negative_prompt="blurry"), pipe)
    assert (off.guidance_scale, off.negative_prompt) == (1.0, "blurry")
    video = video_model(pipe, num_frames=5, height=32, width=32)
    assert set(encode_texts(video, ["a cat"], FlowGRPORecipe(**base, guidance_scale=1.0, negative_prompt="",
                                                            max_sequence_length=16))) == {"encoder_hidden_states"}
    with pytest.raises(ValueError, match="guidance_scale must be >= 1"):
        FlowGRPORecipe(**base, guidance_scale=0.5)
    with pytest.raises(ValueError, match="eval_every=0"):
        FlowGRPORecipe(**base, eval_every=0)
    with pytest.raises(ValueError, match="eval_num_inference_steps must be > 0"):
        FlowGRPORecipe(**base, eval_num_inference_steps=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_on_the_gpu_samples_scores_and_updates(files, tiny_model_dir, tmp_path):
    """The shipped precision: frozen weights bf16 (VAE float32), LoRA and the SDE math float32, bf16 autocast."""
    pipe = load_pipeline(str(files["pipeline"]), torch.bfloat16)
    recipe = FlowGRPORecipe(pipeline=str(files["pipeline"]), prompts=str(files["prompts"]), reward_model=str(tiny_model_dir),
                            output_dir=str(tmp_path / "bf16"), max_steps=2, **{**TINY, "mixed_precision": "bf16"})
    video = video_model(pipe, num_frames=recipe.num_frames, height=recipe.height, width=recipe.width)
    seen = {}

    def on_rollouts(step, rollouts):
        with torch.autocast(pipe.transformer.device.type, dtype=torch.bfloat16):
            seen[step] = [(r.log_probs, rollout_log_probs(video, pipe.transformer, r)) for r in rollouts]

    history = train(recipe, pipe=pipe, on_rollouts=on_rollouts)
    assert pipe.transformer.device.type == "cuda" and len(history) == 2
    assert all(math.isfinite(h[key]) for h in history for key in ("reward_mean", "kl", "policy_loss", "grad_norm"))
    for recorded, recomputed in seen[1]:
        assert recorded.dtype == torch.float32 and torch.isfinite(recorded).all()
        torch.testing.assert_close(recomputed.float(), recorded, atol=5e-2, rtol=0)  # bf16 rounding only
    lora = {p.dtype for name, p in pipe.transformer.named_parameters() if "lora_" in name}
    assert lora == {torch.float32}


def test_wan22_ti2v_layout_trains_and_its_per_token_timesteps_equal_one_per_video(files, tiny_model_dir, tmp_path):
    """Wan2.2-TI2V-5B's layout (48-channel latents, 16x VAE with patchify, expand_timesteps): one step runs, and
    the sampler's one timestep per video gives the velocity the pipeline's per-token timesteps give."""
    from finger_reward.tiny_wan import build_tiny_wan_pipeline

    pipe = build_tiny_wan_pipeline(seed=0, ti2v=True)
    x, embeds = torch.randn(2, 48, 2, 4, 4), torch.randn(2, 16, 32)
    with torch.no_grad():
        per_video = predict_velocity(pipe.transformer, x, torch.tensor([0.3, 0.8]), embeds)
        tokens = 2 * (4 // 2) * (4 // 2)
        per_token = pipe.transformer(hidden_states=x, timestep=torch.tensor([[300.0] * tokens, [800.0] * tokens]),
                                     encoder_hidden_states=embeds, return_dict=False)[0]
    torch.testing.assert_close(per_video, per_token, atol=1e-5, rtol=1e-5)

    sizes = {**TINY, "height": 64, "width": 64}
    recipe = FlowGRPORecipe(prompts=str(files["prompts"]), reward_model=str(tiny_model_dir), max_steps=1,
                            output_dir=str(tmp_path / "ti2v"), guidance_scale=1.0, **sizes)  # guidance off
    texts = []
    history = train(recipe, pipe=pipe, on_rollouts=lambda step, rollouts: texts.extend(set(r.text) for r in rollouts))
    assert texts == [{"encoder_hidden_states"}] * 2  # no negative prompt encoded, one forward per velocity
    assert len(history) == 1 and math.isfinite(history[0]["reward_mean"]) and math.isfinite(history[0]["policy_loss"])
    with pytest.raises(ValueError, match="multiples of 32; got num_frames=5, height=48"):
        train(FlowGRPORecipe(prompts=str(files["prompts"]), reward_model=str(tiny_model_dir), max_steps=1,
                             output_dir=str(tmp_path / "bad"), **{**sizes, "height": 48}),
              pipe=build_tiny_wan_pipeline(seed=0, ti2v=True))


def test_ltx_video_trains_with_recomputable_log_probs_and_its_lora_loads(files, tiny_model_dir, tmp_path):
    """LTX-Video (packed latent tokens, text mask, shifted sigmas): rollouts decode to frames, the recorded
    log-probs equal a recomputation, the FingER rewards are finite, and the saved LoRA loads into LTXPipeline."""
    from diffusers import LTXPipeline

    from finger_reward.tiny_ltx import build_tiny_ltx_pipeline, make_tiny_ltx_pipeline

    pipe = build_tiny_ltx_pipeline(seed=0)
    recipe = FlowGRPORecipe(prompts=str(files["prompts"]), reward_model=str(tiny_model_dir), max_steps=2,
                            output_dir=str(tmp_path / "ltx"), **{**TINY, "num_frames": 9})
    video = video_model(pipe, num_frames=9, height=32, width=32)
    seen = {}

    def on_rollouts(step, rollouts):
        seen[step] = [(r, rollout_log_probs(video, pipe.transformer, r)) for r in rollouts]

    history = train(recipe, pipe=pipe, on_rollouts=on_rollouts)
    assert len(history) == 2 and all(math.isfinite(h["reward_mean"]) for h in history)
    for rollout, recomputed in seen[1]:
        assert rollout.frames.shape == (2, 9, 32, 32, 3) and rollout.trajectory.shape[:3] == (2, 4, 3 * 8 * 8)
        assert set(rollout.text) == {"encoder_hidden_states", "encoder_attention_mask", "negative_encoder_hidden_states",
                                     "negative_encoder_attention_mask"} and rollout.guidance_scale == 3.0  # LTX's default
        torch.testing.assert_close(recomputed, rollout.log_probs, atol=1e-4, rtol=0)
    assert history[1]["start_log_ratio"] < 1e-3

    fresh = LTXPipeline.from_pretrained(make_tiny_ltx_pipeline(tmp_path / "ltx_pipe"))
    x, sigmas = torch.randn(1, 3 * 8 * 8, 8), torch.tensor([0.6])
    text = video.encode_prompts(["a red circle moves"], 16)
    fresh_video = video_model(fresh, num_frames=9, height=32, width=32)
    with torch.no_grad():
        base = fresh_video.velocity(fresh.transformer, x, sigmas, text)
        fresh.load_lora_weights(tmp_path / "ltx")
        loaded = fresh_video.velocity(fresh.transformer, x, sigmas, text)
        trained = video.velocity(pipe.transformer, x, sigmas, text)
    assert (trained - base).abs().max() > 1e-5
    torch.testing.assert_close(loaded, trained, atol=1e-5, rtol=1e-5)


def test_video_model_refuses_what_it_cannot_train():
    from finger_reward.tiny_ltx import build_tiny_ltx_pipeline
    from finger_reward.tiny_wan import build_tiny_wan_pipeline

    with pytest.raises(ValueError, match="num_frames = 4k \\+ 1 and height, width multiples of 4; got num_frames=8"):
        video_model(build_tiny_ltx_pipeline(), num_frames=8, height=32, width=32)
    with pytest.raises(ValueError, match="multiples of 16; got num_frames=5, height=40"):
        video_model(build_tiny_wan_pipeline(), num_frames=5, height=40, width=32)
    with pytest.raises(ValueError, match="is not supported; the trainers take"):
        video_model(type("CogVideoXPipeline", (), {"save_lora_weights": None, "transformer": None})(),
                    num_frames=5, height=32, width=32)


def test_resume_from_a_checkpoint_equals_training_straight_through(files, tiny_model_dir, tmp_path):
    """Stop after checkpoint-2 and resume: step 3 samples the same videos and ends with the same LoRA; the held-out
    rows (step 0, the base model; step 2; step 3, the last) survive the rewind and step 3's matches."""
    options = dict(pipeline=str(files["pipeline"]), prompts=str(files["prompts"]), reward_model=str(tiny_model_dir),
                   max_steps=3, save_steps=1, eval_prompts=str(files["eval_prompts"]), eval_every=2, **TINY)
    straight_pipe = load_pipeline(str(files["pipeline"]), torch.float32)
    straight = train(FlowGRPORecipe(output_dir=str(tmp_path / "a"), **options), pipe=straight_pipe)
    assert sorted(p.name for p in (tmp_path / "a").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]

    resumed_pipe = load_pipeline(str(files["pipeline"]), torch.float32)
    resumed = train(FlowGRPORecipe(output_dir=str(tmp_path / "a"), resume_from_checkpoint="last", **options),
                    pipe=resumed_pipe)
    assert [h["step"] for h in resumed] == [0, 1, 2, 3]
    for key in ("reward_mean", "policy_loss", "kl", "grad_norm", "eval/reward_mean"):
        assert resumed[3][key] == pytest.approx(straight[3][key], abs=1e-6), key
    lora = {n: p for n, p in straight_pipe.transformer.named_parameters() if "lora_" in n}
    for name, param in resumed_pipe.transformer.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(param, lora[name], atol=1e-6, rtol=0)
    logged = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged] == [0, 1, 2, 3]
    assert [row["step"] for row in logged if "eval/reward_mean" in row] == [0, 2, 3]


def test_service_rewards_match_local_scores(files, tiny_model_dir):
    """reward_url: a real FingER service scores each group (in a thread, while the next group is sampled)."""
    reward = FingerReward.from_pretrained(tiny_model_dir)
    seen = []
    with LocalServer(FingerReward.from_pretrained(tiny_model_dir), ServeConfig(port=0, max_wait_ms=5)) as server:
        recipe = FlowGRPORecipe(prompts=str(files["prompts"]), reward_url=server.url, max_steps=1,
                                output_dir=str(files["root"] / "out_service"), **TINY)
        history = train(recipe, pipe=load_pipeline(str(files["pipeline"]), torch.float32),
                        on_rollouts=lambda step, rollouts: seen.extend(rollouts))
        assert server.batcher.telemetry.videos_scored == 4  # both groups went through the service
    assert len(history) == 1 and len(seen) == 2
    for rollout in seen:
        direct = [s.overall for s in reward.score(pipeline_videos(rollout.frames), rollout.prompt, video_fps=16)]
        assert rollout.rewards.tolist() == pytest.approx(direct, abs=1e-5)


def test_cli_runs_the_recipe(files, tiny_model_dir, tmp_path):
    overrides = {**TINY, "pipeline": str(files["pipeline"]), "prompts": str(files["prompts"]),
                 "reward_model": str(tiny_model_dir), "output_dir": str(tmp_path / "cli"), "max_steps": 1,
                 "gradient_checkpointing": False}
    flags = [item for key, value in overrides.items() for item in (f"--{key}", str(value))]
    history = main(["--config", str(CONFIG), *flags])
    assert len(history) == 1 and math.isfinite(history[0]["reward_mean"])
    saved = json.loads((tmp_path / "cli" / "recipe.json").read_text())
    assert saved["group_size"] == 2 and saved["mixed_precision"] == "no" and "reward_token" not in saved
    assert (tmp_path / "cli" / "pytorch_lora_weights.safetensors").exists()
