"""FingER for diffusers video pipelines and the diffusion-RL code bases built on them.

Four adapters:

- `pipeline_fps(pipe)`: the frame rate a pipeline's videos play at (Wan 16, LTX-Video 24), from the
  pipeline's config where it records one, else `PIPELINE_FPS` by family. Every adapter here passes
  it on, so in-memory frames are sampled in real time, never taken as already at the reward's fps.

- `pipeline_videos(output)`: a pipeline's batched `.frames` -> one video per batch item, in a
  form `FingerReward` accepts. Batch-first conversion lives here, never in the core.

      out = pipe(prompts, num_frames=33, output_type="np")   # or "pt" / "pil", never "latent"
      scores = reward(pipeline_videos(out), prompts)

- `FlowGRPOReward(reward)`: the reward-function contract of Flow-GRPO-style trainers,
  `fn(videos, prompts, metadata) -> (scores, info)`; `scores` is a float32 array, `info` holds
  the overall score, one array per FingER dimension and a success mask.

- `VideoRewardDropIn(reward)`: `.reward(video_paths, prompts)` returning VideoAlign/VideoReward's
  list of {"VQ", "MQ", "TA", "Overall"} dicts, for DanceGRPO-style code that calls VideoReward.

A video that cannot be scored is reported as failed (NaN and success False, or None values and
its error), never given a silent 0 or -1 that a policy could learn to exploit. `reward` is a
`FingerReward` or a `FingerRewardClient`. No diffusers import is needed: the adapters read the
pipeline's output, not the pipeline.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from finger_reward import scoring
from finger_reward.errors import BatchError, FingerError, VideoError
from finger_reward.questions import DIMENSIONS
from finger_reward.results import VideoScore
from finger_reward.video import VideoFrames

OUTPUT_TYPES = ("np", "pt", "pil")

# Frame rate by pipeline family: the first entry whose name is the start of a class name in the
# pipeline's MRO. Edit it (or pass video_fps= to an adapter) for a family or checkpoint not here.
PIPELINE_FPS: dict[str, float] = {
    "WanPipeline": 16.0,       # Wan2.1 T2V 1.3B/14B and Wan2.2 A14B: 81 frames = 5 s
    "Wan": 16.0,               # Wan image-to-video, VACE, ...
    "LTX": 24.0,               # LTX-Video (its pipelines take frame_rate=25 for conditioning; files are 24)
    "CogVideoX": 8.0,          # CogVideoX-2b/5b: 49 frames = 6 s
    "HunyuanVideo": 24.0,
    "Mochi": 30.0,
    "Allegro": 15.0,
}
WAN22_TI2V_FPS = 24.0  # Wan2.2-TI2V-5B (expand_timesteps in its config) renders 24 fps
_CONFIG_FPS_KEYS = ("fps", "frame_rate", "video_fps")
_RANGE_TOL = 1e-3
_LATENT_FIX = 'call the pipeline with output_type "np", "pt" or "pil" (or decode the latents with pipe.vae first)'


# ---- pipeline -> frame rate ----------------------------------------------------------------------


def pipeline_fps(pipe) -> float:
    """The frame rate (frames per second) of `pipe`'s videos: what FingER samples them against.

    Read from the pipeline's config when it records one (`fps`, `frame_rate` or `video_fps`; set
    one with `pipe.register_to_config(fps=...)`), else Wan2.2-TI2V's 24 for a Wan pipeline with
    `expand_timesteps`, else `PIPELINE_FPS` by the class names in the pipeline's MRO. An unknown
    family is an error naming the pipeline and both ways to give its rate.
    """
    config = getattr(pipe, "config", None) or {}
    for key in _CONFIG_FPS_KEYS:
        value = config.get(key) if hasattr(config, "get") else None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not 0 < value < math.inf:
                raise ValueError(f"{type(pipe).__name__}.config[{key!r}]={value!r} is not a positive frame rate")
            return float(value)
    names = [cls.__name__ for cls in type(pipe).__mro__]
    if any(n.startswith("Wan") for n in names) and hasattr(config, "get") and config.get("expand_timesteps"):
        return WAN22_TI2V_FPS
    for family, fps in PIPELINE_FPS.items():
        if any(n.startswith(family) for n in names):
            return float(fps)
    raise ValueError(f"no frame rate known for {type(pipe).__name__}: pass video_fps= (its videos' frames per "
                     f"second), call pipe.register_to_config(fps=...), or add it to PIPELINE_FPS "
                     f"(known families: {', '.join(PIPELINE_FPS)})")


# ---- pipeline output -> videos -------------------------------------------------------------------


def pipeline_videos(output: Any, *, output_type: str | None = None, pipeline=None,
                    video_fps: float | None = None) -> list:
    """One video per batch item from a pipeline output (anything with `.frames`) or its raw `.frames`.

    With `pipeline` (its rate from `pipeline_fps`) or `video_fps`, each item is a `VideoFrames`
    carrying that frame rate, so FingER samples it in real time wherever it is scored; give one of
    them for Wan's 81 frames (more than the reward's max_frames, which is an error without a rate).

    - np  (B, F, H, W, C) float in [0, 1] -> uint8 arrays (F, H, W, C), rounded;
    - pt  (B, F, C, H, W) float in [0, 1] -> float tensors (F, C, H, W) in [0, 1] (the default value_range);
    - pil list[B][F] of PIL images      -> one list of PIL images per item.

    `output_type` is taken from the type of `.frames` when not given. Latents (`output_type="latent"`,
    or frames with a channel count other than 3) are refused with the fix. NaN, infinite or
    out-of-range frames raise `VideoError` naming the batch item.
    """
    videos = split_pipeline_output(output, output_type=output_type)
    bad = [i for i, v in enumerate(videos) if isinstance(v, Exception)]
    if bad:
        err = videos[bad[0]]
        if len(bad) > 1:
            raise VideoError(err.video, f"{err.problem} (batch items {', '.join(f'#{i}' for i in bad[1:])} are bad too)")
        raise err
    fps = resolve_fps(pipeline, video_fps)
    return videos if fps is None else [VideoFrames(v, fps) for v in videos]


def resolve_fps(pipeline, video_fps: float | None) -> float | None:
    """The frame rate an adapter passes on: `video_fps` when given, else the pipeline's, else None."""
    from finger_reward.reward import check_rate

    if video_fps is not None:
        return check_rate(video_fps, "video_fps")
    return None if pipeline is None else pipeline_fps(pipeline)


def split_pipeline_output(output: Any, *, output_type: str | None = None) -> list:
    """As `pipeline_videos`, but a bad item's `VideoError` takes its place instead of being raised.

    Errors about the whole output (latents, wrong rank or type) are still raised.
    """
    frames = output.frames if hasattr(output, "frames") else output
    kind = _output_kind(frames, output_type)
    if kind == "pil":
        return [_pil_item(item, i) for i, item in enumerate(frames)]
    if kind == "np":
        _check_batch_shape(tuple(frames.shape), channel_axis=-1, layout="(B, F, H, W, C)", kind="np")
        return [_guarded(_np_item, frames[i], i) for i in range(frames.shape[0])]
    _check_batch_shape(tuple(frames.shape), channel_axis=2, layout="(B, F, C, H, W)", kind="pt")
    frames = frames.detach().cpu()
    return [_guarded(_pt_item, frames[i], i) for i in range(frames.shape[0])]


def _output_kind(frames: Any, output_type: str | None) -> str:
    if output_type == "latent":
        raise FingerError(f'output_type="latent" gives latents, not videos; {_LATENT_FIX}')
    if output_type is not None and output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type={output_type!r} is not one of {OUTPUT_TYPES}")
    if isinstance(frames, np.ndarray):
        kind = "np"
    elif isinstance(frames, torch.Tensor):
        kind = "pt"
    elif isinstance(frames, (list, tuple)):
        kind = "pil"
    else:
        raise TypeError(
            f"expected a pipeline output with .frames, a numpy array, a torch tensor or a list[B][F] of PIL "
            f"images, got {type(frames).__name__}"
        )
    if output_type is not None and output_type != kind:
        raise ValueError(f"output_type={output_type!r} but the frames are {_KIND_NAMES[kind]}, which is output_type {kind!r}")
    return kind


_KIND_NAMES = {"np": "a numpy array", "pt": "a torch tensor", "pil": "a list"}


def _check_batch_shape(shape: tuple, channel_axis: int, layout: str, kind: str) -> None:
    if len(shape) != 5:
        raise FingerError(f"{kind} frames have {len(shape)} dims {shape}; expected 5: {layout}")
    channels = shape[channel_axis]
    if channels not in (1, 3):
        raise FingerError(
            f"{kind} frames of shape {shape} are not {layout} with C=3 (got C={channels}): they look like latents "
            f'(output_type="latent"; Wan\'s are (B, 16, F, H, W)); {_LATENT_FIX}'
        )


def _guarded(convert, item, index: int):
    try:
        return convert(item, f"batch item #{index}")
    except VideoError as err:
        return err


def _check_values(low: float, high: float, name: str) -> None:
    if not (math.isfinite(low) and math.isfinite(high)):
        raise VideoError(name, "contains NaN or infinite values")
    if low < -_RANGE_TOL or high > 1 + _RANGE_TOL:
        raise VideoError(
            name,
            f"values span [{low:.3g}, {high:.3g}], outside [0, 1] where pipeline frames lie; if these are "
            f"latents, {_LATENT_FIX}",
        )


def _np_item(video: np.ndarray, name: str) -> np.ndarray:
    if video.dtype == np.uint8:
        return video
    if not np.issubdtype(video.dtype, np.floating):
        raise VideoError(name, f"dtype {video.dtype} is not supported; expected float in [0, 1] or uint8")
    video = video.astype(np.float32, copy=False)
    _check_values(float(video.min()), float(video.max()), name)  # NaN anywhere makes min/max NaN
    return np.clip(np.rint(video * 255.0), 0, 255).astype(np.uint8)


def _pt_item(video: torch.Tensor, name: str) -> torch.Tensor:
    if video.dtype == torch.uint8:
        return video
    if not video.is_floating_point():
        raise VideoError(name, f"dtype {video.dtype} is not supported; expected float in [0, 1] or uint8")
    video = video.float()
    _check_values(video.min().item(), video.max().item(), name)
    return video


def _pil_item(item: Any, index: int):
    from PIL import Image

    name = f"batch item #{index}"
    if not isinstance(item, (list, tuple)) or not all(isinstance(im, Image.Image) for im in item):
        found = type(item).__name__ if not isinstance(item, (list, tuple)) else "a list holding non-PIL items"
        return VideoError(name, f"is {found}; pil output must be list[B][F] of PIL images")
    if not item:
        return VideoError(name, "has zero frames")
    return list(item)


# ---- Flow-GRPO: fn(videos, prompts, metadata) -> (scores, info) ----------------------------------


class FlowGRPOReward:
    """FingER in the reward contract of Flow-GRPO-style trainers: `fn(videos, prompts, metadata) -> (scores, info)`.

    `videos` is a pipeline output, its batched `.frames` (np (B,F,H,W,C) or pt (B,F,C,H,W) in
    [0, 1], or pil list[B][F]), or a list of videos of any kind FingerReward accepts. Returns

    - `scores`: float32 array (B,), the overall FingER score, or the Eq. 4 combination with
      `dimension_weights` when given; NaN for a video that could not be scored;
    - `info`: `"overall"` (FingER's own overall), one float32 array per dimension id
      (NaN where a video has no question in it), `"success"` (bool array) and `"errors"`
      (list of str, None where fine), so loops can log or weight the component rewards.

    `metadata` and extra keyword arguments the trainer passes (e.g. `only_strict`) are accepted
    and unused. In-memory frames are sampled against `video_fps`, else `pipeline_fps(pipeline)`
    (only the number is kept). Picklable when its reward is (a FingerRewardClient is).
    """

    __name__ = "finger_reward"

    def __init__(self, reward, *, dimension_weights: Mapping[str, float] | None = None, pipeline=None,
                 video_fps: float | None = None):
        self.reward = reward
        self.video_fps = resolve_fps(pipeline, video_fps)
        self.dimension_weights = None if dimension_weights is None else dict(dimension_weights)
        if self.dimension_weights is not None:
            scoring.normalize_weights(self.dimension_weights)  # validate now, not mid-training

    def __call__(self, videos: Any, prompts: Sequence[str] | str, metadata: Any = None, **host_kwargs):
        items = _video_items(videos)
        return self._arrays(score_items(self.reward, items, _prompt_list(prompts, len(items)), self.video_fps))

    def _arrays(self, results: list[VideoScore]) -> tuple[np.ndarray, dict]:
        overall = np.array([r.overall if r.ok else math.nan for r in results], dtype=np.float32)
        info: dict[str, Any] = {"overall": overall}
        for dim in DIMENSIONS:
            info[dim] = np.array([r.dimensions.get(dim, math.nan) if r.ok else math.nan for r in results], dtype=np.float32)
        errors = [r.error for r in results]
        if self.dimension_weights is None:
            scores = overall.copy()
        else:
            scores = np.array([scoring.overall_score(r.dimensions, self.dimension_weights) if r.ok else math.nan
                               for r in results], dtype=np.float32)
            for i, r in enumerate(results):
                if r.ok and math.isnan(scores[i]):
                    errors[i] = f"no question in any dimension weighted by dimension_weights={self.dimension_weights}"
        info["success"] = np.array([e is None and not math.isnan(s) for e, s in zip(errors, scores)], dtype=bool)
        info["errors"] = errors
        return scores, info


def _video_items(videos: Any) -> list:
    """Batched output -> per-item videos (a bad item's VideoError in its place); a list stays a list."""
    if hasattr(videos, "frames") or isinstance(videos, (np.ndarray, torch.Tensor)):
        return split_pipeline_output(videos)
    if isinstance(videos, (str, bytes)) or not isinstance(videos, Sequence):
        raise TypeError(f"videos must be a pipeline output, batched frames or a list of videos, got {type(videos).__name__}")
    return list(videos)


def score_items(reward, items: list, prompts: list[str], video_fps: float | None = None) -> list[VideoScore]:
    """Score the items that are videos; items that are already errors fail in place (on_error="nan" semantics).

    `video_fps` (the frame rate of in-memory items) goes to `reward.score` when given."""
    keep = [i for i, v in enumerate(items) if not isinstance(v, Exception)]
    results: list[VideoScore | None] = [None] * len(items)
    for i, item in enumerate(items):
        if isinstance(item, Exception):
            results[i] = VideoScore.failed(getattr(item, "video", f"#{i}"), prompts[i], item)
    if keep:
        try:
            rate = {} if video_fps is None else {"video_fps": video_fps}
            scored = reward.score([items[i] for i in keep], [prompts[i] for i in keep], **rate)
        except BatchError as err:
            if err.results is None:
                raise
            scored = err.results
        for i, result in zip(keep, scored):
            results[i] = result
    return results


# ---- VideoAlign / VideoReward: reward(video_paths, prompts) -> list[dict] -------------------------

MOTION_DIMENSIONS = ("temporal_consistency", "dynamic_degree", "factual_consistency")
NORM_KEYS = ("VQ", "MQ", "TA", "Overall")
_ALL_FRAMES_FPS = 1000.0  # "as many frames as the file has": num_frames alone then sets the count


class VideoRewardDropIn:
    """FingER behind VideoAlign's `VideoVLMRewardInference.reward(video_paths, prompts, ...)` interface.

    One dict per video, mapped from FingER's dimensions:

    - `"VQ"`: visual_quality;
    - `"MQ"`: mean of temporal_consistency, dynamic_degree and factual_consistency, over those present;
    - `"TA"`: text_alignment;
    - `"Overall"`: FingER's overall score (Eq. 4, weighted over the dimensions present), which
      differs from VideoReward's VQ + MQ + TA: it stays in [0, 1];
    - `"dimensions"`: all five FingER dimension scores; `"error"`: None, or why the video failed.

    A video that cannot be scored (missing, undecodable) gets None for every score and its error;
    a key whose dimensions have no question for the prompt is None too. Never 0 or -1.
    FingER scores are probabilities in [0, 1], so there is nothing to normalise by default:
    `use_norm=True` needs `norm_stats` ({"VQ": (mean, std), ...}, any of VQ, MQ, TA, Overall).
    `fps` or `num_frames` (not both) and `max_pixels` override the frame sampling of a local
    FingerReward for one call; a FingerRewardClient samples as its service is configured.
    Files carry their frame rate; in-memory videos are sampled against `video_fps`, else
    `pipeline_fps(pipeline)`.
    """

    def __init__(self, reward, *, norm_stats: Mapping[str, tuple[float, float]] | None = None, pipeline=None,
                 video_fps: float | None = None):
        self.video_fps = resolve_fps(pipeline, video_fps)
        unknown = sorted(set(norm_stats or {}) - set(NORM_KEYS))
        if unknown:
            raise ValueError(f"norm_stats has unknown key(s) {unknown}; expected some of {NORM_KEYS}")
        bad = {k: v for k, v in (norm_stats or {}).items() if len(v) != 2 or not v[1] > 0}
        if bad:
            raise ValueError(f"norm_stats values must be (mean, std) with std > 0, got {bad}")
        self.finger_reward = reward  # not `.reward`: that name is VideoReward's method
        self.norm_stats = None if norm_stats is None else {k: (float(m), float(s)) for k, (m, s) in norm_stats.items()}

    def reward(self, video_paths: Sequence[Any], prompts: Sequence[str], fps: float | None = None,
               num_frames: int | None = None, max_pixels: int | None = None, use_norm: bool = False) -> list[dict]:
        if fps is not None and num_frames is not None:
            raise ValueError("pass fps or num_frames, not both (as VideoReward)")
        if use_norm and self.norm_stats is None:
            raise ValueError("use_norm=True needs norm_stats={'VQ': (mean, std), ...} when building VideoRewardDropIn; "
                             "FingER scores are already probabilities in [0, 1] (use_norm=False)")
        reward = _with_sampling(self.finger_reward, fps, num_frames, max_pixels)
        results = score_items(reward, list(video_paths), _prompt_list(prompts, len(video_paths)), self.video_fps)
        return [self._entry(r, use_norm) for r in results]

    def _entry(self, result: VideoScore, use_norm: bool) -> dict:
        if not result.ok:
            return {"VQ": None, "MQ": None, "TA": None, "Overall": None, "dimensions": {}, "error": result.error}
        dims = result.dimensions
        motion = [dims[d] for d in MOTION_DIMENSIONS if d in dims]
        entry = {
            "VQ": dims.get("visual_quality"),
            "MQ": sum(motion) / len(motion) if motion else None,
            "TA": dims.get("text_alignment"),
            "Overall": None if math.isnan(result.overall) else result.overall,
        }
        if use_norm:
            for key, (mean, std) in self.norm_stats.items():
                if entry[key] is not None:
                    entry[key] = (entry[key] - mean) / std
        return {**entry, "dimensions": dict(dims), "error": None}


def _prompt_list(prompts: Sequence[str] | str, n: int) -> list[str]:
    prompts = [prompts] * n if isinstance(prompts, str) else list(prompts)
    if len(prompts) != n:
        raise ValueError(f"got {n} videos but {len(prompts)} prompts; pass one prompt per video or one for all")
    return prompts


def _with_sampling(reward, fps, num_frames, max_pixels):
    """The reward, or a shallow copy of a local FingerReward with this call's frame sampling."""
    if fps is None and num_frames is None and max_pixels is None:
        return reward
    if not hasattr(reward, "video_options"):
        raise ValueError(f"{type(reward).__name__} samples frames as its service is configured; "
                         "fps, num_frames and max_pixels apply only to a local FingerReward")
    options = dict(reward.video_options)
    if fps is not None:
        options["fps"] = float(fps)
    if num_frames is not None:
        if int(num_frames) < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        options.update(fps=_ALL_FRAMES_FPS, max_frames=int(num_frames))
    if max_pixels is not None:
        options["max_pixels"] = int(max_pixels)
    clone = copy.copy(reward)  # shares the engine and question bank; only the sampling differs
    clone.video_options = options
    return clone
