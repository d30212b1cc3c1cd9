"""Qwen-VL's 3-D rotary positions (mrope), computed as the models' original code computes them.

Every forward of a Qwen-VL model in this project takes its `position_ids` from here, never from
transformers' `get_rope_index`: transformers 5.3 and later (the pinned 5.10.4 included) start the
text after a video too early and truncate `second_per_grid_ts` before scaling it, so a checkpoint
trained anywhere else (Qwen's own, LLaMA-Factory or TRL on transformers 4.x, vLLM) would be scored
and trained on positions it never saw (DESIGN.md, facts about the stack).

The rule, per sequence (padding skipped): text tokens take consecutive positions on all three
axes; a vision block of (t, h, w) merged patches starting after position p takes
(p + time(i), p + row, p + column) for its patch (i, row, column); the next text starts one past
the largest position so far. time(i) is, for Qwen2.5-VL videos, int(i * second_per_grid_t *
tokens_per_second) scaled in float32 and then truncated, exactly as Qwen's code merged in
transformers 4.49, vLLM's `MRotaryEmbedding` and the qwen-vl-utils examples compute it; for
images, 0. Qwen3-VL writes a timestamp before every frame of a video, so each temporal patch is
its own block of t=1 (time(i) = 0) and time is carried by the text; compared against Qwen3-VL's
original `get_rope_index` (transformers 4.57, the model's release) and vLLM's `qwen3_vl` branch
(same grid split, no time scaling, text resumes at the block maximum + 1).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

__all__ = ["RopeLayout", "rope_positions", "with_rope_positions"]

ARCHITECTURES = ("qwen2_5_vl", "qwen3_vl")


@dataclass(frozen=True)
class RopeLayout:
    """What the positions depend on, read from a model config (`from_config`)."""

    arch: str
    image_token_id: int
    video_token_id: int
    spatial_merge_size: int = 2
    tokens_per_second: float = 2.0  # Qwen2.5-VL only: temporal positions per second of video

    def __post_init__(self):
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"no rope positions for model_type {self.arch!r}; supported: {ARCHITECTURES}")

    @classmethod
    def from_config(cls, config) -> "RopeLayout":
        """The layout of a Qwen2.5-VL or Qwen3-VL config (or of a model, through its `.config`)."""
        config = getattr(config, "config", config)
        vision = config.vision_config
        return cls(arch=config.model_type, image_token_id=config.image_token_id, video_token_id=config.video_token_id,
                   spatial_merge_size=vision.spatial_merge_size,
                   tokens_per_second=getattr(vision, "tokens_per_second", 2.0) or 2.0)


def rope_positions(layout: RopeLayout, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                   image_grid_thw: torch.Tensor | None = None, video_grid_thw: torch.Tensor | None = None,
                   second_per_grid_ts=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions (3, B, L), rope_deltas (B, 1)) for a batch; padding (attention_mask 0) may be on either side.

    Grids are consumed in order across rows, as the processor lays them out. Padded slots get
    position 1, as in the original. `rope_deltas` is max position + 1 - L: the position of a token
    appended after the row's last slot is its slot index plus this delta.
    """
    rows, length = input_ids.shape
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    videos = _video_blocks(layout, video_grid_thw, second_per_grid_ts)
    blocks = {layout.image_token_id: iter(_image_blocks(image_grid_thw)), layout.video_token_id: iter(videos)}
    positions = torch.ones(3, rows, length, dtype=torch.long)
    deltas = []
    for r in range(rows):
        tokens = input_ids[r][mask[r]].cpu()
        row = _row_positions(layout, tokens, blocks)
        positions[:, r, mask[r].cpu()] = row
        deltas.append((int(row.max()) + 1 if row.numel() else 0) - length)
    for token, rest in blocks.items():
        if next(rest, None) is not None:
            kind = "image" if token == layout.image_token_id else "video"
            raise ValueError(f"more {kind} grids than {kind} blocks in input_ids")
    return positions.to(input_ids.device), torch.tensor(deltas, device=input_ids.device)[:, None]


def with_rope_positions(config, inputs: dict) -> dict:
    """Processor outputs plus their `position_ids` (3, B, L), for a model forward or `generate`.

    `generate` continues each row from its last slot's position + 1 on all three axes, which is
    the original's rule for new tokens after a prompt that ends in text.
    """
    positions, _ = rope_positions(
        RopeLayout.from_config(config), inputs["input_ids"], inputs.get("attention_mask"),
        image_grid_thw=inputs.get("image_grid_thw"), video_grid_thw=inputs.get("video_grid_thw"),
        second_per_grid_ts=inputs.get("second_per_grid_ts"),
    )
    return {**inputs, "position_ids": positions}


# ---- per sequence -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Block:
    """One vision block in merged patches, and the temporal position of each of its t slices."""

    t: int
    h: int
    w: int
    times: torch.Tensor  # (t,) long


def _image_blocks(grid_thw) -> list[_Block]:
    return [] if grid_thw is None else [_Block(t, h, w, torch.zeros(t, dtype=torch.long))
                                        for t, h, w in grid_thw.tolist()]


def _video_blocks(layout: RopeLayout, grid_thw, second_per_grid_ts) -> list[_Block]:
    if grid_thw is None:
        return []
    grids = grid_thw.tolist()
    if layout.arch == "qwen3_vl":  # one block per temporal patch, each after its own timestamp text
        return [_Block(1, h, w, torch.zeros(1, dtype=torch.long)) for t, h, w in grids for _ in range(t)]
    spg = torch.ones(len(grids)) if second_per_grid_ts is None else torch.as_tensor(second_per_grid_ts).flatten()
    if len(spg) != len(grids):
        raise ValueError(f"second_per_grid_ts has {len(spg)} values for {len(grids)} videos")
    spg = spg.to(torch.float32)
    blocks = []
    for (t, h, w), seconds in zip(grids, spg):
        # float32 scale, then truncate: the order and precision of the original (vLLM, transformers 4.49).
        times = ((torch.arange(t, dtype=torch.float32) * seconds) * layout.tokens_per_second).long()
        blocks.append(_Block(t, h, w, times))
    return blocks


def _row_positions(layout: RopeLayout, tokens: torch.Tensor, blocks: dict) -> torch.Tensor:
    """Positions (3, n) of one unpadded sequence, taking its vision blocks' grids from `blocks`."""
    merge = layout.spatial_merge_size
    is_vision = (tokens == layout.image_token_id) | (tokens == layout.video_token_id)
    vision_at = is_vision.nonzero().flatten().tolist()
    pieces, start, next_pos = [], 0, 0
    while (k := bisect.bisect_left(vision_at, start)) < len(vision_at):
        first = vision_at[k]
        token = int(tokens[first])
        block = next(blocks[token], None)
        kind = "image" if token == layout.image_token_id else "video"
        if block is None:
            raise ValueError(f"input_ids hold more {kind} blocks than there are {kind} grids")
        h, w = block.h // merge, block.w // merge
        size = block.t * h * w
        if first + size > len(tokens) or not bool((tokens[first:first + size] == token).all()):
            raise ValueError(f"a {kind} grid of {block.t}x{block.h}x{block.w} patches needs {size} consecutive "
                             f"{kind} tokens at index {first}; input_ids do not match the grids")
        text = torch.arange(first - start) + next_pos
        pieces.append(text[None].expand(3, -1))
        offset = next_pos + first - start
        grid = torch.stack([
            block.times.repeat_interleave(h * w),
            torch.arange(h).repeat_interleave(w).repeat(block.t),
            torch.arange(w).repeat(block.t * h),
        ]) + offset
        pieces.append(grid)
        next_pos = int(grid.max()) + 1
        start = first + size
    pieces.append((torch.arange(len(tokens) - start) + next_pos)[None].expand(3, -1))
    return torch.cat(pieces, 1)
