"""Diffusion-DPO trainer: the loss by hand, a tiny real Wan pipeline trained end to end on CPU (first loss ln 2,
the loss falls, only LoRA weights move, the saved LoRA loads into the pipeline), video loading, and the recipe."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from finger_reward.errors import VideoError
from finger_reward.synthetic import write_video
from finger_reward.tiny_wan import make_tiny_wan_pipeline
from finger_reward.trainers.diffusion_dpo import DPORecipe, dpo_loss, load_clip, main, parse_args, read_pairs, train
from finger_reward.trainers.flow_matching import predict_velocity

LN2 = math.log(2)
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "dpo_wan.yaml"
PROMPT = "a red square moves left to right"
TINY = dict(num_frames=5, height=32, width=32, max_sequence_length=16, batch_size=2, lora_rank=4, lora_alpha=4,
            mixed_precision="no", logging_steps=1)


# ---- the loss ---------------------------------------------------------------------------------


def test_dpo_loss_is_ln2_when_policy_equals_reference():
    err_w, err_l = torch.tensor([0.3, 1.2, 0.7]), torch.tensor([0.9, 0.4, 0.7])
    loss, metrics = dpo_loss(err_w, err_l, err_w.clone(), err_l.clone(), beta=5000)
    assert loss.item() == pytest.approx(LN2, abs=1e-7)
    assert metrics["rewards/margin"].item() == 0 and metrics["implicit_accuracy"].item() == 0


def test_dpo_loss_hand_values_and_signs():
    ref = torch.tensor([0.15])
    # Policy denoises the chosen video better and the rejected one worse than the reference: margin
    # -beta/2 ((0.1 - 0.2) - (0.15 - 0.15)) = 0.5 with beta = 10.
    loss, metrics = dpo_loss(torch.tensor([0.1]), torch.tensor([0.2]), ref, ref, beta=10)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.5)), abs=1e-6)
    assert loss.item() < LN2 and metrics["implicit_accuracy"].item() == 1
    assert metrics["rewards/chosen"].item() == pytest.approx(0.25)
    assert metrics["rewards/rejected"].item() == pytest.approx(-0.25)
    assert metrics["rewards/margin"].item() == pytest.approx(0.5)
    # The other way round costs more than ln 2.
    worse, metrics = dpo_loss(torch.tensor([0.2]), torch.tensor([0.1]), ref, ref, beta=10)
    assert worse.item() == pytest.approx(math.log1p(math.exp(0.5)), abs=1e-6) and metrics["implicit_accuracy"].item() == 0
    # Only the difference to the reference counts: the same shift on both videos leaves ln 2.
    shifted, _ = dpo_loss(torch.tensor([0.4]), torch.tensor([0.6]), torch.tensor([0.3]), torch.tensor([0.5]), beta=10)
    assert shifted.item() == pytest.approx(LN2, abs=1e-6)


def test_dpo_loss_gradient_lowers_chosen_error_and_raises_rejected():
    err_w, err_l = torch.tensor([0.5], requires_grad=True), torch.tensor([0.5], requires_grad=True)
    loss, _ = dpo_loss(err_w, err_l, torch.tensor([0.5]), torch.tensor([0.5]), beta=4)
    loss.backward()
    assert err_w.grad.item() > 0 > err_l.grad.item()  # descent lowers err_w, raises err_l
    assert err_w.grad.item() == pytest.approx(1.0)  # sigmoid(0) * beta/2


def test_dpo_loss_rejects_bad_input():
    e = torch.ones(2)
    with pytest.raises(ValueError, match="beta must be positive"):
        dpo_loss(e, e, e, e, beta=0)
    with pytest.raises(ValueError, match="one shape"):
        dpo_loss(e, torch.ones(3), e, e, beta=1)
    with pytest.raises(ValueError, match="1-D"):
        dpo_loss(torch.ones(2, 2), torch.ones(2, 2), torch.ones(2, 2), torch.ones(2, 2), beta=1)


# ---- a tiny Wan pipeline and real .mp4 pairs --------------------------------------------------


def moving_square(shift: int, num_frames: int = 5, height: int = 32, width: int = 32) -> np.ndarray:
    frames = np.full((num_frames, height, width, 3), 20, np.uint8)
    for t in range(num_frames):
        frames[t, 10:22, 2 + 4 * t + shift:14 + 4 * t + shift] = (230, 30, 30)
    return frames


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    return make_tiny_wan_pipeline(tmp_path_factory.mktemp("dpo") / "wan", seed=0)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """Two pairs: a moving square (chosen) against noise (rejected); one relative and one absolute path, and one
    9-frame 48x64 clip to exercise the frame crop and the resize."""
    root = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(0)
    write_video(moving_square(0), root / "w0.mp4")
    write_video(moving_square(1, num_frames=9, height=48, width=64), root / "w1.mp4")
    for i in range(2):
        write_video(rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8), root / f"l{i}.mp4")
    lines = [{"prompt": PROMPT, "chosen": "w0.mp4", "rejected": "l0.mp4", "chosen_score": 0.9, "seed": 1},
             {"prompt": "a red square moves", "chosen": str(root / "w1.mp4"), "rejected": str(root / "l1.mp4")}]
    path = root / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n", encoding="utf-8")
    return path


def all_parameters(pipe) -> dict[str, torch.Tensor]:
    """Every parameter of the pipeline, peft's wrapping undone in the names (base_layer) and LoRA weights left out."""
    return {f"{component}.{name.replace('.base_layer', '')}": p.detach().clone()
            for component in ("transformer", "vae", "text_encoder")
            for name, p in getattr(pipe, component).named_parameters() if "lora_" not in name}


@pytest.fixture(scope="module")
def trained(wan_dir, pairs_file, tmp_path_factory):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(wan_dir)
    before = all_parameters(pipe)
    recipe = DPORecipe(pretrained_model=str(wan_dir), pairs_file=str(pairs_file),
                       output_dir=str(tmp_path_factory.mktemp("run") / "out"), learning_rate=1e-2, max_steps=6,
                       save_steps=3, **TINY)
    return pipe, before, train(recipe, pipe=pipe)


def test_first_step_is_ln2_and_training_lowers_the_loss(trained):
    _, _, result = trained
    losses = [record["loss"] for record in result["history"]]
    assert len(losses) == 6
    assert losses[0] == pytest.approx(LN2, abs=1e-5)  # LoRA B = 0: policy == reference
    assert result["history"][0]["rewards/margin"] == pytest.approx(0, abs=1e-6)
    assert np.mean(losses[-3:]) < LN2 - 0.1
    assert result["history"][-1]["implicit_accuracy"] > 0.5
    assert {"implicit_accuracy", "rewards/chosen", "rewards/rejected", "rewards/margin", "lr"} <= set(result["history"][0])


def test_only_lora_weights_change(trained):
    pipe, before, _ = trained
    after = all_parameters(pipe)
    assert after.keys() == before.keys()
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert changed == []
    lora = {name: p for name, p in pipe.transformer.named_parameters() if "lora_" in name}
    assert lora and any(p.abs().sum() > 0 for name, p in lora.items() if "lora_B" in name)  # B started at zero


def test_saved_lora_loads_into_the_pipeline_and_changes_its_output(trained, wan_dir):
    from diffusers import WanPipeline

    policy, _, result = trained
    out = Path(result["output_dir"])
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "checkpoint-3" / "pytorch_lora_weights.safetensors").is_file()
    saved = json.loads((out / "dpo_recipe.json").read_text())
    assert saved["max_steps"] == 6 and saved["video_fps"] == 16.0  # the clips were read at Wan's rate

    pipe = WanPipeline.from_pretrained(wan_dir)
    pipe.set_progress_bar_config(disable=True)

    def generate():
        return pipe(PROMPT, num_frames=5, height=32, width=32, num_inference_steps=2, max_sequence_length=16,
                    output_type="np", generator=torch.Generator().manual_seed(0)).frames

    base = generate()
    pipe.load_lora_weights(out)
    tuned = generate()
    assert np.abs(tuned - base).max() > 1e-3

    # The loaded LoRA (rank and alpha included) is the trained policy: same velocity on the same input.
    torch.manual_seed(0)
    x_t, sigmas, states = torch.randn(1, 16, 2, 4, 4), torch.tensor([0.6]), torch.randn(1, 16, 32)
    with torch.no_grad():
        expected = predict_velocity(policy.transformer.eval(), x_t, sigmas, states)
        loaded = predict_velocity(pipe.transformer, x_t, sigmas, states)
    torch.testing.assert_close(loaded, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_on_the_gpu_starts_at_ln2_and_keeps_lora_weights_float32(wan_dir, pairs_file, tmp_path):
    """The shipped recipe's precision: frozen weights in bf16 (VAE float32), LoRA float32, bf16 autocast."""
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(wan_dir, dtype={"default": torch.bfloat16, "vae": torch.float32})
    recipe = DPORecipe(pretrained_model=str(wan_dir), pairs_file=str(pairs_file), output_dir=str(tmp_path / "out"),
                       learning_rate=1e-2, max_steps=4, save_steps=0, **{**TINY, "mixed_precision": "bf16"})
    losses = [record["loss"] for record in train(recipe, pipe=pipe)["history"]]
    assert pipe.transformer.device.type == "cuda"
    assert losses[0] == pytest.approx(LN2, abs=1e-3) and all(math.isfinite(loss) for loss in losses)
    lora = {p.dtype for name, p in pipe.transformer.named_parameters() if "lora_" in name}
    frozen = {p.dtype for name, p in pipe.transformer.named_parameters() if "lora_" not in name}
    assert lora == {torch.float32} and torch.bfloat16 in frozen


def test_wan22_ti2v_layout_starts_at_ln2(pairs_file, tmp_path):
    """Wan2.2-TI2V-5B's layout (48-channel latents from a patchifying 16x VAE): pairs encode, the first loss is ln 2."""
    from finger_reward.tiny_wan import build_tiny_wan_pipeline

    recipe = DPORecipe(pairs_file=str(pairs_file), output_dir=str(tmp_path / "ti2v"), max_steps=2, save_steps=0,
                       **{**TINY, "height": 64, "width": 64})
    history = train(recipe, pipe=build_tiny_wan_pipeline(seed=0, ti2v=True))["history"]
    assert history[0]["loss"] == pytest.approx(LN2, abs=1e-5) and math.isfinite(history[1]["loss"])
    with pytest.raises(ValueError, match="multiples of 32"):
        train(DPORecipe(pairs_file=str(pairs_file), output_dir=str(tmp_path / "bad"), max_steps=1,
                        **{**TINY, "height": 48}),
              pipe=build_tiny_wan_pipeline(seed=0, ti2v=True))


def test_ltx_video_starts_at_ln2_trains_and_saves_a_loadable_lora(pairs_file, tmp_path):
    """LTX-Video: pairs encode to packed latent tokens, the first loss is ln 2, training lowers it, the LoRA loads."""
    from diffusers import LTXPipeline

    from finger_reward.tiny_ltx import build_tiny_ltx_pipeline, make_tiny_ltx_pipeline
    from finger_reward.trainers.video_models import video_model

    pipe = build_tiny_ltx_pipeline(seed=0)
    recipe = DPORecipe(pairs_file=str(pairs_file), output_dir=str(tmp_path / "ltx"), learning_rate=1e-2, max_steps=6,
                       save_steps=0, **TINY)
    losses = [record["loss"] for record in train(recipe, pipe=pipe)["history"]]
    assert losses[0] == pytest.approx(LN2, abs=1e-5) and np.mean(losses[-3:]) < LN2

    fresh = LTXPipeline.from_pretrained(make_tiny_ltx_pipeline(tmp_path / "ltx_pipe"))
    video = video_model(fresh, num_frames=5, height=32, width=32)
    x, sigmas = torch.randn(1, 2 * 8 * 8, 8), torch.tensor([0.6])
    text = video.encode_prompts([PROMPT], 16)
    with torch.no_grad():
        fresh.load_lora_weights(tmp_path / "ltx")
        loaded = video.velocity(fresh.transformer, x, sigmas, text)
        trained = video.velocity(pipe.transformer, x, sigmas, text)
    torch.testing.assert_close(loaded, trained, atol=1e-5, rtol=1e-5)


def test_resume_from_a_checkpoint_equals_training_straight_through(wan_dir, pairs_file, tmp_path):
    """Kill after checkpoint-2 and resume: the same LoRA, losses and metrics.jsonl as four steps in one go."""
    from diffusers import WanPipeline

    options = dict(pretrained_model=str(wan_dir), pairs_file=str(pairs_file), learning_rate=1e-2, max_steps=4,
                   save_steps=2, lora_dropout=0.1, **{**TINY, "batch_size": 1})
    straight_pipe = WanPipeline.from_pretrained(wan_dir)
    straight = train(DPORecipe(output_dir=str(tmp_path / "a"), **options), pipe=straight_pipe)["history"]
    assert (tmp_path / "a" / "checkpoint-2" / "loop_state" / "rank0.pt").is_file()

    with open(tmp_path / "a" / "metrics.jsonl", "a") as log:  # what a run killed during step 3 leaves behind
        log.write('{"step": 3, "loss": 0.1}\n{"step": 4, "lo')
    resumed_pipe = WanPipeline.from_pretrained(wan_dir)
    resumed = train(DPORecipe(output_dir=str(tmp_path / "a"), resume_from_checkpoint="last", **options),
                    pipe=resumed_pipe)["history"]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for got, want in zip(resumed, straight):
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-6) and got["lr"] == want["lr"]
    lora = {n: p for n, p in straight_pipe.transformer.named_parameters() if "lora_" in n}
    for name, param in resumed_pipe.transformer.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(param, lora[name], atol=1e-6, rtol=0)
    logged = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged] == [1, 2, 3, 4] and logged[2]["loss"] == pytest.approx(straight[2]["loss"])
    with pytest.raises(ValueError, match="holds no checkpoint-N folder"):
        train(DPORecipe(output_dir=str(tmp_path / "empty"), resume_from_checkpoint="last", **options),
              pipe=WanPipeline.from_pretrained(wan_dir))


def test_cli_with_the_yaml_recipe_and_overrides(wan_dir, pairs_file, tmp_path):
    """One optimizer step of two accumulated micro-steps, gradient checkpointing on, pipeline loaded from its folder."""
    out = tmp_path / "cli"
    flags = {"pretrained_model": wan_dir, "pairs_file": pairs_file, "output_dir": out, "max_steps": 1,
             "gradient_accumulation_steps": 2, **TINY}
    argv = ["--config", str(CONFIG)] + [item for k, v in flags.items() for item in (f"--{k}", str(v))]
    result = main(argv)
    assert result["history"][0]["loss"] == pytest.approx(LN2, abs=1e-5)
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    saved = json.loads((out / "dpo_recipe.json").read_text())
    assert saved["beta"] == 5000 and saved["gradient_checkpointing"] is True  # from the YAML
    assert saved["gradient_accumulation_steps"] == 2 and saved["num_frames"] == 5  # from the flags


# ---- data -------------------------------------------------------------------------------------


def test_load_clip_crops_frames_resizes_and_scales(pairs_file):
    video = load_clip(str(pairs_file.parent / "w1.mp4"), num_frames=5, height=32, width=32)  # 9 frames of 48 x 64
    assert video.shape == (3, 5, 32, 32) and video.dtype == torch.float32
    assert -1 <= video.min() < -0.5 and 0.5 < video.max() <= 1  # dark background, bright red square
    with pytest.raises(VideoError, match="has 5 frames; num_frames=9"):
        load_clip(str(pairs_file.parent / "w0.mp4"), num_frames=9, height=32, width=32)


def test_load_clip_reads_at_the_pipelines_frame_rate(tmp_path, caplog):
    """A 32 fps file trains a 16 fps pipeline on every other frame; a slower file keeps every frame, logged."""
    frames = np.repeat(np.repeat((np.arange(10) * 25).astype(np.uint8)[:, None, None, None], 32, 1), 32, 2)
    write_video(np.repeat(frames, 3, axis=3), tmp_path / "fast.mp4", fps=32)
    brightness = lambda video: ((video.mean(dim=(0, 2, 3)) + 1) * 127.5).tolist()  # noqa: E731
    at_16 = load_clip(str(tmp_path / "fast.mp4"), num_frames=5, height=32, width=32, fps=16)
    assert brightness(at_16) == pytest.approx([25, 75, 125, 175, 225], abs=3)  # frames 1, 3, 5, 7, 9
    as_is = load_clip(str(tmp_path / "fast.mp4"), num_frames=5, height=32, width=32)
    assert brightness(as_is) == pytest.approx([0, 25, 50, 75, 100], abs=3)
    with caplog.at_level("WARNING"):
        slow = load_clip(str(tmp_path / "fast.mp4"), num_frames=5, height=32, width=32, fps=48)
    torch.testing.assert_close(slow, as_is)
    assert "slower than the pipeline's 48 fps" in caplog.text


def test_read_pairs_resolves_paths_and_names_missing_keys(pairs_file, tmp_path):
    pairs = read_pairs(pairs_file)
    assert [p["chosen"] for p in pairs] == [str(pairs_file.parent / "w0.mp4"), str(pairs_file.parent / "w1.mp4")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": PROMPT, "chosen": "a.mp4"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl, line 1: missing key\\(s\\) rejected"):
        read_pairs(bad)


# ---- the recipe -------------------------------------------------------------------------------


def test_yaml_recipe_loads_wan_defaults_and_documents_every_field():
    recipe = DPORecipe.from_yaml(CONFIG)
    assert recipe.pretrained_model == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    assert (recipe.num_frames, recipe.height, recipe.width, recipe.mixed_precision) == (81, 480, 832, "bf16")
    assert recipe.learning_rate == 1e-5 and recipe.beta == 5000
    import yaml

    assert set(yaml.safe_load(CONFIG.read_text())) == set(DPORecipe.__dataclass_fields__)
    assert DPORecipe.from_yaml(CONFIG, beta=100.0).beta == 100
    assert parse_args(["--config", str(CONFIG), "--beta", "250", "--gradient_checkpointing", "false"]) == \
        DPORecipe.from_yaml(CONFIG, beta=250.0, gradient_checkpointing=False)


def test_yaml_unknown_keys_and_bad_values_raise(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("beta: 10\nbetta: 20\n")
    with pytest.raises(ValueError, match="unknown key\\(s\\) betta; valid keys: .*beta"):
        DPORecipe.from_yaml(bad)
    with pytest.raises(ValueError, match="unknown key"):
        parse_args(["--config", str(bad)])
    with pytest.raises(ValueError, match="4k \\+ 1"):
        DPORecipe(num_frames=6)
    with pytest.raises(ValueError, match="multiples of 16"):
        DPORecipe(height=40)
    with pytest.raises(ValueError, match="mixed_precision='fp8'"):
        DPORecipe(mixed_precision="fp8")
    with pytest.raises(ValueError, match="beta=0"):
        DPORecipe(beta=0)
    with pytest.raises(ValueError, match="pairs_file and output_dir are required"):
        train(DPORecipe())


def test_trains_on_pairs_selected_by_finger(wan_dir, tiny_model_dir, tmp_path):
    """The two halves of the Diffusion-DPO workflow fit: select_dpo_pairs' output is this trainer's input."""
    from diffusers import WanPipeline

    from finger_reward import FingerReward
    from finger_reward.dpo_pairs import select_dpo_pairs

    pipe = WanPipeline.from_pretrained(wan_dir)
    pairs = select_dpo_pairs(pipe, ["a red kite flies over a hill"], FingerReward.from_pretrained(tiny_model_dir),
                             tmp_path / "pairs", num_candidates=2, progress=False,
                             pipeline_kwargs=dict(num_frames=5, height=32, width=32, num_inference_steps=2))
    settings = json.loads((tmp_path / "pairs" / "settings.json").read_text())
    assert settings["pipeline_kwargs"]["guidance_scale"] == 5.0  # Wan's default, the one Flow-GRPO samples at
    recipe = DPORecipe(pretrained_model=str(wan_dir), pairs_file=str(pairs), output_dir=str(tmp_path / "lora"),
                       num_frames=5, height=32, width=32, max_steps=1, save_steps=0, logging_steps=1)
    history = train(recipe)["history"]
    assert len(history) == 1 and history[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
