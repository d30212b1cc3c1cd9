"""Tiny random-weight Qwen2.5-VL checkpoints, built offline.

A checkpoint directory written by `make_tiny_model` has the real architecture, the real
special tokens and a chat template, so `FingerReward.from_pretrained(path)` loads it exactly
like a downloaded model. Its scores mean nothing; it exists to smoke-test code paths
(tests, training loops) without downloading 15 GB.
"""

from __future__ import annotations

import itertools
from pathlib import Path

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# The Qwen2-VL chat-message layout: system turn (a default one when absent), then turns whose
# content is a string or a list of {"type": "video"|"image"|"text"} blocks.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for block in message['content'] %}"
    "{% if block['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif block['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif block['type'] == 'text' %}{{ block['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_WORDS = (
    "a an the is are of in on to and or with without from for by at as it its this that video "
    "frame frames does do did any there object objects person people animal dog cat car ball "
    "circle square triangle star red green blue yellow white black orange purple moves move moving "
    "left right up down across screen background slowly quickly smoothly stays still frozen "
    "flicker flickers colour color shape size changes change appear appears disappear blur blurry "
    "noise noisy sharp clear clean quality visual temporal consistency dynamic degree text "
    "alignment factual physics wall passes through teleport teleports jumps position camera "
    "motion scene entity question answer reason yes no please only with matches match prompt "
    "look looks natural realistic consistent throughout whole clip stable distorted artifacts"
).split()


def _corpus() -> list[str]:
    from finger_reward.prompts import SYSTEM_PROMPTS
    from finger_reward.scoring import RATING_LEVELS

    answers = [f"{a}" for a in ("Yes", "yes", "YES", "No", "no", "NO")]
    lines = list(SYSTEM_PROMPTS.values())
    lines += [" ".join(_WORDS[i : i + 12]) for i in range(0, len(_WORDS), 7)]
    # Frequent enough that BPE gives every answer spelling (bare and with a space) one token.
    lines += [f"{a} {b}." for a, b in itertools.product(answers, answers)] * 40
    lines += [f"<reason>{' '.join(_WORDS[:9])}</reason><answer>{a}</answer>" for a in answers] * 20
    # Q-Save's five rating levels, one token each, so the rating loss can read them.
    lines += [f"<reason>{' '.join(_WORDS[:9])}</reason><answer>{level}</answer>" for level in RATING_LEVELS] * 20
    return lines


def build_tokenizer(vocab_size: int = 1024):
    """A byte-level BPE tokenizer with Qwen2-VL's special tokens, trained in code (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )


ARCHITECTURES = ("qwen2_5_vl", "qwen3_vl")


def _check_arch(arch: str) -> str:
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch={arch!r} is not one of {ARCHITECTURES}")
    return arch


def build_processor(tokenizer=None, *, arch: str = "qwen2_5_vl"):
    """The architecture's processor (image + video processors, tokenizer, chat template)."""
    import transformers as tf

    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    if _check_arch(arch) == "qwen3_vl":
        parts = dict(image_processor=tf.Qwen2VLImageProcessor(patch_size=16), video_processor=tf.Qwen3VLVideoProcessor())
        return tf.Qwen3VLProcessor(tokenizer=tokenizer, chat_template=CHAT_TEMPLATE, **parts)
    parts = dict(image_processor=tf.Qwen2VLImageProcessor(), video_processor=tf.Qwen2VLVideoProcessor())
    return tf.Qwen2_5_VLProcessor(tokenizer=tokenizer, chat_template=CHAT_TEMPLATE, **parts)


def _config(arch: str, ids: dict[str, int], vocab_size: int, hidden_size: int, num_layers: int, head_dim: int):
    import transformers as tf

    if head_dim < 8 or head_dim % 8 or hidden_size % head_dim:
        raise ValueError(f"head_dim={head_dim} must be a multiple of 8 that divides hidden_size={hidden_size}")
    heads = hidden_size // head_dim
    text = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
        head_dim=head_dim,
        max_position_embeddings=32768, bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        # mrope_section must sum to head_dim / 2 (temporal, height, width).
        rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                         "mrope_section": [head_dim // 4, head_dim // 8, head_dim // 8]},
    )
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden_size)
    tokens = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    if arch == "qwen3_vl":
        text["rope_parameters"]["mrope_interleaved"] = True
        vision.update(num_position_embeddings=64, deepstack_visual_indexes=[1])
        return tf.Qwen3VLConfig(text_config=text, vision_config=vision, **tokens)
    vision.update(fullatt_block_indexes=[1], window_size=112)
    return tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens)


def build_model(tokenizer, *, arch: str = "qwen2_5_vl", hidden_size: int = 64, num_layers: int = 2, head_dim: int = 32,
                seed: int = 0):
    """A Qwen2.5-VL (or Qwen3-VL) with a 2-block vision tower and a `num_layers` text decoder, random weights.

    head_dim is 32 by default, the smallest head size vLLM's CPU attention serves (it has no 16).
    """
    import torch
    from transformers import AutoModelForImageTextToText

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = _config(_check_arch(arch), ids, len(tokenizer), hidden_size, num_layers, head_dim)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    # At the default init (std 0.02) a tiny model's output barely depends on its input, which
    # would let position or masking bugs pass the tests; std 0.1 makes the context matter.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.1)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    return model.eval()


def make_tiny_model(out_dir: str | Path, *, arch: str = "qwen2_5_vl", seed: int = 0) -> Path:
    """Write a tiny checkpoint directory (config, safetensors, tokenizer, processor) that loads like a real one."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    processor = build_processor(arch=arch)
    model = build_model(processor.tokenizer, arch=arch, seed=seed)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def build_chat_model(tokenizer=None, *, seed: int = 0):
    """A tiny random Qwen2 chat LM with the same offline tokenizer (a policy or question writer for smoke tests).

    Returns (model, tokenizer); the tokenizer carries the chat template.
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32768,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).eval(), tokenizer


def make_tiny_chat_model(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Save `build_chat_model` to a directory (TRL rebuilds reference models from a path)."""
    out = Path(out_dir)
    model, tokenizer = build_chat_model(seed=seed)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
