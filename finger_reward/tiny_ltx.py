"""A tiny random-weight LTX-Video text-to-video pipeline (diffusers' `LTXPipeline`), built offline.

The real architecture (a transformer over packed latent tokens, the causal video VAE, a T5 text
encoder, flow-matching sigmas shifted by resolution) at test size, so the generator trainers'
LTX path runs on CPU. Its videos are noise. With `patch_size=1` and two scaling blocks the VAE
compresses 4x in space and time: num_frames = 4k + 1, sides multiples of 4.

    pipe = build_tiny_ltx_pipeline(seed=0)
    pipe("a red circle moves", num_frames=9, height=32, width=32, num_inference_steps=2).frames.shape
"""

from __future__ import annotations

from pathlib import Path

from finger_reward.tiny_wan import build_tiny_umt5_tokenizer


def build_tiny_ltx_pipeline(seed: int = 0):
    """A tiny random `LTXPipeline` (1-layer transformer, 8-channel latent, 2-layer T5); CPU, float32."""
    import torch
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    tokenizer = build_tiny_umt5_tokenizer()  # T5's layout: pad 0, eos 1, unk 2
    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLLTXVideo(
        latent_channels=8, block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, False, False), decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False, False, False, False, False), upsample_residual=(False, False, False, False),
        upsample_factor=(1, 1, 1, 1), timestep_conditioning=False, patch_size=1, patch_size_t=1,
        encoder_causal=True, decoder_causal=False,
    )
    vae.use_framewise_encoding = vae.use_framewise_decoding = False
    torch.manual_seed(seed + 2)
    transformer = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, num_layers=1, caption_channels=32,
    )
    pipe = LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), vae=vae.eval(),
                       text_encoder=text_encoder.eval(), tokenizer=tokenizer, transformer=transformer.eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_tiny_ltx_pipeline(out_dir: str | Path, seed: int = 0) -> Path:
    """Save the tiny pipeline; `LTXPipeline.from_pretrained(out_dir)` reloads it offline."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_tiny_ltx_pipeline(seed).save_pretrained(out)
    return out
