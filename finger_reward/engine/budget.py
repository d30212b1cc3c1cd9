"""`max_batch_tokens="auto"`: how many token slots of a question pass fit in free GPU memory.

A slot is one (row, position) of the grown KV cache: a video's Q question rows over its prefix
of P tokens and suffixes of L tokens (plus the reason in reason mode) take Q x (P + L) slots.
The arithmetic is pure and tested on made-up numbers; `auto_batch_tokens` reads the device.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

DEFAULT_BATCH_TOKENS = 16384  # CPU, or whenever free memory cannot be read


def kv_bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """Keys and values of every decoder layer for one token: 2 x layers x kv_heads x head_dim x dtype bytes."""
    return 2 * layers * kv_heads * head_dim * dtype_bytes


def activation_bytes_per_token(hidden_size: int, intermediate_size: int, dtype_bytes: int) -> int:
    """Transient memory of one decoder layer per token fed: about four hidden-size buffers
    (residual, norm, attention input and output) and three MLP-width ones (gate, up, activation)."""
    return dtype_bytes * (4 * hidden_size + 3 * intermediate_size)


def batch_tokens_for_memory(
    free_bytes: int,
    kv_bytes: int,
    activation_bytes: int,
    *,
    fraction: float = 0.85,
    reserve_bytes: int = 1 << 30,
    minimum: int = 1024,
) -> int:
    """Slots that fit in `fraction` of `free_bytes` less `reserve_bytes` (vision tower, allocator slack).

    Every slot is charged its KV cache and, conservatively, a fed token's activations, although a
    question pass feeds only its suffix tokens; never less than `minimum`, so a lone video still runs
    (and a real out-of-memory then splits its questions).
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction={fraction} must be in (0, 1]")
    if kv_bytes <= 0 or activation_bytes < 0:
        raise ValueError(f"need kv_bytes > 0 and activation_bytes >= 0, got {kv_bytes} and {activation_bytes}")
    usable = free_bytes * fraction - reserve_bytes
    return max(minimum, int(usable // (kv_bytes + activation_bytes)))


def slot_bytes(config, dtype_bytes: int) -> tuple[int, int]:
    """(KV bytes, activation bytes) per token from a Qwen-VL config (its `text_config`) or a text-only one."""
    text = getattr(config, "text_config", None) or config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    return (kv_bytes_per_token(text.num_hidden_layers, kv_heads, head_dim, dtype_bytes),
            activation_bytes_per_token(text.hidden_size, text.intermediate_size, dtype_bytes))


def auto_batch_tokens(model) -> int:
    """The token budget for `model` from its device's free memory now; `DEFAULT_BATCH_TOKENS` off CUDA.

    Free memory counts what PyTorch's caching allocator holds but does not use, so the budget does
    not shrink after the first batch.
    """
    import torch

    param = next(model.parameters())
    if param.device.type != "cuda":
        return DEFAULT_BATCH_TOKENS
    device = param.device
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    kv, act = slot_bytes(model.config, param.element_size())
    tokens = batch_tokens_for_memory(free, kv, act)
    logger.debug("max_batch_tokens='auto': %d slots (%.1f GiB free, %d + %d bytes per slot)",
                tokens, free / 2**30, kv, act)
    return tokens
