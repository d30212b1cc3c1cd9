"""Preference pairs for Diffusion-DPO: generate N candidates per prompt, score them, keep (chosen, rejected).

    pairs = select_dpo_pairs(pipe, prompts, reward, "out/", num_candidates=4, strategy="best_worst",
                             pipeline_kwargs=dict(num_frames=33, height=480, width=832))
    # out/pairs.jsonl: one line per pair; out/videos/<prompt index>/<seed>.mp4: every candidate

Strategies (`select_pairs`, pure, on one prompt's scored candidates):

- `best_worst` (default): the highest against the lowest score, if they differ by more than `margin`
  (VQ-Insight's DPO data: "select the best and worst results");
- `all_pairs`: every ordered pair whose score gap is more than `margin`;
- `round_robin`: VQ-Insight Eq. 8. Every candidate meets every other once through
  `compare(a, b) -> 1 | -1 | 0` (N choose 2 comparisons); the most-preferred candidate (most wins)
  is chosen and the least-preferred (fewest wins) rejected. A 0 (tie) gives nobody a win.

Scores are the overall FingER score, or one dimension's (`dimension="temporal_consistency"`: pairs
that differ in temporal consistency). A failed candidate (not ok, or NaN in that score) never
enters a pair. Candidate k of every prompt is generated from `torch.Generator().manual_seed(seed + k)`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from finger_reward.jsonl import drop_torn_tail, read_jsonl
from finger_reward.questions import DIMENSIONS
from finger_reward.results import json_safe

logger = logging.getLogger(__name__)

STRATEGIES = ("best_worst", "all_pairs", "round_robin")
_MANAGED_KWARGS = ("prompt", "generator", "output_type", "num_videos_per_prompt", "return_dict")


# ---- pure selection ------------------------------------------------------------------------------


def candidate_score(score: Any, dimension: str | None = None) -> float:
    """What a candidate is ranked by: its overall score, or `dimension`'s; NaN if it failed or lacks it."""
    if not score.ok:
        return math.nan
    value = score.overall if dimension is None else score.dimensions.get(dimension)
    return math.nan if value is None else float(value)


def compare_scores(a: Any, b: Any, *, dimension: str | None = None, margin: float = 0.0) -> int:
    """The default round-robin comparison: 1 if a scores more than `margin` above b, -1 if below, else 0."""
    gap = candidate_score(a, dimension) - candidate_score(b, dimension)
    return 1 if gap > margin else -1 if gap < -margin else 0


def select_pairs(
    scores: Sequence[Any],
    strategy: str = "best_worst",
    *,
    margin: float = 0.0,
    dimension: str | None = None,
    compare: Callable[[Any, Any], int] | None = None,
) -> list[tuple[int, int]]:
    """(chosen, rejected) indices among one prompt's candidates (`VideoScore`s or alike: .ok, .overall, .dimensions)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is not one of {', '.join(STRATEGIES)}")
    if not margin >= 0:
        raise ValueError(f"margin must be >= 0 (the score gap a pair must exceed), got {margin}")
    if dimension is not None and dimension not in DIMENSIONS:
        raise ValueError(f"dimension={dimension!r} is not one of {', '.join(DIMENSIONS)}")
    if compare is not None and strategy != "round_robin":
        raise ValueError(f'compare is used only by strategy="round_robin", got strategy={strategy!r}')
    if compare is not None and (margin or dimension):
        raise ValueError("a custom compare decides ties and dimensions itself; pass margin and dimension "
                         "only with the default compare")
    values = [candidate_score(s, dimension) for s in scores]
    valid = [i for i, v in enumerate(values) if not math.isnan(v)]
    if len(valid) < 2:
        return []
    if strategy == "all_pairs":
        return [(i, j) for i in valid for j in valid if values[i] - values[j] > margin]
    if strategy == "round_robin":
        compare = compare or (lambda a, b: compare_scores(a, b, dimension=dimension, margin=margin))
        values = round_robin_wins([scores[i] for i in valid], compare)
        values, margin = dict(zip(valid, values)), 0
    best = max(valid, key=lambda i: values[i])  # the first on ties, so selection is deterministic
    worst = min(valid, key=lambda i: values[i])
    return [(best, worst)] if values[best] - values[worst] > margin else []


def round_robin_wins(scores: Sequence[Any], compare: Callable[[Any, Any], int]) -> list[int]:
    """Wins of each candidate when every one meets every other once (a tie is no win)."""
    wins = [0] * len(scores)
    for i, j in combinations(range(len(scores)), 2):
        outcome = compare(scores[i], scores[j])
        if outcome not in (1, -1, 0):
            raise ValueError(f"compare must return 1 (first preferred), -1 (second) or 0 (tie), got {outcome!r}")
        if outcome:
            wins[i if outcome == 1 else j] += 1
    return wins


# ---- generation, scoring and the files -----------------------------------------------------------


def select_dpo_pairs(
    pipeline,
    prompts: Sequence[str],
    reward,
    out_dir: str | Path,
    *,
    num_candidates: int = 4,
    strategy: str = "best_worst",
    margin: float = 0.0,
    dimension: str | None = None,
    compare: Callable[[Any, Any], int] | None = None,
    seed: int = 0,
    pipeline_kwargs: dict | None = None,
    video_fps: float | None = None,
    progress: bool = True,
) -> Path:
    """Generate, score and pair candidates for each prompt; returns the path of `out_dir/pairs.jsonl`.

    `pipeline` is a diffusers text-to-video pipeline called once per candidate as
    `pipeline(prompt, generator=..., output_type="np", **pipeline_kwargs)`; `reward` a `FingerReward`
    or `FingerRewardClient`, which scores the written .mp4 files (odd heights/widths are edge-padded
    by one pixel, as H.264 needs even sizes). A candidate that cannot be generated or scored is
    recorded as failed and never paired. Each pairs.jsonl line holds the prompt, the chosen and
    rejected videos (paths relative to `out_dir`), their seeds, overall and per-dimension scores and
    the strategy. Candidates are written at `video_fps`, else the pipeline's own rate
    (`integrations.diffusers.pipeline_fps`: Wan 16, LTX-Video 24), so they are scored in real time.
    Resumable: prompts already in pairs.jsonl, or in done.jsonl (prompts that gave no pair, with
    their candidates' scores), are skipped; a re-run must use the same settings. Without a
    `guidance_scale` in `pipeline_kwargs`, the family's (`trainers.video_models.GUIDANCE_SCALE`:
    Wan 5.0, LTX-Video 3.0) is used and recorded in settings.json.
    """
    from finger_reward.integrations.diffusers import resolve_fps

    fps = resolve_fps(pipeline, video_fps)
    select_pairs([], strategy, margin=margin, dimension=dimension, compare=compare)  # validate now
    if num_candidates < 2:
        raise ValueError(f"num_candidates must be >= 2 to form a pair, got {num_candidates}")
    kwargs = dict(pipeline_kwargs or {})
    managed = sorted(set(kwargs) & set(_MANAGED_KWARGS))
    if managed:
        raise ValueError(f"pipeline_kwargs may not set {managed}: select_dpo_pairs sets them per candidate")
    from finger_reward.trainers.video_models import default_guidance_scale

    if "guidance_scale" not in kwargs and default_guidance_scale(pipeline) is not None:  # as Flow-GRPO samples
        kwargs["guidance_scale"] = default_guidance_scale(pipeline)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = dict(num_candidates=num_candidates, strategy=strategy, margin=margin, dimension=dimension,
                    seed=seed, pipeline_kwargs=kwargs, fps=fps)
    _check_settings(out / "settings.json", settings)
    done = _done_prompts(out / "pairs.jsonl") | _done_prompts(out / "done.jsonl")
    from tqdm.auto import tqdm

    for index, prompt in enumerate(tqdm(prompts, desc="select-pairs", unit="prompt", disable=not progress)):
        if prompt in done:
            continue
        seeds = [seed + k for k in range(num_candidates)]
        paths = [_generate(pipeline, prompt, s, kwargs, out, f"videos/{index}/{s}.mp4", fps) for s in seeds]
        scores = _score(reward, out, paths, prompt)
        pairs = select_pairs(scores, strategy, margin=margin, dimension=dimension, compare=compare)
        if pairs:
            _append(out / "pairs.jsonl", [_pair_record(prompt, strategy, dimension, seeds, paths, scores, c, r)
                                          for c, r in pairs])
        else:
            logger.info("prompt %r gave no pair (%s)", prompt, [s.error or s.overall for s in scores])
            candidates = [_side(seeds[k], paths[k], scores[k]) for k in range(num_candidates)]
            _append(out / "done.jsonl", [{"prompt": prompt, "pairs": 0, "candidates": candidates}])
        done.add(prompt)
    return out / "pairs.jsonl"


def _generate(pipeline, prompt: str, seed: int, kwargs: dict, out: Path, rel: str, fps: float):
    """The candidate's path relative to `out`, or the error that kept it from being written."""
    import torch

    from finger_reward.integrations.diffusers import split_pipeline_output
    from finger_reward.synthetic import write_video

    output = pipeline(prompt, generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs)
    video = split_pipeline_output(output, output_type="np")[0]
    if isinstance(video, Exception):
        logger.warning("candidate seed %d of prompt %r failed: %s", seed, prompt, video)
        return video
    write_video(_even_rgb(video), out / rel, fps=fps)
    return rel


def _even_rgb(frames: np.ndarray) -> np.ndarray:
    """uint8 (T, H, W, 3) with even H and W: grey repeated to RGB, an odd side edge-padded by one pixel."""
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    pad = [(0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2), (0, 0)]
    return np.pad(frames, pad, mode="edge") if any(p[1] for p in pad) else frames


def _score(reward, out: Path, paths: list, prompt: str) -> list:
    from finger_reward.integrations.diffusers import score_items

    items = [p if isinstance(p, Exception) else str(out / p) for p in paths]
    return score_items(reward, items, [prompt] * len(items))


def _side(seed: int, path, score) -> dict:
    return {"video": None if isinstance(path, Exception) else path, "seed": seed, "score": json_safe(score.overall),
            "dimensions": json_safe(dict(score.dimensions)), "error": score.error}


def _pair_record(prompt, strategy, dimension, seeds, paths, scores, chosen: int, rejected: int) -> dict:
    record = {"prompt": prompt, "strategy": strategy, "dimension": dimension}
    for name, k in (("chosen", chosen), ("rejected", rejected)):
        side = _side(seeds[k], paths[k], scores[k])
        record.update({name: side["video"], f"{name}_seed": side["seed"], f"{name}_score": side["score"],
                       f"{name}_dimensions": side["dimensions"]})
    return record


def _append(path: Path, records: list[dict]) -> None:
    """All of a prompt's lines in one write, so an interrupted run leaves at most one torn line."""
    with path.open("a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, allow_nan=False) + "\n" for r in records))


def _done_prompts(path: Path) -> set[str]:
    """Prompts recorded in a JSONL file; a torn last line (an interrupted write) is dropped."""
    drop_torn_tail(path)
    if not path.exists():
        return set()
    done = set()
    for where, record in read_jsonl(path, objects=True):
        if not isinstance(record.get("prompt"), str):
            raise ValueError(f"{where}: no \"prompt\" string; not a line select_dpo_pairs wrote")
        done.add(record["prompt"])
    return done


def _check_settings(path: Path, settings: dict) -> None:
    """Record the run's settings; a resumed run with other settings would mix two datasets, so it raises."""
    current = json.loads(json.dumps(settings, default=repr))
    if path.exists():
        previous = json.loads(path.read_text(encoding="utf-8"))
        changed = {k: (previous.get(k), v) for k, v in current.items() if previous.get(k) != v}
        if changed:
            raise ValueError(f"{path.parent} was made with other settings {changed} (was, now); "
                             "resume with the same settings or use a fresh out_dir")
    else:
        path.write_text(json.dumps(current, indent=1) + "\n", encoding="utf-8")
