"""Pairwise human-preference benchmarks: GenAI-Bench arena votes, VideoGen-RewardBench, MonetBench."""

from __future__ import annotations

import logging
from pathlib import Path

from finger_reward.evaluation.records import Benchmark, BenchmarkError, VideoPair
from finger_reward.evaluation.tables import is_missing, read_rows, text, video_paths

logger = logging.getLogger(__name__)

# TIGER-Lab/GenAI-Bench `vote_type`; the bracketed verdict spellings of its judge template are accepted too.
GENAI_VOTES = {
    "leftvote": "leftvote", "rightvote": "rightvote", "tievote": "tievote", "bothbad_vote": "bothbad_vote",
    "a>b": "leftvote", "b>a": "rightvote", "a=b=good": "tievote", "a=b=bad": "bothbad_vote",
}
VOTE_LABELS = {"leftvote": 1, "rightvote": -1, "tievote": 0, "bothbad_vote": 0}  # for tau/diff: both ties are 0
# MonetBench's prompt column under the names its readers use (VisionRewardDB-Video: not confirmed which).
PROMPT_COLUMNS = ("prompt", "caption", "text", "prompt_en", "Prompt")
# Label spellings, case-insensitive: VideoAlign A/B/same; VisionRewardDB-Video video1/video2/tie;
# FingER's description of MonetBench win/lose/tie (from video A's side: not confirmed); 1/2 and 1/-1/0.
PAIR_LABELS = {
    "a": 1, "video1": 1, "win": 1, "1": 1, "1.0": 1,
    "b": -1, "video2": -1, "lose": -1, "2": -1, "2.0": -1, "-1": -1, "-1.0": -1,
    "same": 0, "tie": 0, "equal": 0, "0": 0, "0.0": 0,
}
UNLABELLED = ("invalid",)  # VideoAlign's train layout documents an "invalid" label; such cells are skipped
VIDEO_A = ("path_A", "video1_path", "video_a", "video_A", "video1")
VIDEO_B = ("path_B", "video2_path", "video_b", "video_B", "video2")
DIMENSION_COLUMNS = {"Overall": "overall", "overall": "overall", "VQ": "VQ", "MQ": "MQ", "TA": "TA"}
SINGLE_LABEL = ("standard_answer", "preference", "label")

NOTES = {
    "videogen-rewardbench": (
        "VideoGen-RewardBench pair form (KwaiVGI/VideoAlign videogen-rewardbench.csv): path_A/path_B per "
        "prompt with labels Overall, VQ, MQ, TA in A/B/same, one VideoPair per labelled dimension."
    ),
    "monetbench": (
        "MonetBench video pair form (THUDM/VisionRewardDB-Video test split as public evaluation scripts read it: "
        "video1_path/video2_path, standard_answer video1/video2/tie) for FingER's tau/diff pairwise accuracy."
    ),
    "preference-pairs": "Generic preference-pair form: prompt, video A, video B and a win/lose/tie label per row.",
}


def load_genai_bench_pairs(path: str | Path, video_root: str | Path | None = None, *,
                           video_map: dict[str, str] | None = None) -> Benchmark:
    """GenAI-Bench arena votes: TIGER-Lab/GenAI-Bench `video_generation` rows, exported locally.

    Columns prompt, left_video, right_video, vote_type (leftvote / rightvote / tievote / bothbad_vote),
    as read by TIGER-AI-Lab/GenAI-Bench inference.py; any row format of `read_rows`. Video fields
    that are URLs need `video_map` (`tables.load_video_map`).
    """
    path = Path(path)
    videos = video_paths(path, video_root, video_map)
    items = []
    for where, row in read_rows(path):
        vote = text(row, "vote_type", where)
        if vote.lower() not in GENAI_VOTES:
            expected = "expected one of leftvote, rightvote, tievote, bothbad_vote"
            raise BenchmarkError(where, "vote_type", f"{expected}; got {vote!r}")
        vote = GENAI_VOTES[vote.lower()]
        items.append(VideoPair(
            prompt=text(row, "prompt", where),
            video_a=videos(text(row, "left_video", where), where, "left_video"),
            video_b=videos(text(row, "right_video", where), where, "right_video"),
            label=VOTE_LABELS[vote], vote=vote,
        ))
    counts = {v: sum(item.vote == v for item in items) for v in VOTE_LABELS}
    note = (
        f"GenAI-Bench arena-vote form (TIGER-Lab/GenAI-Bench video_generation, GenAI-Arena votes): {len(items)} "
        f"pairs ({', '.join(f'{n} {v}' for v, n in counts.items())}); tau/diff read both kinds of tie as one, "
        "the four-way accuracy keeps them apart as GenAI-Bench does."
    )
    return Benchmark(name="genai-bench-video-pairs", kind="pairs", items=tuple(items), note=note)


def load_preference_pairs(
    path: str | Path, video_root: str | Path | None = None, *, name: str | None = None,
    video_map: dict[str, str] | None = None,
) -> Benchmark:
    """MonetBench / VideoGen-RewardBench style pairs from CSV, JSONL, JSON or Parquet.

    VideoGen-RewardBench (KwaiVGI/VideoAlign `eval_videogen_rewardbench.py`): path_A, path_B, prompt and
    per-dimension labels Overall/VQ/MQ/TA in A/B/same. MonetBench (VisionRewardDB-Video test split):
    video1_path, video2_path, prompt, standard_answer in video1/video2/tie. `name` defaults to the
    layout detected from the columns. The prompt may be under any of `PROMPT_COLUMNS`.
    """
    path = Path(path)
    videos = video_paths(path, video_root, video_map)
    items, layout, skipped = [], None, 0
    for where, row in read_rows(path):
        layout = layout or _layout(row)
        prompt = _prompt(row, where)
        video_a = videos(text(row, VIDEO_A, where), where, "video A")
        video_b = videos(text(row, VIDEO_B, where), where, "video B")
        labels = _labels(row, where)
        skipped += sum(label is None for label in labels.values())
        items += [VideoPair(prompt, video_a, video_b, label, dimension)
                  for dimension, label in labels.items() if label is not None]
    if skipped:
        logger.info("%s: skipped %d empty or 'invalid' labels", path, skipped)
    layout = layout or "preference-pairs"
    return Benchmark(name=name or layout, kind="pairs", items=tuple(items), note=NOTES[layout])


def _prompt(row: dict, where: str) -> str:
    if not any(column in row for column in PROMPT_COLUMNS):
        raise BenchmarkError(where, "prompt", f"no prompt column; expected one of {', '.join(PROMPT_COLUMNS)}, "
                                              f"found {', '.join(map(str, row)) or 'none'}")
    return text(row, PROMPT_COLUMNS, where)


def _layout(row: dict) -> str:
    if "path_A" in row:
        return "videogen-rewardbench"
    if "video1_path" in row or "standard_answer" in row:
        return "monetbench"
    return "preference-pairs"


def _labels(row: dict, where: str) -> dict[str, int | None]:
    """{dimension: label or None (empty/invalid cell)} from per-dimension columns or one label column."""
    columns = {column: dim for column, dim in DIMENSION_COLUMNS.items() if column in row}
    if not columns:
        single = next((column for column in SINGLE_LABEL if column in row), None)
        if single is None:
            wanted = ", ".join([*DIMENSION_COLUMNS, *SINGLE_LABEL])
            raise BenchmarkError(where, None, f"no preference label; expected a column among {wanted}")
        columns = {single: "overall"}
    return {dim: _label(row[column], where, column) for column, dim in columns.items()}


def _label(value, where: str, column: str) -> int | None:
    if is_missing(value) or (isinstance(value, str) and value.strip().lower() in UNLABELLED):
        return None
    key = str(value).strip().lower()
    if isinstance(value, bool) or key not in PAIR_LABELS:
        raise BenchmarkError(where, column, f"expected A/B/same, video1/video2/tie or win/lose/tie; got {value!r}")
    return PAIR_LABELS[key]
