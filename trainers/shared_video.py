"""One vision-tower pass for rows that show the same video: a GRPO group's G completions share their clip.

Every training forward of the evaluator's GRPO (old policy, reference, loss) runs rows that hold the same
prompt and video and differ only in their completion. Encoding the video once per forward and giving its
features to every row is the same computation as encoding it per row (the rows' gradients into the vision
tower add up, as R encodings would give them) at 1/R of the vision tower's cost and activation memory: at the
paper's settings the tower's activations are about half the step's (benchmarks/grpo_memory.py).

`encode_once(model, rows)` makes that happen inside the model's own forward: the model gets one row's video
tensors, and its video features are repeated for the `rows` rows before they fill the video tokens. So a sharded
(FSDP) model, whose embedding and vision parameters are gathered only inside its forward, works alike.
`forward_logits` is the forward every GRPO pass takes, sharing the clip where it can.
Qwen2-VL and Qwen2.5-VL only: Qwen3-VL's video features carry deepstack layers, which are not repeated here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

SUPPORTED = ("qwen2_vl", "qwen2_5_vl")
VIDEO_KEYS = ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
PER_VIDEO_KEYS = ("video_grid_thw", "second_per_grid_ts")  # one entry per video block, not per row


def shares_video(model) -> bool:
    """Whether `encode_once` applies to this model's architecture."""
    return getattr(model.config, "model_type", None) in SUPPORTED


def videos_of_rows(inputs: dict, rows: slice, total: int) -> dict:
    """The video tensors of rows `rows` of `inputs`' `total` rows, where every row holds the same number of video
    blocks (one, or two for a SlowFast clip or a preference pair), each with its grid row and patches."""
    grid = inputs["video_grid_thw"]
    blocks = grid.shape[0] // total
    if blocks * total != grid.shape[0]:
        raise ValueError(f"{grid.shape[0]} video blocks do not split evenly over {total} rows")
    first, last = rows.start * blocks, rows.stop * blocks
    patches = torch.cat([grid.new_zeros(1), grid.prod(dim=-1).cumsum(0)])
    out = {"pixel_values_videos": inputs["pixel_values_videos"][patches[first]: patches[last]]}
    out.update({key: inputs[key][first:last] for key in PER_VIDEO_KEYS if isinstance(inputs.get(key), torch.Tensor)})
    return out


def one_row_of_video(inputs: dict, rows: int) -> dict:
    """`inputs` with the video tensors of its first row only (every row shows the same videos, in the same order)."""
    return {**inputs, **videos_of_rows(inputs, slice(0, 1), rows)}


def forward_logits(model, inputs: dict, *, logits_to_keep: int, share: bool = True) -> torch.Tensor:
    """`model`'s logits at the last `logits_to_keep` positions of `inputs` (positions included). With `share`, rows
    that show one clip (a GRPO group's) encode it once (`encode_once`), where the architecture allows."""
    rows = inputs["input_ids"].shape[0]
    if share and rows > 1 and "pixel_values_videos" in inputs and shares_video(model):
        with encode_once(model, rows):
            return model(**one_row_of_video(inputs, rows), use_cache=False, logits_to_keep=logits_to_keep).logits
    return model(**inputs, use_cache=False, logits_to_keep=logits_to_keep).logits


def _vision_language_model(model):
    """The module whose forward encodes the videos (`Qwen2_5_VLModel`), through PEFT and FSDP wrappers."""
    for module in model.modules():
        if "visual" in module._modules and "get_video_features" in type(module).__dict__:
            return module
    raise ValueError(f"{type(model).__name__} has no module that encodes videos (get_video_features)")


@contextmanager
def encode_once(model, rows: int) -> Iterator[None]:
    """Inside the block, a forward of `model` given one row's video tensors (`one_row_of_video`) encodes them
    once and gives the features to each of its `rows` rows."""
    base = _vision_language_model(model)
    encode = base.get_video_features

    def encode_and_repeat(pixel_values_videos, video_grid_thw=None, **kwargs):
        out = encode(pixel_values_videos, video_grid_thw, **kwargs)
        out.pooler_output = tuple(out.pooler_output) * rows  # row after row, each row's blocks in order
        return out

    base.get_video_features = encode_and_repeat  # this instance only, for this block
    try:
        yield
    finally:
        del base.get_video_features
