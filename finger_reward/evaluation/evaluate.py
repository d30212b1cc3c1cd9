"""Score a benchmark with FingerReward and measure agreement with humans, as the FingER paper reports it.

`score_benchmark` scores every distinct (video, prompt) once, appending each result to a JSONL
file as it goes, so a killed run resumes where it stopped (and the file feeds
`finger-reward report`). `agreement` turns scores and human labels into the paper's figures:
answer accuracy and SRCC/PLCC per dimension, with and without probabilities (Tables 1-2), or
pairwise tau/diff for preference pairs (Table 3).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from finger_reward import metrics
from finger_reward.evaluation.loaders import Benchmark, human_scores
from finger_reward.questions import DIMENSIONS, QuestionBank
from finger_reward.results import VideoScore
from finger_reward.scorefile import Key, Progress, score_to_file


# The human-label columns of the published pair benchmarks, and the FingER score each is compared with.
PAIR_DIMENSIONS = {"overall": "overall", "VQ": "visual_quality", "TA": "text_alignment"}
# Human-label columns with no FingER counterpart: left out of the figures, listed under "unmapped".
UNMAPPED = {
    "MQ": "VideoGen-RewardBench's motion quality has no FingER counterpart: dynamic_degree asks whether "
          "things move, temporal_consistency whether they stay the same, neither how well they move",
}


def benchmark_videos(bench: Benchmark) -> list[Key]:
    """Distinct (video, prompt) pairs the benchmark needs scored, in first-seen order."""
    keys: list[Key] = []
    for item in bench.items:
        if bench.kind == "questions":
            keys.append((item.video, item.question.prompt))
        elif bench.kind == "ratings":
            keys.append((item.video, item.prompt))
        else:
            keys += [(item.video_a, item.prompt), (item.video_b, item.prompt)]
    return list(dict.fromkeys(keys))


def benchmark_bank(bench: Benchmark) -> QuestionBank | None:
    """For a question benchmark, exactly the human-answered questions; otherwise None (use the reward's)."""
    if bench.kind != "questions":
        return None
    return QuestionBank(item.question for item in bench.items)


def score_benchmark(reward, bench: Benchmark, scores_path: str | Path, *, chunk: int = 16,
                    root: str | Path | None = None, retry_failed: bool = True,
                    progress: Progress | None = None) -> dict[Key, VideoScore]:
    """Score every (video, prompt) of the benchmark not yet in `scores_path`, appending as it goes;
    videos are known by their path relative to `root` (`scorefile.video_key`), failed ones retried."""
    return score_to_file(reward, benchmark_videos(bench), scores_path, root=root, retry_failed=retry_failed,
                         chunk=chunk, desc=f"scoring {bench.name}", progress=progress)


def agreement(bench: Benchmark, scores: dict[Key, VideoScore]) -> dict:
    """The paper's figures for this benchmark; videos that failed to score are counted and left out."""
    failed = sorted({key[0] for key in benchmark_videos(bench) if key not in scores or not scores[key].ok})
    figures = {"benchmark": bench.name, "kind": bench.kind, "note": bench.note, "failed_videos": failed}
    if bench.kind == "questions":
        figures["dimensions"] = _question_agreement(bench, scores)
    elif bench.kind == "ratings":
        figures["dimensions"] = _rating_agreement(
            [(scores.get((item.video, item.prompt)), item.human) for item in bench.items])
    else:
        figures["pairs"], figures["unmapped"] = _pair_agreement(bench, scores)
        figures["compared_with"] = {column: PAIR_DIMENSIONS.get(column, column) for column in figures["pairs"]}
    return figures


def _question_agreement(bench: Benchmark, scores: dict[Key, VideoScore]) -> dict:
    answers = defaultdict(lambda: ([], []))
    for item in bench.items:
        result = scores.get((item.video, item.question.prompt))
        match = [q for q in (result.questions if result and result.ok else []) if q.question == item.question.question]
        if match:
            for dim in (item.question.dimension, "overall"):
                answers[dim][0].append(match[0].answer)
                answers[dim][1].append(item.answer)
    human = human_scores(bench.items)
    by_video = {item.video: scores.get((item.video, item.question.prompt)) for item in bench.items}
    table = _rating_agreement([(by_video[video], human[video]) for video in human])
    for dim, (predicted, truth) in answers.items():
        table.setdefault(dim, {})["acc"] = metrics.answer_accuracy(predicted, truth)
        table[dim]["questions"] = len(truth)
    return table


def _rating_agreement(rows: Iterable[tuple[VideoScore | None, dict[str, float]]]) -> dict:
    """SRCC/PLCC between model and human scores per dimension, with probabilities and without."""
    columns = defaultdict(lambda: ([], [], []))  # soft, hard, human
    for result, human in rows:
        if result is None or not result.ok:
            continue
        for dim, value in human.items():
            soft = result.overall if dim == "overall" else result.dimensions.get(dim)
            hard = result.hard_overall if dim == "overall" else result.hard_dimensions.get(dim)
            if soft is not None and not math.isnan(soft):
                columns[dim][0].append(soft)
                columns[dim][1].append(hard)
                columns[dim][2].append(value)
    table = {}
    for dim in [*DIMENSIONS, "overall"]:
        if dim in columns and len(columns[dim][2]) >= 2:
            soft, hard, human = columns[dim]
            table[dim] = {"videos": len(human), "srcc": metrics.srcc(soft, human), "plcc": metrics.plcc(soft, human),
                          "srcc_hard": metrics.srcc(hard, human), "plcc_hard": metrics.plcc(hard, human)}
    return table


def _pair_agreement(bench: Benchmark, scores: dict[Key, VideoScore]) -> tuple[dict, dict]:
    """tau, tau_videoalign and diff per label column (and GenAI-Bench's four-way accuracy where pairs
    carry its votes); and the columns left out, with how many pairs and why."""
    rows = defaultdict(lambda: ([], [], [], []))  # scores A, scores B, labels, four-way votes
    unmapped = defaultdict(int)
    for pair in bench.items:
        if pair.dimension in UNMAPPED:
            unmapped[pair.dimension] += 1
            continue
        a, b = scores.get((pair.video_a, pair.prompt)), scores.get((pair.video_b, pair.prompt))
        if a is None or b is None or not (a.ok and b.ok):
            continue
        dim = PAIR_DIMENSIONS.get(pair.dimension, pair.dimension)
        value = (lambda r: r.overall) if dim == "overall" else (lambda r: r.dimensions.get(dim))
        if value(a) is None or value(b) is None:
            continue
        for column, item in zip(rows[pair.dimension], (value(a), value(b), pair.label, pair.vote)):
            column.append(item)
    figures = {}
    for dim, (a, b, labels, votes) in rows.items():
        figures[dim] = metrics.pairwise_accuracy(a, b, labels)
        if None not in votes:
            figures[dim]["arena"] = metrics.arena_accuracy(a, b, votes)
    return figures, {column: {"pairs": n, "reason": UNMAPPED[column]} for column, n in unmapped.items()}


def human_by_video(bench: Benchmark) -> dict[Key, dict[str, float]]:
    """Human scores per (video, prompt), for reports (pairs have none per video)."""
    if bench.kind == "questions":
        prompts = {item.video: item.question.prompt for item in bench.items}
        return {(video, prompts[video]): scores for video, scores in human_scores(bench.items).items()}
    if bench.kind == "ratings":
        return {(item.video, item.prompt): item.human for item in bench.items}
    return {}


def _pair_lines(figures: dict) -> list[str]:
    lines = [f"  {'label column':<13} {'FingER score':<22} {'tau':>7} {'tau(VA)':>8} {'diff':>7} {'epsilon':>8} {'pairs':>6}"]
    for column, row in figures["pairs"].items():
        lines.append(f"  {column:<13} {figures['compared_with'][column]:<22} {row['tau']:7.3f} "
                     f"{row['tau_videoalign']:8.3f} {row['diff']:7.3f} {row['epsilon']:8.4f} {row['pairs']:6d}")
        if "arena" in row:
            arena = row["arena"]
            per_vote = ", ".join(f"{vote} {acc:.3f}" for vote, acc in arena["per_vote"].items())
            lines.append(f"  {'':<13} four-way accuracy (GenAI-Bench) {arena['accuracy']:.3f}; always the most common "
                         f"vote: {arena['majority_baseline']:.3f}; per vote: {per_vote}")
    lines.append("  tau: tie-calibrated accuracy, exact optimum over epsilon; tau(VA): as VideoAlign's calc_accuracy.py "
                 "computes it; diff: accuracy on pairs humans did not tie")
    for column, why in figures.get("unmapped", {}).items():
        lines.append(f"  not compared: {column} ({why['pairs']} pairs): {why['reason']}")
    return lines


def format_table(figures: dict) -> str:
    """The figures in the shape of the paper's tables."""
    lines = [f"{figures['benchmark']} ({figures['kind']}): {figures['note']}"]
    if figures["failed_videos"]:
        lines.append(f"  {len(figures['failed_videos'])} video(s) failed to score and are left out")
    if "pairs" in figures:
        return "\n".join(lines + _pair_lines(figures))
    lines.append(f"  {'dimension':<22} {'Acc':>6} {'SRCC':>7} {'PLCC':>7} {'SRCC w/o':>9} {'PLCC w/o':>9} {'n':>5}")
    for dim, row in figures["dimensions"].items():
        cells = [row.get(k, math.nan) for k in ("acc", "srcc", "plcc", "srcc_hard", "plcc_hard")]
        n = row.get("videos", row.get("questions", 0))
        lines.append(f"  {dim:<22} {cells[0]:6.3f} {cells[1]:7.3f} {cells[2]:7.3f} {cells[3]:9.3f} {cells[4]:9.3f} {n:5d}")
    return "\n".join(lines)
