"""Video input: decode, sample at a target fps, resize under a pixel budget.

Accepted inputs (DESIGN.md, Contracts): a file path, raw bytes of an encoded file, a uint8 or
float array (T, H, W, C), a uint8 or float tensor (T, C, H, W), or a list of PIL images.
Float input is in the declared `value_range`, (0, 1) by default or (-1, 1); it is never guessed.
Batched generator output is split by `finger_reward.integrations.diffusers`, not here.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finger_reward.errors import VideoError

PATCH_FACTOR = 28  # Qwen2.5-VL: patch size 14 x spatial merge 2 (Qwen3-VL: 16 x 2 = 32)
VALUE_RANGES = ((0.0, 1.0), (-1.0, 1.0))
_RANGE_TOL = 1e-3


@dataclass(frozen=True)
class Clip:
    """Frames ready for the processor: uint8 (T, C, H, W) sampled at `fps` frames per second."""

    frames: torch.Tensor
    fps: float
    name: str

    @property
    def metadata(self) -> dict:
        """transformers' VideoMetadata fields; the frame rate sets mrope's temporal positions."""
        t = self.frames.shape[0]
        return {"total_num_frames": t, "fps": self.fps, "frames_indices": list(range(t)),
                "height": self.frames.shape[2], "width": self.frames.shape[3]}


def describe(video: Any, index: int) -> str:
    """A short name for error messages: the path, or the kind of input and its index."""
    if isinstance(video, (str, os.PathLike)):
        return str(video)
    if isinstance(video, (bytes, bytearray, memoryview)):
        return f"#{index} (bytes)"
    return f"#{index}"


def load_video(
    video: Any,
    *,
    fps: float = 2.0,
    max_frames: int = 48,
    max_pixels: int = 448 * 448,
    value_range: tuple[float, float] = (0.0, 1.0),
    source_fps: float | None = None,
    patch_factor: int = PATCH_FACTOR,
    name: str | None = None,
) -> Clip:
    """Turn any accepted video input into a `Clip`, raising `VideoError` naming `name` on bad input.

    Encoded videos are resampled from their own frame rate to `fps`. In-memory frames are taken
    as already sampled at `fps` unless `source_fps` says otherwise. At most `max_frames` frames
    are kept (evenly spread), and frames are resized, keeping aspect ratio, so that
    H x W <= `max_pixels` with both sides multiples of `patch_factor` (the model's patch size
    times its spatial merge).
    """
    name = name or describe(video, 0)
    if not 0 < fps < math.inf or max_frames < 1 or max_pixels < patch_factor**2:
        raise ValueError(
            f"need fps > 0, max_frames >= 1 and max_pixels >= {patch_factor**2}; "
            f"got fps={fps}, max_frames={max_frames}, max_pixels={max_pixels}"
        )
    if source_fps is not None and not 0 < source_fps < math.inf:
        raise ValueError(f"source_fps must be a positive frame rate or None, got {source_fps}")
    if tuple(value_range) not in VALUE_RANGES:
        raise ValueError(f"value_range={value_range!r} must be one of {VALUE_RANGES}")
    if isinstance(video, (str, os.PathLike, bytes, bytearray, memoryview)):
        reader = _open(video, name)
        indices, sampled_fps = sample_indices(reader.num_frames, reader.fps, fps, max_frames)
        frames = torch.from_numpy(reader.frames(indices)).permute(0, 3, 1, 2)
    else:
        frames = frames_from_memory(video, name, value_range)
        indices, sampled_fps = sample_indices(frames.shape[0], source_fps or fps, fps, max_frames)
        frames = frames[indices]
    return Clip(frames=_resize(frames, max_pixels, patch_factor, name), fps=sampled_fps, name=name)


def sample_indices(num_frames: int, source_fps: float, fps: float, max_frames: int) -> tuple[list[int], float]:
    """Evenly spread frame indices for a target `fps`, capped at `max_frames`; also the rate they have.

    A clip slower than `fps` keeps all its frames. The returned rate is what the model is told,
    so its temporal positions follow real time even when the cap thins the frames out.
    """
    duration = num_frames / source_fps
    n = min(num_frames, max_frames, max(1, round(duration * fps)))
    indices = [min(num_frames - 1, int((k + 0.5) * num_frames / n)) for k in range(n)]
    return indices, n / duration


def fit_size(height: int, width: int, max_pixels: int, factor: int = PATCH_FACTOR) -> tuple[int, int]:
    """(H, W) as multiples of `factor`, aspect ratio kept, H x W <= `max_pixels` (as Qwen's smart_resize)."""
    if min(height, width) < 1:
        raise ValueError(f"frame size {width}x{height} is empty")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio of {width}x{height} is over 200")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / scale / factor) * factor)
        w = max(factor, math.floor(width / scale / factor) * factor)
        if h * w > max_pixels:  # the short side was raised to one patch: shrink the long side to fit
            if h <= w:
                w = max_pixels // (h * factor) * factor
            else:
                h = max_pixels // (w * factor) * factor
    return h, w


def _resize(frames: torch.Tensor, max_pixels: int, factor: int, name: str) -> torch.Tensor:
    height, width = frames.shape[-2:]
    try:
        size = fit_size(height, width, max_pixels, factor)
    except ValueError as err:
        raise VideoError(name, str(err)) from None
    if size == (height, width):
        return frames.contiguous()
    resized = torch.nn.functional.interpolate(
        frames.float(), size=size, mode="bilinear", antialias=True, align_corners=False
    )
    return resized.round_().clamp_(0, 255).to(torch.uint8)


# ---- in-memory frames ---------------------------------------------------------------------------


def frames_from_memory(video: Any, name: str, value_range: tuple[float, float]) -> torch.Tensor:
    """uint8 (T, C, H, W) from an array (T, H, W, C), a tensor (T, C, H, W) or a list of PIL images."""
    if isinstance(video, (list, tuple)):
        return _frames_from_pil(video, name)
    if isinstance(video, np.ndarray):
        _check_rank(video.shape, name, "(T, H, W, C) for an array", channel_axis=-1)
        try:
            tensor = torch.from_numpy(np.ascontiguousarray(video)).permute(0, 3, 1, 2)
        except TypeError:
            raise VideoError(name, f"dtype {video.dtype} is not supported; expected uint8 or a float type") from None
    elif isinstance(video, torch.Tensor):
        _check_rank(tuple(video.shape), name, "(T, C, H, W) for a tensor", channel_axis=1)
        tensor = video.detach().cpu()
    else:
        raise VideoError(
            name,
            f"unsupported type {type(video).__name__}; expected a path, bytes, an array "
            "(T, H, W, C), a tensor (T, C, H, W) or a list of PIL images",
        )
    if tensor.shape[0] == 0:
        raise VideoError(name, "has zero frames")
    if 0 in tensor.shape[2:]:
        raise VideoError(name, f"has empty frames of height {tensor.shape[2]} and width {tensor.shape[3]}")
    if tensor.shape[1] == 1:
        tensor = tensor.expand(-1, 3, -1, -1)
    if tensor.dtype == torch.uint8:
        return tensor
    if not tensor.is_floating_point():
        raise VideoError(name, f"dtype {tensor.dtype} is not supported; expected uint8 or a float type")
    return _float_to_uint8(tensor.float(), name, value_range)


def _check_rank(shape: tuple, name: str, expected: str, channel_axis: int) -> None:
    if len(shape) == 5:
        raise VideoError(
            name,
            f"has 5 dims {tuple(shape)}, a batch of videos; pass a list of videos, or convert "
            "generator output with finger_reward.integrations.diffusers",
        )
    if len(shape) != 4:
        raise VideoError(name, f"has {len(shape)} dims {tuple(shape)}; expected 4: {expected}")
    if shape[channel_axis] not in (1, 3):
        raise VideoError(name, f"shape {tuple(shape)} has {shape[channel_axis]} channels; expected {expected} with C=3")


def _float_to_uint8(frames: torch.Tensor, name: str, value_range: tuple[float, float]) -> torch.Tensor:
    if not torch.isfinite(frames).all():
        raise VideoError(name, "contains NaN or infinite values")
    low, high = value_range
    vmin, vmax = frames.min().item(), frames.max().item()
    if vmin < low - _RANGE_TOL or vmax > high + _RANGE_TOL:
        hint = (
            "pass value_range=(-1, 1) for frames in [-1, 1]"
            if low == 0 and vmin >= -1 - _RANGE_TOL and vmax <= 1 + _RANGE_TOL
            else "expected floats in [0, 1] or [-1, 1], or uint8 in [0, 255]"
        )
        raise VideoError(name, f"values span [{vmin:.3g}, {vmax:.3g}], outside value_range {value_range}; {hint}")
    unit = (frames - low) / (high - low)
    return (unit * 255).round_().clamp_(0, 255).to(torch.uint8)


def _frames_from_pil(images: list, name: str) -> torch.Tensor:
    from PIL import Image

    if not images:
        raise VideoError(name, "has zero frames")
    bad = [i for i, im in enumerate(images) if not isinstance(im, Image.Image)]
    if bad:
        raise VideoError(name, f"list item {bad[0]} is {type(images[bad[0]]).__name__}; a list video must hold PIL images")
    sizes = {im.size for im in images}
    if len(sizes) > 1:
        raise VideoError(name, f"frames have different sizes {sorted(sizes)}")
    array = np.stack([np.asarray(im.convert("RGB")) for im in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2)


# ---- encoded files: decord first, PyAV as the fallback ------------------------------------------


@dataclass
class _Reader:
    num_frames: int
    fps: float
    frames: Any  # callable: list[int] -> uint8 array (T, H, W, C)


def _open(video: Any, name: str) -> _Reader:
    if isinstance(video, (str, os.PathLike)):
        path = Path(video)
        if not path.is_file():
            raise VideoError(name, "file not found" if not path.exists() else "is not a file")
        source: Any = str(path)
    else:
        if len(video) == 0:
            raise VideoError(name, "is empty (0 bytes)")
        source = bytes(video)
    errors = []
    for opener in (_open_decord, _open_pyav):
        try:
            reader = opener(source)
        except ImportError as err:
            errors.append(str(err))
            continue
        except Exception as err:  # decoders raise their own types for corrupt data
            errors.append(f"{opener.__name__[6:]}: {err}".strip())
            continue
        if reader.num_frames == 0:
            raise VideoError(name, "has zero frames")
        if not math.isfinite(reader.fps) or reader.fps <= 0:
            errors.append(f"{opener.__name__[6:]}: frame rate {reader.fps} is not positive")
            continue
        return reader
    if all("No module named" in e for e in errors):
        raise ImportError("decoding video files needs decord or PyAV: pip install 'finger-reward[video]'")
    raise VideoError(name, "cannot be decoded (" + "; ".join(errors) + ")")


def _open_decord(source: Any) -> _Reader:
    import decord

    reader = decord.VideoReader(source if isinstance(source, str) else io.BytesIO(source), ctx=decord.cpu(0))
    return _Reader(len(reader), float(reader.get_avg_fps()), lambda idx: reader.get_batch(idx).asnumpy())


def _open_pyav(source: Any) -> _Reader:
    import av

    with av.open(source if isinstance(source, str) else io.BytesIO(source)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        fps = float(stream.average_rate or stream.guessed_rate or 0)
    return _Reader(len(frames), fps, lambda idx: np.stack([frames[i] for i in idx]))
