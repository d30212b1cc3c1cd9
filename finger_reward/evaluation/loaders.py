"""Loaders for FingER-test and the public benchmarks of FingER Sec. 4.1, from local files only.

Videos are referenced by path relative to `video_root` (default: the data file's directory);
nothing is downloaded and no video is opened here, so a missing video is reported by the
scorer, per video. Each bad record raises `BenchmarkError` naming the file, line/row and field.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from pathlib import Path

from finger_reward.errors import FingerError
from finger_reward.evaluation.pairs import load_genai_bench_pairs, load_preference_pairs
from finger_reward.evaluation.records import (
    ANSWERS,
    AnsweredQuestion,
    Benchmark,
    BenchmarkError,
    RatedVideo,
)
from finger_reward.evaluation.tables import load_json, read_rows, text, video_paths
from finger_reward.questions.record import Question
from finger_reward.scoring import dimension_scores, overall_score

logger = logging.getLogger(__name__)

GENAI_VIDEO_FILE = "genai_video.json"
RATING_RANGE = (1.0, 5.0)


# ---- FingER-test ------------------------------------------------------------------------------------


def load_finger_test(path: str | Path, video_root: str | Path | None = None, *,
                     video_map: dict[str, str] | None = None) -> Benchmark:
    """FingER-test: FingER-Instruct-style JSONL (question fields + video + answer), FingER Sec. 4.1.

    The FingER data is announced but unpublished; the layout is this library's FingER-Instruct
    (see `finger_reward.synthetic`), one line per (video, question); "reason" is optional.
    """
    path = Path(path)
    videos = video_paths(path, video_root, video_map)
    items = []
    for where, row in read_rows(path):
        try:
            question = Question.from_dict(row)
        except FingerError as err:
            raise BenchmarkError(where, None, str(err)) from err
        video = videos(text(row, "video", where), where, "video")
        items.append(AnsweredQuestion(question=question, video=video, answer=_answer(row, where)))
    videos = len({item.video for item in items})
    note = (
        f"FingER-test form (FingER Sec. 4.1): {len(items)} human-answered entity-level Yes/No questions "
        f"about {videos} videos, in FingER-Instruct JSONL layout; scored by Acc and by SRCC/PLCC of derived scores."
    )
    return Benchmark(name="finger-test", kind="questions", items=tuple(items), note=note)


def _answer(row: dict, where: str) -> str:
    value = text(row, "answer", where)
    for answer in ANSWERS:
        if value.lower() == answer.lower():
            return answer
    raise BenchmarkError(where, "answer", f"expected 'Yes' or 'No', got {value!r}")


def human_scores(items: Iterable[AnsweredQuestion]) -> dict[str, dict[str, float]]:
    """Per video, the human dimension scores and "overall" derived from answered questions.

    A question scores 1 when the human answer is the good one ("Yes" for a positive question,
    "No" for a negative one); a dimension is the mean of its questions and "overall" the mean of
    the dimensions present, i.e. `finger_reward.scoring` with aggregate="mean" and equal weights.
    """
    per_video: dict[str, tuple[list[float], list[str]]] = {}
    for item in items:
        scores, dimensions = per_video.setdefault(item.video, ([], []))
        scores.append(1.0 if item.good else 0.0)
        dimensions.append(item.question.dimension)
    result = {}
    for video, (scores, dimensions) in per_video.items():
        dims = dimension_scores(scores, dimensions, aggregate="mean")
        result[video] = {**dims, "overall": overall_score(dims)}
    return result


# ---- GenAI-Bench-Video, rating form ------------------------------------------------------------


def load_genai_bench_ratings(path: str | Path, video_root: str | Path | None = None, *,
                             video_map: dict[str, str] | None = None) -> Benchmark:
    """GenAI-Bench-Video ratings: `genai_video.json` of HF zhiqiulin/GenAI-Bench-800 (or -527).

    Follows linzhiqiu/t2v_metrics `GenAIBench_Video`: {prompt id: {"prompt", "models": {model:
    [1-5 ratings]}}}, video at `<root>/<model>/<prompt id>.mp4`. `path` may be the folder.
    """
    path = Path(path)
    if path.is_dir():
        path = path / GENAI_VIDEO_FILE
    if not path.is_file():
        raise FileNotFoundError(f"GenAI-Bench-Video ratings file not found: {path}")
    videos = video_paths(path, video_root, video_map)
    data = load_json(path)
    if not isinstance(data, dict) or not data:
        raise BenchmarkError(str(path), None, "expected a non-empty JSON object keyed by prompt id (genai_video.json)")
    items = []
    for key, entry in data.items():
        where = f"{path}, entry {key!r}"
        if not isinstance(entry, dict):
            raise BenchmarkError(where, None, f"expected an object with 'prompt' and 'models', got {entry!r}")
        prompt = text(entry, "prompt", where)
        models = entry.get("models")
        if not isinstance(models, dict) or not models:
            raise BenchmarkError(where, "models", f"expected a non-empty object of model -> ratings, got {models!r}")
        for model, ratings in models.items():
            mos = _mean_rating(ratings, where, f"models.{model}")
            video = videos(f"{model}/{key}.mp4", where)
            items.append(RatedVideo(video=video, prompt=prompt, human={"overall": mos}, model=str(model)))
    generators = sorted({item.model for item in items})
    note = (
        f"GenAI-Bench-Video rating form (t2v_metrics / zhiqiulin/GenAI-Bench, {len(data)} prompts x "
        f"{', '.join(generators)}): 1-5 Likert ratings per video averaged over annotators into "
        "human['overall'] (MOS), the form behind FingER's GenAI-Bench SRCC/PLCC."
    )
    return Benchmark(name="genai-bench-video-ratings", kind="ratings", items=tuple(items), note=note)


def _mean_rating(ratings, where: str, field: str) -> float:
    values = ratings if isinstance(ratings, list) else [ratings]
    low, high = RATING_RANGE
    if not values or not all(_is_number(v) and low <= v <= high for v in values):
        expected = f"expected a non-empty list of ratings in [{low:g}, {high:g}]"
        raise BenchmarkError(where, field, f"{expected}, got {ratings!r}")
    return float(sum(values)) / len(values)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---- dispatch ----------------------------------------------------------------------------------


def genai_bench_form(path: str | Path) -> str:
    """Which GenAI-Bench form a file is: "ratings" (genai_video.json, an object) or "pairs" (vote rows)."""
    path = Path(path)
    if path.is_dir():
        return "ratings"
    if path.suffix == ".json" and path.is_file():
        return "ratings" if isinstance(load_json(path), dict) else "pairs"
    return "pairs"


def _load_genai(path: str | Path, video_root: str | Path | None = None, **kw) -> Benchmark:
    if genai_bench_form(path) == "ratings":
        return load_genai_bench_ratings(path, video_root, **kw)
    return load_genai_bench_pairs(path, video_root, **kw)


def load_benchmark(kind_or_name: str, path: str | Path, video_root: str | Path | None = None, *,
                   video_map: dict[str, str] | None = None) -> Benchmark:
    """Load a benchmark by kind ("finger", "genai", "pairs") or by a benchmark name.

    `video_map` ({URL or file name: local path}, `tables.load_video_map`) locates videos the data
    names by URL or by a name that is not a path under `video_root`.
    """
    loaders = {
        "finger": load_finger_test,
        "finger-test": load_finger_test,
        "genai": _load_genai,
        "genai-bench-video-ratings": load_genai_bench_ratings,
        "genai-bench-video-pairs": load_genai_bench_pairs,
        "pairs": load_preference_pairs,
        "videogen-rewardbench": functools.partial(load_preference_pairs, name="videogen-rewardbench"),
        "monetbench": functools.partial(load_preference_pairs, name="monetbench"),
    }
    if kind_or_name not in loaders:
        raise ValueError(f"unknown benchmark {kind_or_name!r}; expected one of {', '.join(loaders)}")
    return loaders[kind_or_name](path, video_root, video_map=video_map)
