"""Flow-matching pieces shared by the generator-side trainers (Diffusion-DPO, Flow-GRPO): noise levels,
noising, the velocity target, LoRA, and Wan's own encode / velocity / decode (WanPipeline: Wan2.1-T2V
1.3B / 14B, Wan2.2-TI2V-5B), which `video_models.WanVideoModel` uses.

Conventions (rectified flow, as diffusers' FlowMatchEulerDiscreteScheduler): x_t = sigma * noise +
(1 - sigma) * x0, the transformer predicts the velocity noise - x0, and its timestep is sigma * 1000.
"""

from __future__ import annotations

from pathlib import Path

import torch

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
MIXED_PRECISION = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def load_pipeline(path: str, weight_dtype: torch.dtype):
    """The pipeline with its frozen weights in `weight_dtype`, the VAE in float32 (as Wan runs it)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path, dtype={"default": weight_dtype, "vae": torch.float32})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def logit_normal_sigmas(n: int, *, mean: float = 0.0, std: float = 1.0, generator=None, device=None) -> torch.Tensor:
    """Noise levels in (0, 1) drawn as sigmoid(N(mean, std)): the logit-normal sampling of SD3 / Wan training."""
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device))


def per_sample(sigmas: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """One value per batch item, shaped to broadcast against `like`."""
    return sigmas.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def add_noise(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_t = sigma * noise + (1 - sigma) * x0, one sigma per batch item."""
    s = per_sample(sigmas, latents)
    return s * noise + (1 - s) * latents


def velocity_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """What the transformer should predict at every sigma: noise - x0."""
    return noise - latents


def predict_velocity(transformer, x_t: torch.Tensor, sigmas: torch.Tensor, prompt_embeds: torch.Tensor) -> torch.Tensor:
    """The transformer's velocity at noise level sigma (timestep sigma * 1000), as WanPipeline calls it.

    One timestep per video also serves Wan2.2-TI2V (`expand_timesteps`): for text-to-video its
    pipeline gives every token the same timestep, which computes the same velocity."""
    timestep = (sigmas * 1000).to(x_t.dtype)
    return transformer(hidden_states=x_t, timestep=timestep, encoder_hidden_states=prompt_embeds, return_dict=False)[0]


def cfg_velocity(v_cond: torch.Tensor, v_uncond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance on velocities: v_uncond + s * (v_cond - v_uncond), as WanPipeline and LTXPipeline
    combine their two predictions (s = 1: the conditional velocity)."""
    return v_uncond + guidance_scale * (v_cond - v_uncond)


def latent_stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Wan VAE's per-channel latent mean and std, shaped (1, z, 1, 1, 1)."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, device=like.device, dtype=like.dtype).view(shape)
    std = torch.tensor(vae.config.latents_std, device=like.device, dtype=like.dtype).view(shape)
    return mean, std


@torch.no_grad()
def encode_videos(pipe, videos: torch.Tensor) -> torch.Tensor:
    """Normalised VAE latents (B, z, F', H/8, W/8) of videos (B, C, F, H, W) in [-1, 1], as Wan's video-to-video does."""
    vae = pipe.vae
    videos = videos.to(device=vae.device, dtype=vae.dtype)
    latents = torch.cat([vae.encode(v.unsqueeze(0)).latent_dist.mode() for v in videos])
    mean, std = latent_stats(vae, latents)
    return (latents - mean) / std


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor):
    """Normalised latents -> videos (B, F, H, W, 3) float in [0, 1], as the pipeline's own output_type="np"."""
    vae = pipe.vae
    latents = latents.to(vae.device, vae.dtype)
    mean, std = latent_stats(vae, latents)
    video = vae.decode(latents * std + mean, return_dict=False)[0]
    return pipe.video_processor.postprocess_video(video, output_type="np")


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], max_sequence_length: int = 226) -> torch.Tensor:
    """Text-encoder states for the prompts, without classifier-free guidance."""
    embeds, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=max_sequence_length,
                                   device=pipe.transformer.device)
    return embeds


def add_lora(transformer, *, rank: int = 16, alpha: int = 16, dropout: float = 0.0, targets=LORA_TARGETS):
    """Attach a trainable LoRA adapter (peft) to the transformer's attention projections; freeze the rest.

    LoRA's B matrices start at zero, so the adapted model starts equal to the reference, which is
    the same transformer with its adapter disabled.
    """
    from peft import LoraConfig

    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                                       init_lora_weights=True))
    return transformer


def lora_parameters(transformer) -> list[torch.nn.Parameter]:
    return [p for name, p in transformer.named_parameters() if "lora_" in name and p.requires_grad]


def save_lora(pipeline_class, transformer, out_dir: str | Path) -> Path:
    """The LoRA in diffusers' format with its rank/alpha config, so `pipe.load_lora_weights(out_dir)` applies it.

    Without the adapter metadata a loader assumes alpha = rank and the outputs change.
    """
    from peft.utils import get_peft_model_state_dict

    out_dir = Path(out_dir)
    pipeline_class.save_lora_weights(out_dir, transformer_lora_layers=get_peft_model_state_dict(transformer),
                                     transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict())
    return out_dir
