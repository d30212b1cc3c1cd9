"""What the generator trainers need from a text-to-video pipeline, per family: Wan and LTX-Video.

A video model turns prompts into the transformer's text inputs, videos into the latents it
denoises (in its own layout: Wan's (C, F, H, W) grid, LTX's packed token sequence), predicts the
velocity at a noise level, gives the sampler its starting noise and sigmas, and decodes latents
back to frames. The trainers' math (flow matching, the DPO loss, the SDE sampler) is elementwise
and so works on either layout unchanged.

    model = video_model(pipe, num_frames=33, height=480, width=832)
    text = model.encode_prompts(["a red circle moves"], max_sequence_length=512)
    v = model.velocity(pipe.transformer, x_t, sigmas, text)
    guided = model.guided_velocity(pipe.transformer, x_t, sigmas, with_negative(text, negative), 5.0)

Classifier-free guidance defaults per family live here only (`GUIDANCE_SCALE`, `default_guidance_scale`):
the Flow-GRPO trainer and Diffusion-DPO's candidate generation (`finger_reward.dpo_pairs`) both read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from finger_reward.trainers import flow_matching


# The guidance scale each family is sampled at in use (the diffusers pipelines' own __call__ defaults).
GUIDANCE_SCALE = {"WanPipeline": 5.0, "LTXPipeline": 3.0}
# Prefix of the negative prompt's text inputs inside a text dict (`with_negative`).
NEGATIVE = "negative_"


def default_guidance_scale(pipe) -> float | None:
    """The classifier-free guidance scale `pipe`'s family is sampled at (Wan 5.0, LTX-Video 3.0); None for others.

    Matched by class name along the MRO, so neither diffusers nor torch is imported to ask."""
    for cls in type(pipe).__mro__:
        if cls.__name__ in GUIDANCE_SCALE:
            return GUIDANCE_SCALE[cls.__name__]
    return None


def with_negative(text: dict[str, torch.Tensor], negative: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One text dict holding a prompt's inputs and the negative prompt's (keys prefixed `negative_`), row for row,
    so `text_rows`, `cat_texts` and the trainers' batching carry both."""
    if len(next(iter(negative.values()))) == 1:
        rows = len(next(iter(text.values())))
        negative = {key: value.expand(rows, *value.shape[1:]) for key, value in negative.items()}
    return {**text, **{NEGATIVE + key: value for key, value in negative.items()}}


def split_negative(text: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """(the prompt's text inputs, the negative prompt's or None): the inverse of `with_negative`."""
    cond = {key: value for key, value in text.items() if not key.startswith(NEGATIVE)}
    uncond = {key[len(NEGATIVE):]: value for key, value in text.items() if key.startswith(NEGATIVE)}
    return cond, uncond or None


def cat_texts(texts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Text inputs of several batches as one batch."""
    return {key: torch.cat([text[key] for text in texts]) for key in texts[0]}


def text_rows(text: dict[str, torch.Tensor], rows) -> dict[str, torch.Tensor]:
    """The text inputs of some rows (an index tensor or a slice)."""
    return {key: value[rows] for key, value in text.items()}


def video_model(pipe, *, num_frames: int, height: int, width: int) -> "WanVideoModel | LTXVideoModel":
    """The video model of a diffusers pipeline at one video size; refuses what the trainers cannot train."""
    name = type(pipe).__name__
    if getattr(pipe, "transformer_2", None) is not None:
        raise ValueError(f"{name} has two transformer experts (Wan2.2 A14B), not supported yet; use a single-"
                         "transformer pipeline (Wan2.1-T2V-1.3B / 14B, Wan2.2-TI2V-5B, LTX-Video)")
    if not hasattr(pipe, "save_lora_weights"):
        raise ValueError(f"{name} has no LoRA loader (save_lora_weights); use a WanPipeline or an LTXPipeline")
    if getattr(pipe.transformer, "peft_config", None):
        raise ValueError(f"the transformer already has adapter(s) {sorted(pipe.transformer.peft_config)}; "
                         "fuse or unload them (pipe.fuse_lora(); pipe.unload_lora_weights()) before training a new one")
    from diffusers import LTXPipeline, WanPipeline

    if isinstance(pipe, WanPipeline):
        model = WanVideoModel(pipe, num_frames, height, width)
    elif isinstance(pipe, LTXPipeline):
        model = LTXVideoModel(pipe, num_frames, height, width)
    else:  # image-to-video and other families sample differently
        raise ValueError(f"{name} is not supported; the trainers take the text-to-video WanPipeline and LTXPipeline")
    model.check_size()
    return model


@dataclass
class _VideoModel:
    """A pipeline at one video size: what every family shares (the size check, the starting noise)."""

    pipe: object
    num_frames: int
    height: int
    width: int

    def check_size(self) -> None:
        """Frames t k + 1 and sides multiples of VAE x patch (Wan2.1: 4k + 1 and 16; Wan2.2-TI2V: 32; LTX: 8k + 1, 32)."""
        t, s = self.temporal_ratio, self.spatial_multiple
        if (self.num_frames - 1) % t or self.height % s or self.width % s:
            raise ValueError(f"{type(self.pipe).__name__}'s VAE and patching need num_frames = {t}k + 1 and height, "
                             f"width multiples of {s}; got num_frames={self.num_frames}, height={self.height}, "
                             f"width={self.width}")

    def guided_velocity(self, transformer, x_t: torch.Tensor, sigmas: torch.Tensor, text: dict[str, torch.Tensor],
                        guidance_scale: float) -> torch.Tensor:
        """The classifier-free-guided velocity v_u + s (v_c - v_u) (Ho & Salimans 2022, Eq. 6, on velocities).

        The conditional and unconditional (negative prompt, from `with_negative`) velocities come from one
        forward pass of 2B rows, as LTXPipeline batches them; guidance_scale 1 is the conditional velocity
        alone (one forward, B rows, no negative needed)."""
        cond, uncond = split_negative(text)
        if guidance_scale == 1:
            return self.velocity(transformer, x_t, sigmas, cond)
        if uncond is None:
            raise ValueError(f"guidance_scale={guidance_scale} needs the negative prompt's text inputs "
                             "(with_negative(text, negative)); or pass guidance_scale=1 to sample without guidance")
        both = self.velocity(transformer, torch.cat([x_t, x_t]), torch.cat([sigmas, sigmas]), cat_texts([cond, uncond]))
        v_cond, v_uncond = both.chunk(2)
        return flow_matching.cfg_velocity(v_cond, v_uncond, guidance_scale)

    def initial_noise(self, n: int, generator: torch.Generator, device) -> torch.Tensor:
        """x at sigma = 1 for `n` videos, float32, in the transformer's layout, as the pipeline's sampling starts."""
        return self.pipe.prepare_latents(n, self.pipe.transformer.config.in_channels, self.height, self.width,
                                         self.num_frames, torch.float32, device, generator)


@dataclass
class WanVideoModel(_VideoModel):
    """Wan2.1-T2V (1.3B, 14B) and Wan2.2-TI2V-5B: latents (C, F', H', W'), text states only."""

    @property
    def spatial_multiple(self) -> int:
        return self.pipe.vae_scale_factor_spatial * self.pipe.transformer.config.patch_size[1]

    @property
    def temporal_ratio(self) -> int:
        return self.pipe.vae_scale_factor_temporal

    def encode_prompts(self, prompts: list[str], max_sequence_length: int) -> dict[str, torch.Tensor]:
        """The transformer's text keyword arguments, batch first."""
        return {"encoder_hidden_states": flow_matching.encode_prompts(self.pipe, prompts, max_sequence_length)}

    def encode_videos(self, videos: torch.Tensor) -> torch.Tensor:
        """Normalised latents of videos (B, C, F, H, W) in [-1, 1]."""
        return flow_matching.encode_videos(self.pipe, videos)

    def velocity(self, transformer, x_t: torch.Tensor, sigmas: torch.Tensor, text: dict[str, torch.Tensor]) -> torch.Tensor:
        return flow_matching.predict_velocity(transformer, x_t, sigmas, text["encoder_hidden_states"])

    def sampling_sigmas(self, num_inference_steps: int, device) -> torch.Tensor:
        """num_inference_steps + 1 noise levels from the pipeline's scheduler, ending at 0."""
        self.pipe.scheduler.set_timesteps(num_inference_steps, device=device)
        return self.pipe.scheduler.sigmas.to(device=device, dtype=torch.float32)

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Videos (B, F, H, W, 3) float in [0, 1]."""
        return flow_matching.decode_latents(self.pipe, latents)


@dataclass
class LTXVideoModel(_VideoModel):
    """LTX-Video (0.9.x, diffusers' LTXPipeline): packed latent tokens (S, C), text states with their attention
    mask, the latent grid and frame rate as transformer inputs, resolution-dependent shifted sigmas."""

    frame_rate: float = 25.0  # LTXPipeline's default; sets the temporal RoPE scale
    _grid: tuple[int, int, int] = field(init=False)

    def __post_init__(self):
        pipe = self.pipe
        self._grid = ((self.num_frames - 1) // pipe.vae_temporal_compression_ratio + 1,
                      self.height // pipe.vae_spatial_compression_ratio, self.width // pipe.vae_spatial_compression_ratio)

    @property
    def spatial_multiple(self) -> int:
        return self.pipe.vae_spatial_compression_ratio * self.pipe.transformer_spatial_patch_size

    @property
    def temporal_ratio(self) -> int:
        return self.pipe.vae_temporal_compression_ratio * self.pipe.transformer_temporal_patch_size

    def encode_prompts(self, prompts: list[str], max_sequence_length: int) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            embeds, mask, _, _ = self.pipe.encode_prompt(prompts, do_classifier_free_guidance=False,
                                                         max_sequence_length=max_sequence_length,
                                                         device=self.pipe.transformer.device)
        return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}

    @torch.no_grad()
    def encode_videos(self, videos: torch.Tensor) -> torch.Tensor:
        pipe, vae = self.pipe, self.pipe.vae
        videos = videos.to(device=vae.device, dtype=vae.dtype)
        latents = torch.cat([vae.encode(v.unsqueeze(0)).latent_dist.mode() for v in videos])
        latents = pipe._normalize_latents(latents, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
        return pipe._pack_latents(latents, pipe.transformer_spatial_patch_size, pipe.transformer_temporal_patch_size)

    def velocity(self, transformer, x_t: torch.Tensor, sigmas: torch.Tensor, text: dict[str, torch.Tensor]) -> torch.Tensor:
        pipe = self.pipe
        frames, height, width = self._grid
        rope_scale = (pipe.vae_temporal_compression_ratio / self.frame_rate, pipe.vae_spatial_compression_ratio,
                      pipe.vae_spatial_compression_ratio)
        return transformer(hidden_states=x_t, timestep=(sigmas * 1000).to(x_t.dtype), num_frames=frames, height=height,
                           width=width, rope_interpolation_scale=rope_scale, return_dict=False, **text)[0]

    def sampling_sigmas(self, num_inference_steps: int, device) -> torch.Tensor:
        """LTXPipeline's schedule: linspace(1, 1/N) shifted by mu for the video's token count, then 0."""
        from diffusers.pipelines.ltx.pipeline_ltx import calculate_shift

        config = self.pipe.scheduler.config
        mu = calculate_shift(int(np.prod(self._grid)), config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.15))
        self.pipe.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_inference_steps, num_inference_steps),
                                          mu=mu, device=device)
        return self.pipe.scheduler.sigmas.to(device=device, dtype=torch.float32)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        pipe, vae = self.pipe, self.pipe.vae
        latents = pipe._unpack_latents(latents.to(vae.device), *self._grid, pipe.transformer_spatial_patch_size,
                                       pipe.transformer_temporal_patch_size)
        latents = pipe._denormalize_latents(latents, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
        # LTXPipeline's default decode_timestep is 0 (no decode noise) for a timestep-conditioned VAE.
        timestep = torch.zeros(len(latents), device=vae.device, dtype=vae.dtype) if vae.config.timestep_conditioning else None
        video = vae.decode(latents.to(vae.dtype), timestep, return_dict=False)[0]
        return pipe.video_processor.postprocess_video(video, output_type="np")
