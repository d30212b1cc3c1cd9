"""Step time and peak memory of the two generator loops, Diffusion-DPO and Flow-GRPO, on a video pipeline.

    python benchmarks/diffusers_loops.py --config tiny             # CPU, seconds: the tiny test pipeline
    python benchmarks/diffusers_loops.py --config wan1.3b          # GPU: Wan2.1-T2V-1.3B, the shipped recipes
    python benchmarks/diffusers_loops.py --config ltx              # GPU: LTX-Video 0.9 (2B), the same recipes

`wan1.3b` builds the Wan2.1-T2V-1.3B architecture (30-layer 1536-wide transformer, the full causal
VAE, the UMT5-XXL text encoder) with random weights, on the GPU in bf16 (VAE float32), as
`configs/dpo_wan.yaml` and `configs/flow_grpo_wan.yaml` load it; `ltx` likewise LTX-Video 0.9's
(28-layer 2B transformer, its VAE, T5-XXL; 128 text tokens). The step time and memory of a loop
do not depend on the weights. Each loop runs `--steps` optimizer steps of its shipped recipe
(sizes and counts can be cut with the flags below) through the trainers' own `train`:

- Diffusion-DPO on pairs of synthetic clips written as .mp4 (chosen clean, rejected with a defect);
  the pairs are VAE-encoded once before the first step, so the peak covers encoding too.
- Flow-GRPO sampling groups with the SDE sampler, FingER scoring them in-process (the shipped tiny
  evaluator: the 7B evaluator's own cost is benchmarks/engine.py's), and the clipped-ratio update,
  with the family's classifier-free guidance (two transformer rows per video; `--guidance-scale 1`
  measures it without).

Prints, per loop: the first step (compilation, allocator warm-up) and the mean of the others in
seconds, Flow-GRPO's split between sampling+scoring and the update, latent tokens per video, and
the peak memory (CUDA max_memory_allocated; on CPU the process's peak RSS).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch

from finger_reward.pretrained import TINY_EVALUATOR
from finger_reward.synthetic import DEFECTS, random_scene, render, write_video
from finger_reward.tiny_wan import build_tiny_umt5_tokenizer, build_tiny_wan_pipeline
from finger_reward.trainers.diffusion_dpo import DPORecipe
from finger_reward.trainers.diffusion_dpo import train as train_dpo
from finger_reward.trainers.flow_grpo import FlowGRPORecipe
from finger_reward.trainers.flow_grpo import train as train_grpo
from finger_reward.trainers.video_models import default_guidance_scale
from measure import device_name, peak_mb, peak_reset

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
# Recipe fields the tiny pipeline needs instead of the Wan-size ones (everything else: the shipped YAML).
TINY = dict(height=32, width=32, num_frames=5, max_sequence_length=16, lora_rank=4, lora_alpha=8,
            mixed_precision="no", gradient_checkpointing=False)
TINY_GRPO = dict(group_size=2, prompts_per_step=1, num_inference_steps=3)


def build_wan_1_3b(device, dtype):
    """Wan2.1-T2V-1.3B's pipeline architecture with random weights (configs of the published checkpoint)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    with torch.device(device):
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
            text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
        )
        vae = AutoencoderKLWan(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                               temperal_downsample=[False, True, True])  # float32, as Wan runs its VAE
        text_encoder = UMT5EncoderModel(UMT5Config(
            vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
            relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
            pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        ))
    cast_as_loaded(transformer, dtype)
    cast_as_loaded(text_encoder, dtype)
    # The tiny word-level tokenizer: token ids only feed the (random) embedding, so any tokenizer will do.
    pipe = WanPipeline(tokenizer=build_tiny_umt5_tokenizer(), text_encoder=text_encoder.eval(), vae=vae.eval(),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=transformer.eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_ltx_video(device, dtype):
    """LTX-Video 0.9's pipeline architecture (2B transformer, its VAE in float32, T5-XXL) with random weights."""
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    with torch.device(device):
        transformer = LTXVideoTransformer3DModel(
            in_channels=128, out_channels=128, patch_size=1, patch_size_t=1, num_attention_heads=32,
            attention_head_dim=64, cross_attention_dim=2048, num_layers=28, caption_channels=4096,
        )
        vae = AutoencoderKLLTXVideo()  # the class defaults are LTX-Video 0.9's VAE: 32x space, 8x time, 128 channels
        text_encoder = T5EncoderModel(T5Config(
            vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
            relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
            decoder_start_token_id=0,
        ))
    cast_as_loaded(transformer, dtype)
    cast_as_loaded(text_encoder, dtype)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05,
                                                base_image_seq_len=1024, max_image_seq_len=4096, shift_terminal=0.1)
    pipe = LTXPipeline(scheduler=scheduler, vae=vae.eval(), text_encoder=text_encoder.eval(),
                       tokenizer=build_tiny_umt5_tokenizer(), transformer=transformer.eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def cast_as_loaded(model, dtype) -> None:
    """Cast to `dtype` except the modules the class keeps in float32, as from_pretrained(dtype=...) loads them."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point():
            tensor.data = tensor.data.to(torch.float32 if keep & set(name.split(".")) else dtype)


def build_pipeline(config: str, device):
    if config == "tiny":
        return build_tiny_wan_pipeline(seed=0)
    return {"wan1.3b": build_wan_1_3b, "ltx": build_ltx_video}[config](device, torch.bfloat16)


def write_pairs(root: Path, count: int, num_frames: int, height: int, width: int) -> tuple[Path, list[str]]:
    """`count` (clean, defective) synthetic clip pairs as .mp4 and their pairs.jsonl; and the prompts."""
    import json

    rng = np.random.default_rng(0)
    defects = list(DEFECTS.values())
    lines, prompts = [], []
    for i in range(count):
        scene = random_scene(rng)
        size = dict(num_frames=num_frames, height=height, width=width, seed=i)
        chosen = write_video(render(scene, None, **size), root / f"{i}_chosen.mp4", fps=16)
        rejected = write_video(render(scene, defects[i % len(defects)], **size), root / f"{i}_rejected.mp4", fps=16)
        lines.append(json.dumps({"prompt": scene.prompt, "chosen": chosen.name, "rejected": rejected.name}))
        prompts.append(scene.prompt)
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "prompts.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
    return root / "pairs.jsonl", prompts


def latent_tokens(num_frames: int, height: int, width: int) -> int:
    """Transformer tokens per video: VAE 4x in time (after the first frame) and 8x in space, patches 2x2."""
    return ((num_frames - 1) // 4 + 1) * (height // 16) * (width // 16)


def summarise(name: str, step_times: list[float], peak: float, tokens: int, extra: str = "") -> None:
    first, rest = step_times[0], step_times[1:]
    steady = f"{statistics.mean(rest):.2f} s/step over {len(rest)} step(s)" if rest else "(one step only)"
    print(f"{name}: first step {first:.2f} s, then {steady}; {tokens} latent tokens/video; "
          f"peak memory {peak / 1024:.2f} GiB{extra}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=["tiny", "wan1.3b", "ltx"], default="tiny")
    parser.add_argument("--loops", default="dpo,grpo", help="comma-separated: dpo, grpo")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per loop (the first is warm-up)")
    parser.add_argument("--num-frames", type=int, help="both loops (default: each recipe's: DPO 81, GRPO 33)")
    parser.add_argument("--height", type=int, help="both loops (default: the recipes' 480)")
    parser.add_argument("--width", type=int, help="both loops (default: the recipes' 832)")
    parser.add_argument("--grad-accum", type=int, help="DPO pairs per optimizer step (default: the recipe's 8)")
    parser.add_argument("--group-size", type=int, help="GRPO videos per prompt (default: the recipe's 8)")
    parser.add_argument("--prompts-per-step", type=int, help="GRPO groups per step (default: the recipe's 2)")
    parser.add_argument("--guidance-scale", type=float, help="GRPO guidance (default: the family's; 1: off)")
    parser.add_argument("--device")
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.config != "tiny" and device.type != "cuda":
        parser.error(f"--config {args.config} builds a 7B-parameter pipeline: it needs a CUDA GPU")
    sizes = {k: v for k, v in dict(num_frames=args.num_frames, height=args.height, width=args.width).items() if v}
    base = {"tiny": TINY, "ltx": {"max_sequence_length": 128}}.get(args.config, {})
    loops = [name.strip() for name in args.loops.split(",") if name.strip()]
    print(f"device: {device_name(device)}; config {args.config}; torch {torch.__version__}")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if "dpo" in loops:
            accum = {"gradient_accumulation_steps": args.grad_accum} if args.grad_accum else {}
            recipe = DPORecipe.from_yaml(CONFIGS_DIR / "dpo_wan.yaml", **{**base, **sizes, **accum},
                                         pairs_file=str(root / "pairs" / "pairs.jsonl"), output_dir=str(root / "dpo"),
                                         max_steps=args.steps, save_steps=0, logging_steps=args.steps)
            pairs = recipe.batch_size * recipe.gradient_accumulation_steps
            write_pairs(root / "pairs", pairs, recipe.num_frames, recipe.height, recipe.width)
            pipe = build_pipeline(args.config, device)
            peak_reset(device)
            history = train_dpo(recipe, pipe=pipe)["history"]
            summarise("diffusion-dpo", [h["time/step_s"] for h in history], peak_mb(device),
                      latent_tokens(recipe.num_frames, recipe.height, recipe.width),
                      f"; {pairs} pair(s)/step, {recipe.num_frames}x{recipe.height}x{recipe.width}, "
                      f"gradient checkpointing {recipe.gradient_checkpointing}")
            del pipe
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if "grpo" in loops:
            grpo = dict(TINY_GRPO) if args.config == "tiny" else {}
            grpo.update({k: v for k, v in dict(group_size=args.group_size, prompts_per_step=args.prompts_per_step,
                                               guidance_scale=args.guidance_scale).items() if v})
            _, prompts = write_pairs(root / "prompts", 4, 5, 32, 32)
            recipe = FlowGRPORecipe.from_yaml(CONFIGS_DIR / "flow_grpo_wan.yaml", **{**base, **sizes, **grpo},
                                              prompts=str(root / "prompts" / "prompts.txt"),
                                              reward_model=str(TINY_EVALUATOR), output_dir=str(root / "grpo"),
                                              max_steps=args.steps, save_steps=args.steps + 1, logging_steps=args.steps)
            pipe = build_pipeline(args.config, device)
            peak_reset(device)
            guidance = recipe.guidance_scale or default_guidance_scale(pipe)
            history = train_grpo(recipe, pipe=pipe)
            rollout = statistics.mean(h["time/rollout_s"] for h in history[1:] or history)
            update = statistics.mean(h["time/update_s"] for h in history[1:] or history)
            videos = recipe.group_size * recipe.prompts_per_step
            summarise("flow-grpo", [h["time/rollout_s"] + h["time/update_s"] for h in history], peak_mb(device),
                      latent_tokens(recipe.num_frames, recipe.height, recipe.width),
                      f"; {videos} videos/step ({recipe.prompts_per_step} x G={recipe.group_size}), "
                      f"{recipe.num_inference_steps} SDE steps, guidance {guidance:g}, "
                      f"{recipe.num_frames}x{recipe.height}x{recipe.width}; "
                      f"sampling+scoring {rollout:.2f} s, update {update:.2f} s")


if __name__ == "__main__":
    main()
