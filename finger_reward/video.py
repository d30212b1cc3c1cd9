"""Video input: decode, sample at a target fps, resize under a pixel budget; optionally SlowFast.

Accepted inputs (DESIGN.md, Contracts): a file path, raw bytes of an encoded file, a uint8 or
float array (T, H, W, C), a uint8 or float tensor (T, C, H, W), or a list of PIL images; any of the
in-memory kinds may come as `VideoFrames(frames, fps)`, which carries its frame rate with it.
Float input is in the declared `value_range`, (0, 1) by default or (-1, 1); it is never guessed.
Batched generator output is split by `finger_reward.integrations.diffusers`, not here.

Frame rate: a file says its own. In-memory frames are sampled against `source_fps` (the
caller's `video_fps`); without one they are taken as already at `fps`, which is logged once, and
refused when they have more than `max_frames` frames (81 Wan frames are not 40 s of video at 2 fps).
"""

from __future__ import annotations

import io
import logging
import math
import os
import threading
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finger_reward.errors import VideoError

logger = logging.getLogger(__name__)

PATCH_FACTOR = 28  # Qwen2.5-VL: patch size 14 x spatial merge 2 (Qwen3-VL: 16 x 2 = 32)
TEMPORAL_PATCH = 2  # Qwen2.5-VL and Qwen3-VL merge 2 consecutive frames; an odd count gets its last frame repeated
SLOW, FAST = "slow", "fast"
VALUE_RANGES = ((0.0, 1.0), (-1.0, 1.0))
_RANGE_TOL = 1e-3


@dataclass(frozen=True)
class SlowFast:
    """Q-Save's SlowFast sampling (Sec. 4.2.1): frames that change go in at full resolution, the rest smaller.

    The first sampled frame is slow; a later frame whose `patch_similarity` to the latest slow
    frame exceeds `threshold` is fast, otherwise it becomes the new slow frame. Slow frames keep
    the clip's `max_pixels`; fast frames are resized under `fast_max_pixels` (default: a quarter
    of the slow frames' pixels, half of each side). `patch` is the side in pixels of the patches
    compared, and a patch counts as unchanged when its mean absolute difference is at most
    `tolerance` (a fraction of the 0-255 range). The prompt layout is in `prompts.video_blocks`.
    """

    threshold: float = 0.9
    fast_max_pixels: int | None = None
    patch: int = 28
    tolerance: float = 0.05

    def __post_init__(self):
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"SlowFast threshold={self.threshold} must be a patch similarity in [0, 1] (paper: 0.9)")
        if isinstance(self.patch, bool) or not isinstance(self.patch, int) or self.patch < 1:
            raise ValueError(f"SlowFast patch={self.patch!r} must be a positive whole number of pixels")
        if not 0.0 <= self.tolerance < 1.0:
            raise ValueError(f"SlowFast tolerance={self.tolerance} must be in [0, 1): a fraction of the 0-255 range")
        if self.fast_max_pixels is not None and (isinstance(self.fast_max_pixels, bool) or self.fast_max_pixels < 1):
            raise ValueError(
                f"SlowFast fast_max_pixels={self.fast_max_pixels!r} must be a positive pixel count or None"
            )


@dataclass(frozen=True)
class VideoFrames:
    """In-memory frames (any accepted in-memory kind) with the frame rate they play at, so the rate
    travels with the video: `VideoFrames(wan_output[0], fps=16)`."""

    frames: Any
    fps: float

    def __post_init__(self):
        if isinstance(self.fps, bool) or not isinstance(self.fps, (int, float)) or not 0 < self.fps < math.inf:
            raise ValueError(f"VideoFrames fps={self.fps!r} must be a positive frame rate (frames per second)")
        if isinstance(self.frames, (str, os.PathLike, bytes, bytearray, memoryview, VideoFrames)):
            raise ValueError(f"VideoFrames holds in-memory frames, not a {type(self.frames).__name__}: "
                             "a file says its own frame rate")


@dataclass(frozen=True)
class Pathway:
    """One SlowFast pathway: its frames (all one size) and their places among the clip's sampled frames."""

    kind: str  # SLOW or FAST
    frames: torch.Tensor  # uint8 (T, C, H, W)
    indices: tuple[int, ...]


@dataclass(frozen=True)
class Clip:
    """Frames ready for the processor: uint8 (T, C, H, W) sampled at `fps` frames per second.

    With SlowFast, `pathways` holds the slow and fast frames the model is given instead of
    `frames`; `frames` keeps every sampled frame at full resolution (the plain sampling).
    """

    frames: torch.Tensor
    fps: float
    name: str
    pathways: tuple[Pathway, ...] = ()

    @property
    def metadata(self) -> dict:
        """transformers' VideoMetadata fields; the frame rate sets mrope's temporal positions."""
        return self._metadata(range(self.frames.shape[0]), self.frames)

    def _metadata(self, indices, frames: torch.Tensor) -> dict:
        # sampled_fps = len(frames_indices) / total_num_frames * fps: a pathway's mean frame rate
        return {"total_num_frames": self.frames.shape[0], "fps": self.fps, "frames_indices": list(indices),
                "height": frames.shape[2], "width": frames.shape[3]}

    @property
    def videos(self) -> list[tuple[torch.Tensor, dict]]:
        """(frames, metadata) of each video block the model is given: the clip, or its pathways in order."""
        if not self.pathways:
            return [(self.frames, self.metadata)]
        return [(p.frames, self._metadata(p.indices, p.frames)) for p in self.pathways]

    def timestamps(self, pathway: Pathway) -> list[float]:
        """Seconds from the start of each of the pathway's frames, on the clock the processor is told."""
        return [i / self.fps for i in pathway.indices]

    def token_counts(self, patch_factor: int = PATCH_FACTOR) -> tuple[int, int]:
        """(video tokens the model is given, video tokens of plain sampling: every frame at full resolution)."""
        given = sum(video_tokens(frames, patch_factor) for frames, _ in self.videos)
        return given, video_tokens(self.frames, patch_factor)


def video_tokens(frames: torch.Tensor, patch_factor: int = PATCH_FACTOR) -> int:
    """Tokens of one video block: a token per `TEMPORAL_PATCH` frames x `patch_factor`^2 pixels."""
    t, _, h, w = frames.shape
    return -(-t // TEMPORAL_PATCH) * (h // patch_factor) * (w // patch_factor)


def describe(video: Any, index: int) -> str:
    """A short name for error messages: the path, or the kind of input and its index."""
    if isinstance(video, Clip):
        return video.name
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
    slowfast: SlowFast | None = None,
    name: str | None = None,
) -> Clip:
    """Turn any accepted video input into a `Clip`, raising `VideoError` naming `name` on bad input.

    Encoded videos are resampled from their own frame rate to `fps`; in-memory frames from
    `source_fps` (or a `VideoFrames`' own rate; the two must agree when both are given). Without
    either, in-memory frames are taken as already sampled at `fps` (logged once), or refused when
    there are more than `max_frames` of them. At most `max_frames` frames are kept (evenly
    spread), and frames are resized, keeping aspect ratio, so that H x W <= `max_pixels` with both
    sides multiples of `patch_factor` (the model's patch size times its spatial merge). A `Clip`
    (already sampled, e.g. by a client with these settings) is returned as it is.
    """
    name = name or describe(video, 0)
    if isinstance(video, Clip):
        return video
    if isinstance(video, VideoFrames):
        if source_fps is not None and not math.isclose(source_fps, video.fps, rel_tol=1e-9):
            raise VideoError(name, f"video_fps={source_fps} disagrees with the frames' own fps={video.fps}")
        video, source_fps = video.frames, video.fps
    if not 0 < fps < math.inf or max_frames < 1 or max_pixels < patch_factor**2:
        raise ValueError(
            f"need fps > 0, max_frames >= 1 and max_pixels >= {patch_factor**2}; "
            f"got fps={fps}, max_frames={max_frames}, max_pixels={max_pixels}"
        )
    if source_fps is not None and not 0 < source_fps < math.inf:
        raise ValueError(f"source_fps must be a positive frame rate or None, got {source_fps}")
    if tuple(value_range) not in VALUE_RANGES:
        raise ValueError(f"value_range={value_range!r} must be one of {VALUE_RANGES}")
    if slowfast is not None:
        _check_slowfast(slowfast, max_pixels, patch_factor)
    if isinstance(video, (str, os.PathLike, bytes, bytearray, memoryview)):
        reader = _open(video, name)
        indices, sampled_fps = sample_indices(reader.num_frames, reader.fps, fps, max_frames)
        try:
            frames = torch.from_numpy(reader.frames(indices)).permute(0, 3, 1, 2)
        except Exception as err:  # the index promised frames the data does not hold
            raise VideoError(name, f"cannot be decoded: truncated or corrupt frames ({_clean(err)})") from None
    else:
        frames = frames_from_memory(video, name, value_range)
        if source_fps is None:
            _check_unknown_rate(frames.shape[0], name, fps, max_frames)
        indices, sampled_fps = sample_indices(frames.shape[0], source_fps or fps, fps, max_frames)
        frames = frames[indices]
    full = _resize(frames, max_pixels, patch_factor, name)
    pathways = () if slowfast is None else slowfast_pathways(frames, full, slowfast, patch_factor, name)
    return Clip(frames=full, fps=sampled_fps, name=name, pathways=pathways)


_assumed_logged = threading.Event()
_assumed_lock = threading.Lock()  # decode threads meet here: the assumption is logged exactly once


def _check_unknown_rate(num_frames: int, name: str, fps: float, max_frames: int) -> None:
    """In-memory frames without a rate: refused past `max_frames`, else taken as at `fps` (logged once)."""
    if num_frames > max_frames:
        raise VideoError(
            name,
            f"has {num_frames} in-memory frames, more than max_frames={max_frames}, and no frame rate: pass "
            f"video_fps= (the rate it was generated at, e.g. 16 for Wan, 24 for LTX-Video) so it is sampled "
            f"at {fps:g} fps in real time",
        )
    with _assumed_lock:
        first = not _assumed_logged.is_set()
        _assumed_logged.set()
    if first:
        logger.warning("%s: in-memory frames with no video_fps are taken as already sampled at %g fps "
                       "(pass video_fps= to sample them in real time); logged once", name, fps)


def sample_indices(num_frames: int, source_fps: float, fps: float, max_frames: int) -> tuple[list[int], float]:
    """Evenly spread frame indices for a target `fps`, capped at `max_frames`; also the rate they have.

    A clip slower than `fps` keeps all its frames. The returned rate is what the model is told,
    so its temporal positions follow real time even when the cap thins the frames out.
    """
    duration = num_frames / source_fps
    n = min(num_frames, max_frames, max(1, round(duration * fps)))
    indices = [min(num_frames - 1, int((k + 0.5) * num_frames / n)) for k in range(n)]
    return indices, n / duration


# ---- SlowFast (Q-Save Sec. 4.2.1) ---------------------------------------------------------------


def patch_similarity(a: torch.Tensor, b: torch.Tensor, patch: int = 28, tolerance: float = 0.05) -> float:
    """The fraction of `patch` x `patch` patches (edge patches smaller) left unchanged from frame `a` to `b`.

    A patch is unchanged when its mean absolute difference over pixels and channels is at most
    `tolerance` x 255, so codec noise does not count and any real local change does.
    Frames are uint8 (C, H, W) of one size; identical frames give 1.0.
    """
    if a.shape != b.shape or a.dim() != 3:
        raise ValueError(f"frames to compare must be (C, H, W) of one size, got {tuple(a.shape)} and {tuple(b.shape)}")
    if patch < 1:
        raise ValueError(f"patch={patch} must be at least 1 pixel")
    diff = (a.float() - b.float()).abs().mean(0, keepdim=True)
    per_patch = torch.nn.functional.avg_pool2d(diff[None], patch, ceil_mode=True)
    return (per_patch <= tolerance * 255).sum().item() / per_patch.numel()  # exact: 9 of 10 is 0.9


def classify_frames(
    frames: torch.Tensor, threshold: float = 0.9, patch: int = 28, tolerance: float = 0.05
) -> list[str]:
    """SLOW or FAST for each frame of uint8 (T, C, H, W) frames, by Q-Save's rule (see `SlowFast`)."""
    if frames.dim() != 4 or frames.shape[0] == 0:
        raise ValueError(f"frames must be (T, C, H, W) with T >= 1, got shape {tuple(frames.shape)}")
    labels, latest_slow = [SLOW], frames[0]
    for frame in frames[1:]:
        if patch_similarity(latest_slow, frame, patch, tolerance) > threshold:
            labels.append(FAST)
        else:
            labels.append(SLOW)
            latest_slow = frame
    return labels


def _check_slowfast(slowfast: SlowFast, max_pixels: int, patch_factor: int) -> None:
    if not isinstance(slowfast, SlowFast):
        raise ValueError(f"slowfast must be a SlowFast(...) or None, got {type(slowfast).__name__}")
    fast = slowfast.fast_max_pixels
    if fast is not None and not patch_factor**2 <= fast <= max_pixels:
        raise ValueError(
            f"SlowFast fast_max_pixels={fast} must be between one patch ({patch_factor}x{patch_factor}="
            f"{patch_factor**2}) and max_pixels={max_pixels}: fast frames are the smaller ones"
        )


def slowfast_pathways(
    frames: torch.Tensor, full: torch.Tensor, slowfast: SlowFast, patch_factor: int, name: str
) -> tuple[Pathway, ...]:
    """The slow pathway from `full` (the frames at full resolution) and, if any frame is fast, the
    fast pathway resized from the original `frames` under the fast pixel budget."""
    labels = classify_frames(full, slowfast.threshold, slowfast.patch, slowfast.tolerance)
    slow = tuple(i for i, label in enumerate(labels) if label == SLOW)
    fast = tuple(i for i, label in enumerate(labels) if label == FAST)
    pathways = (Pathway(SLOW, full[list(slow)], slow),)
    if fast:
        budget = slowfast.fast_max_pixels or max(patch_factor**2, full.shape[2] * full.shape[3] // 4)
        pathways += (Pathway(FAST, _resize(frames[list(fast)], budget, patch_factor, name), fast),)
    return pathways


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
    _probe(source, name)
    errors = []
    for opener in (_open_decord, _open_pyav):
        try:
            reader = opener(source)
        except ImportError as err:
            errors.append(str(err))
            continue
        except Exception as err:  # decoders raise their own types for corrupt data
            errors.append(f"{opener.__name__[6:]}: {_clean(err)}")
            continue
        if reader.num_frames == 0:
            raise VideoError(name, "cannot be decoded: 0 frames in its video stream")
        if not math.isfinite(reader.fps) or reader.fps <= 0:
            errors.append(f"{opener.__name__[6:]}: frame rate {reader.fps} is not positive")
            continue
        return reader
    if all("No module named" in e for e in errors):
        raise ImportError("decoding video files needs decord or PyAV: pip install 'finger-reward[video]'")
    raise VideoError(name, "cannot be decoded (" + "; ".join(errors) + ")")


def _probe(source: Any, name: str) -> None:
    """Read the container's header with PyAV (its FFmpeg logging off) so that a file that is not a
    video, has no video stream or lost its index fails with a plain reason, before decord, whose
    bundled FFmpeg prints to stderr, ever sees it. Without PyAV, decord's errors are cleaned instead."""
    try:
        import av
    except ImportError:
        return
    try:
        with av.open(source if isinstance(source, str) else io.BytesIO(source)) as container:
            kinds = sorted({stream.type for stream in container.streams})
            if not container.streams.video:
                holds = ", ".join(kinds) if kinds else "no streams at all"
                raise VideoError(name, f"cannot be decoded: no video stream (the file holds: {holds}); expected a video")
            stream = container.streams.video[0]
            packets = sum(1 for packet in container.demux(stream) if packet.size)
            if packets == 0:
                raise VideoError(name, "cannot be decoded: 0 frames in its video stream")
            if "mp4" in container.format.name and stream.frames and packets < stream.frames:  # MP4's index counts them
                raise VideoError(name, f"cannot be decoded: truncated: holds the data of {packets} of its {stream.frames} frames, as "
                                       "when a download or a write was cut short; expected a complete video file")
    except av.error.FFmpegError:
        raise VideoError(name, _unreadable(source)) from None


def _unreadable(source: Any) -> str:
    """Why FFmpeg found no container: a cut-short MP4, text, or bytes of no video format."""
    if isinstance(source, str):
        with open(source, "rb") as f:
            head = f.read(512)
    else:
        head = source[:512]
    if head[4:8] == b"ftyp":
        return ("cannot be decoded: truncated: an MP4 without its index (moov atom), as when a download or a write was cut short; "
                "expected a complete video file")
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c.isspace() for c in text):
        return "cannot be decoded: not a video file (it holds text); expected an encoded video such as .mp4"
    return "cannot be decoded: not a video file (no container format FFmpeg knows); expected an encoded video such as .mp4"


def _clean(err: Exception) -> str:
    """A decoder's message fit for one log line: its last sentence without native source locations,
    printable characters only, at most 200 of them (never raw bytes of the video)."""
    text = " ".join(str(err).split()) or type(err).__name__
    if "Check failed" in text or ".cc:" in text:
        text = text.rsplit("ERROR", 1)[-1].strip(" :") if "ERROR" in text else "internal error"
    text = "".join(c if c.isprintable() and ord(c) < 0x7F else "?" for c in text)
    return text if len(text) <= 200 else text[:197] + "..."


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


# ---- lossless transport (the service's client sends sampled frames this way) ---------------------


def encode_frames(frames: torch.Tensor, fps: float = 1.0, codec: str = "lossless") -> bytes:
    """uint8 frames (T, C, H, W) as mp4 bytes: lossless RGB H.264 (libx264rgb, crf 0: decoded back exactly),
    or H.264 4:2:0 at crf 18 (`codec="h264"`).

    The frame rate is stored as a fraction (denominator <= 1000), so 2 fps or 16/9 fps read back exactly.
    """
    import av

    array = frames.permute(0, 2, 3, 1).contiguous().numpy()
    name, pix_fmt, crf = ("libx264rgb", "rgb24", "0") if codec == "lossless" else ("libx264", "yuv420p", "18")
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream(name, rate=Fraction(fps).limit_denominator(1000))
        stream.height, stream.width, stream.pix_fmt = array.shape[1], array.shape[2], pix_fmt
        stream.options = {"crf": crf, "preset": "ultrafast"}
        for frame in array:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def decode_lossless(data: bytes, name: str) -> torch.Tensor:
    """uint8 frames (T, C, H, W) from `encode_frames` bytes (PyAV, every frame, RGB as stored)."""
    import av

    try:
        reader = _open_pyav(data)
    except (av.error.FFmpegError, IndexError, ValueError) as err:
        raise VideoError(name, f"sampled frames cannot be decoded: {err}") from None
    if not reader.num_frames:
        raise VideoError(name, "sampled frames hold zero frames")
    return torch.from_numpy(reader.frames(range(reader.num_frames))).permute(0, 3, 1, 2).contiguous()
