"""Per-GPU memory of the evaluator's GRPO at the paper's settings, counted on the meta device (no weights, no GPU).

Qwen2.5-VL-7B (its released config), G=16 completions of up to 256 tokens per question, each over a 48-frame
clip at 448x448 (24 x 32 x 32 patches, 6,144 video tokens), full fine-tuning with AdamW and a frozen reference
(beta=0.04). Printed for the plain data-parallel loop (`fsdp: false`: every GPU holds everything) and for the
sharded one (`fsdp: true`, trainers/fsdp.py) on N GPUs:

    python benchmarks/grpo_memory.py                          # 7B on 8 GPUs, 4 completions per forward
    python benchmarks/grpo_memory.py --gpus 8 --forward-batch-size 1

Weights, gradients and optimizer states are counted from the model's parameters. Activations are the tensors
autograd saves for backward, counted by running one decoder layer and one vision block forward on the meta
device (`saved_tensors_hooks`), with gradient checkpointing on (each layer keeps its input; one layer at a time
recomputes everything else). Attention score matrices are left out (flash/efficient attention keeps none);
the meta device runs SDPA's math path, whose float32 query/key/value copies make the attention share an upper
bound.
"""

from __future__ import annotations

import argparse

import torch

GB = 1e9
# Qwen2.5-VL-7B-Instruct's config.json.
TEXT = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
            vocab_size=152064, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, fullatt_block_indexes=[7, 15, 23, 31],
              out_hidden_size=3584, window_size=112)


def meta_model():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(text_config=TEXT, vision_config=VISION)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        return Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)


def saved_bytes(run, tokens: int, *, window: int | None = None) -> int:
    """Bytes of activations autograd saves for backward while `run()` executes over `tokens` tokens: tensors
    with a token dimension (weights saved by a matmul are the parameters themselves, not extra memory), less
    attention score matrices (of side `tokens`, or `window` for windowed attention)."""
    total = 0

    def pack(t):
        nonlocal total
        square = t.dim() >= 2 and t.shape[-1] == t.shape[-2] and t.shape[-1] in (tokens, window)
        if tokens in t.shape and not square:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return total


def layer_bytes_per_token(model, tokens: int = 2048) -> float:
    """Saved bytes per token of one decoder layer (bf16 compute), counted on the meta device."""
    lm = model.model.language_model
    hidden = torch.empty(1, tokens, TEXT["hidden_size"], device="meta", dtype=torch.bfloat16, requires_grad=True)
    positions = torch.zeros(3, 1, tokens, dtype=torch.long, device="meta")
    embeddings = lm.rotary_emb(hidden, positions)
    layer = lm.layers[0]
    return saved_bytes(lambda: layer(hidden, position_embeddings=embeddings, attention_mask=None,
                                     position_ids=positions[0]), tokens) / tokens


def block_bytes_per_patch(model, patches: int = 4096, window: int = 64) -> float:
    """Saved bytes per patch of one vision block (windowed attention over `window` patches), on the meta device."""
    block = model.model.visual.blocks[0]
    hidden = torch.empty(patches, VISION["hidden_size"], device="meta", dtype=torch.bfloat16, requires_grad=True)
    head_dim = VISION["hidden_size"] // VISION["num_heads"]
    cos = torch.empty(patches, head_dim, device="meta")
    cu_seqlens = torch.arange(0, patches + 1, window, dtype=torch.int32)  # on the CPU: the block reads its lengths
    return saved_bytes(lambda: block(hidden, cu_seqlens=cu_seqlens, position_embeddings=(cos, cos)),
                       patches, window=window) / patches


def table(args) -> list[tuple[str, float, float]]:
    model = meta_model()
    params = sum(p.numel() for p in model.parameters())
    largest_unit = max(sum(p.numel() for p in m.parameters()) for m in [*model.model.language_model.layers,
                                                                         *model.model.visual.blocks])
    side = args.pixels // 28 * 2  # patches per side: 448 px -> 32 (patch 14)
    grid_t = args.frames // 2  # temporal patch of 2 frames
    patches = grid_t * side * side
    video_tokens = patches // 4  # 2x2 spatial merge
    length = args.prompt_tokens + video_tokens + args.completion_tokens
    rows, n = args.forward_batch_size, args.gpus
    hidden, layers, blocks = TEXT["hidden_size"], TEXT["num_hidden_layers"], VISION["depth"]
    per_token, per_patch = layer_bytes_per_token(model), block_bytes_per_patch(model)

    # Training forward of `rows` completions: checkpointed layer inputs + one layer recomputed, vision likewise,
    # float32 completion logits and their log-softmax (logits_to_keep: completion positions only).
    text = rows * length * (hidden * 2 * layers + per_token)
    clips = 1 if args.share_video else rows  # trainers/shared_video.py: a forward's rows share one encoding
    vision = clips * patches * (VISION["hidden_size"] * 2 * blocks + per_patch)
    logits = rows * (args.completion_tokens + 1) * TEXT["vocab_size"] * 4 * 2
    activations = text + vision + logits
    # Sampling: the KV cache of G rows (bf16 keys and values of every layer).
    head_dim = hidden // TEXT["num_attention_heads"]
    kv_cache = args.generations * length * layers * 2 * TEXT["num_key_value_heads"] * head_dim * 2

    rows_out = [
        ("parameters (billions)", params / 1e9, params / 1e9),
        ("weights, fp32", params * 4 / GB, params * 4 / n / GB),
        ("gradients, fp32", params * 4 / GB, params * 4 / n / GB),
        ("AdamW states, fp32", params * 8 / GB, params * 8 / n / GB),
        ("reference model (fp32 copy | bf16 shards)", params * 4 / GB, params * 2 / n / GB),
        ("one layer gathered for compute, bf16", 0.0, largest_unit * 2 * 2 / GB),  # this one and the next prefetched
        (f"activations, {rows} completion(s) per forward", activations / GB, activations / GB),
        ("  of which decoder", text / GB, text / GB),
        ("  of which vision tower", vision / GB, vision / GB),
        ("  of which completion logits", logits / GB, logits / GB),
        ("sampling: whole policy gathered, bf16", 0.0, params * 2 / GB),
        (f"sampling: KV cache of {args.generations} completions", kv_cache / GB, kv_cache / GB),
    ]
    states = [sum(r[i] for r in rows_out[1:5]) for i in (1, 2)]
    train_peak = [states[0] + activations / GB, states[1] + rows_out[5][2] + activations / GB]
    sample_peak = [states[0] + kv_cache / GB, states[1] + (params * 2 + kv_cache) / GB]
    rows_out += [
        ("peak while training (states + activations)", *train_peak),
        ("peak while sampling (states + gathered + KV)", *sample_peak),
        ("PEAK PER GPU", max(train_peak[0], sample_peak[0]), max(train_peak[1], sample_peak[1])),
    ]
    print(f"Qwen2.5-VL-7B, {n} GPUs, G={args.generations}, {args.frames} frames at {args.pixels}x{args.pixels} -> "
          f"{video_tokens} video tokens, sequence {length}, the clip encoded once per "
          f"{'forward' if args.share_video else 'row'}; counted on the meta device: decoder layer "
          f"{per_token / 1e3:.0f} kB/token, vision block {per_patch / 1e3:.0f} kB/patch saved for backward")
    return rows_out


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--generations", type=int, default=16, help="G (paper: 16)")
    parser.add_argument("--forward-batch-size", type=int, default=4, help="completions per forward (configs/grpo_*.yaml: 4)")
    parser.add_argument("--frames", type=int, default=48, help="frames per clip (2 fps, at most 48)")
    parser.add_argument("--pixels", type=int, default=448, help="frame side under the 448x448 budget")
    parser.add_argument("--prompt-tokens", type=int, default=160, help="system turn, question and chat tags")
    parser.add_argument("--completion-tokens", type=int, default=256, help="max_completion_length")
    parser.add_argument("--no-share-video", dest="share_video", action="store_false",
                        help="count the vision tower once per row (recipe share_video: false) instead of once per forward")
    args = parser.parse_args(argv)
    rows = table(args)
    print(f"{'GB per GPU':48s} {'data parallel':>14s} {'FSDP x' + str(args.gpus):>12s} {'ratio':>7s}")
    for name, plain, sharded in rows:
        ratio = f"{plain / sharded:6.1f}x" if sharded and plain and not name.startswith("parameters") else ""
        print(f"{name:48s} {plain:14.1f} {sharded:12.1f} {ratio:>7s}")
    return rows


if __name__ == "__main__":
    main()
