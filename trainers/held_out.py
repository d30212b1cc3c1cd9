"""Held-out evaluation of a video generator in training: fixed prompts, fixed seeds, deterministic samples.

The training reward of an online RL run is measured on the policy's own noisy SDE samples of
random prompts, so it moves with the prompt draw and the exploration noise. This curve does not:
every evaluation samples the same prompts from the same starting noise (video k of every prompt
from `torch.Generator().manual_seed(seed + k)`) with the deterministic ODE, so only the policy
changes between points. Each evaluation writes, under `out_dir/step-<N>/`, one mp4 per video and
`scores.jsonl` (one line per video, in contact-sheet row order), plus `out_dir/step-<N>.png`: a
contact sheet with one row per video and evenly spaced frames across.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

EVAL_PREFIX = "eval/"


# ---- pure functions ------------------------------------------------------------------------------


def to_uint8(video: np.ndarray) -> np.ndarray:
    """Frames float in [0, 1] (the pipeline's "np" output) as uint8, rounded; uint8 passes through."""
    video = np.asarray(video)
    if video.dtype == np.uint8:
        return video
    if video.size and not (0 <= video.min() and video.max() <= 1):
        raise ValueError(f"float frames must lie in [0, 1], got [{video.min():.3g}, {video.max():.3g}]")
    return np.round(video * 255).astype(np.uint8)


def contact_sheet(videos: Sequence[np.ndarray], columns: int = 8, gap: int = 2) -> np.ndarray:
    """One uint8 image (H, W, 3) of several videos (T, h, w, 3): a row per video, `columns` frames evenly spaced
    from its first to its last (all of them when it has fewer), `gap` white pixels between tiles."""
    if not videos:
        raise ValueError("contact_sheet needs at least one video")
    videos = [to_uint8(v) for v in videos]
    shapes = {v.shape[1:] for v in videos}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3:
        raise ValueError(f"videos must be (T, h, w, 3) of one frame size, got frame shapes {sorted(shapes)}")
    h, w, c = next(iter(shapes))
    cols = min(columns, max(len(v) for v in videos))
    sheet = np.full((len(videos) * (h + gap) - gap, cols * (w + gap) - gap, c), 255, dtype=np.uint8)
    for r, video in enumerate(videos):
        picks = np.linspace(0, len(video) - 1, min(cols, len(video))).round().astype(int)
        for k, t in enumerate(picks):
            sheet[r * (h + gap):r * (h + gap) + h, k * (w + gap):k * (w + gap) + w] = video[t]
    return sheet


def held_out_metrics(rewards: np.ndarray, info: dict) -> dict[str, float]:
    """`eval/reward_mean` (mean of the finite rewards), `eval/<dimension>` (nan-mean of FlowGRPOReward's per-dimension
    arrays, where any is finite) and `eval/failed` (videos that could not be scored)."""
    from finger_reward.questions import DIMENSIONS

    rewards = np.asarray(rewards, dtype=np.float64)
    ok = np.isfinite(rewards)
    metrics = {f"{EVAL_PREFIX}reward_mean": float(rewards[ok].mean()) if ok.any() else math.nan,
               f"{EVAL_PREFIX}failed": int((~ok).sum())}
    for dim in DIMENSIONS:
        values = np.asarray(info[dim], dtype=np.float64)
        if np.isfinite(values).any():
            metrics[f"{EVAL_PREFIX}{dim}"] = float(np.nanmean(values))
    return metrics


# ---- the evaluation ------------------------------------------------------------------------------


def evaluate(sample: Callable[[int, list[int]], np.ndarray], prompts: Sequence[str], seeds: Sequence[int],
             reward_fn, out_dir: str | Path, step: int, *, fps: float) -> dict[str, float]:
    """Sample, score and save one held-out evaluation; returns its `eval/...` metrics.

    `sample(i, seeds)` returns prompt i's videos (len(seeds), T, H, W, 3) in [0, 1], one per seed;
    `reward_fn` is a FlowGRPOReward (`fn(videos, prompts) -> (scores, info)`, built with the generator's
    `video_fps`); `fps`, that same rate, is written into the mp4s."""
    from finger_reward.synthetic import write_video

    out = Path(out_dir)
    folder = out / f"step-{step:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    videos, records, rewards, infos = [], [], [], []
    for i, prompt in enumerate(prompts):
        frames = sample(i, list(seeds))  # scored as sampled, as the training rewards are
        scores, info = reward_fn(frames, [prompt] * len(seeds))
        frames = to_uint8(frames)
        rewards.append(np.asarray(scores, dtype=np.float64))
        infos.append(info)
        for k, seed in enumerate(seeds):
            name = f"{i:03d}-seed{seed}.mp4"
            write_video(frames[k], folder / name, fps=fps)
            records.append({"prompt": prompt, "seed": seed, "video": name, "reward": _finite(scores[k]),
                            "error": info["errors"][k], **{dim: _finite(info[dim][k]) for dim in _dims(info)}})
            videos.append(frames[k])
    (folder / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    _write_png(contact_sheet(videos), out / f"step-{step:06d}.png")
    merged = {key: np.concatenate([info[key] for info in infos]) for key in _dims(infos[0])}
    return held_out_metrics(np.concatenate(rewards), merged)


def _dims(info: dict) -> list[str]:
    from finger_reward.questions import DIMENSIONS

    return [dim for dim in DIMENSIONS if dim in info]


def _finite(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _write_png(image: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, format="PNG")
