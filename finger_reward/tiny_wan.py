"""A tiny random-weight Wan text-to-video pipeline, built offline from diffusers' config classes.

It has the real `WanPipeline` architecture (transformer, causal 3-D VAE, UMT5 text encoder,
flow-matching Euler scheduler) at test size, so generator-side code (adapters, RL loops,
Diffusion-DPO) runs end to end on CPU without downloading anything. Its videos are noise; it
exists to exercise code paths, never to judge quality.

    pipe = build_tiny_wan_pipeline(seed=0)
    out = pipe("a red circle moves", num_frames=5, height=32, width=32, num_inference_steps=2,
               max_sequence_length=16, generator=torch.Generator().manual_seed(0))
    out.frames.shape   # (1, 5, 32, 32, 3), float in [0, 1]

`make_tiny_wan_pipeline(out_dir)` saves it so `WanPipeline.from_pretrained(out_dir)` reloads it.
num_frames must be 4k + 1 and height/width multiples of 16.
"""

from __future__ import annotations

from pathlib import Path

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"

_WORDS = (
    "a an the of in on to and with from at by is are red green blue yellow white black orange purple "
    "circle square triangle star ball dog cat car person bird fish tree house moves moving move runs "
    "flies jumps left right up down across slowly quickly smoothly scene background camera video "
    "bright dark night day sunset sky sea road city forest room light shadow"
).split()


def build_tiny_umt5_tokenizer():
    """A word-level tokenizer (T5 layout: pad 0, eos 1, unk 2; eos appended) wrapped for UMT5EncoderModel."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([PAD, EOS, UNK, *dict.fromkeys(_WORDS)])}
    word_level = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    word_level.normalizer = normalizers.Lowercase()
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    word_level.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, vocab[EOS])]
    )
    return PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token=PAD, eos_token=EOS, unk_token=UNK)


def build_tiny_wan_pipeline(seed: int = 0, *, ti2v: bool = False):
    """A tiny random `WanPipeline` (2-layer transformer, 16-channel VAE latent, 2-layer UMT5); CPU, float32.

    `ti2v=True` gives Wan2.2-TI2V-5B's layout instead: a 48-channel latent from a residual VAE that
    patchifies 2x2 (16x spatial compression, so sizes are multiples of 32) and per-token timesteps
    (`expand_timesteps`).
    """
    import torch
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = build_tiny_umt5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))
    torch.manual_seed(seed + 1)
    if ti2v:
        vae = AutoencoderKLWan(base_dim=8, z_dim=48, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True], is_residual=True, in_channels=12,
                               out_channels=12, patch_size=2, scale_factor_spatial=16,
                               latents_mean=[0.0] * 48, latents_std=[1.0] * 48)
    else:
        vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True])
    channels = vae.config.z_dim
    torch.manual_seed(seed + 2)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=channels, out_channels=channels,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0 if ti2v else 7.0)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder.eval(), vae=vae.eval(),
                       scheduler=scheduler, transformer=transformer.eval(), expand_timesteps=ti2v)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_tiny_wan_pipeline(out_dir: str | Path, seed: int = 0, *, ti2v: bool = False) -> Path:
    """Save the tiny pipeline with `save_pretrained`; `WanPipeline.from_pretrained(out_dir)` reloads it offline."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_tiny_wan_pipeline(seed, ti2v=ti2v).save_pretrained(out)
    return out
