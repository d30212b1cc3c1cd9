"""Flow-matching pieces shared by the generator-side trainers (Diffusion-DPO, Flow-GRPO) for Wan-style
text-to-video transformers (diffusers' WanPipeline).

Conventions (rectified flow, as diffusers' FlowMatchEulerDiscreteScheduler): x_t = sigma * noise +
(1 - sigma) * x0, the transformer predicts the velocity noise - x0, and its timestep is sigma * 1000.
"""

from __future__ import annotations

import torch

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def logit_normal_sigmas(n: int, *, mean: float = 0.0, std: float = 1.0, generator=None, device=None) -> torch.Tensor:
    """Noise levels in (0, 1) drawn as sigmoid(N(mean, std)): the logit-normal sampling of SD3 / Wan training."""
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device))


def _per_sample(sigmas: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigmas.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def add_noise(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_t = sigma * noise + (1 - sigma) * x0, one sigma per batch item."""
    s = _per_sample(sigmas, latents)
    return s * noise + (1 - s) * latents


def velocity_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """What the transformer should predict at every sigma: noise - x0."""
    return noise - latents


def predict_velocity(transformer, x_t: torch.Tensor, sigmas: torch.Tensor, prompt_embeds: torch.Tensor) -> torch.Tensor:
    """The transformer's velocity at noise level sigma (timestep sigma * 1000), as WanPipeline calls it."""
    timestep = (sigmas * 1000).to(x_t.dtype)
    return transformer(hidden_states=x_t, timestep=timestep, encoder_hidden_states=prompt_embeds, return_dict=False)[0]


def _latent_stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
    mean, std = _latent_stats(vae, latents)
    return (latents - mean) / std


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
