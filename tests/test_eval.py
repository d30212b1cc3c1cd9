"""`finger-reward eval` end to end on synthetic-world data with the tiny model, and the agreement math."""

import json
from pathlib import Path
import subprocess
import sys

import pytest

from finger_reward import FingerReward, metrics
from finger_reward.evaluation import evaluate as ev
from finger_reward.evaluation.loaders import load_benchmark
from finger_reward.questions import DIMENSIONS
from finger_reward.synthetic import make_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"), num_scenes=2)


@pytest.fixture(scope="module")
def pairs_file(world, tmp_path_factory):
    """MonetBench-style pairs: each scene's clean clip against each of its defective clips."""
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    clean = {c.prompt: c for c in world.clips if c.defect is None}
    lines = []
    for clip in world.clips:
        if clip.defect is not None:
            first, answer = (clip, "video2") if len(lines) % 2 else (clean[clip.prompt], "video1")
            second = clean[clip.prompt] if first is clip else clip
            lines.append({"prompt": clip.prompt, "video1_path": str(first.path), "video2_path": str(second.path),
                          "standard_answer": answer})
    lines.append({**lines[0], "standard_answer": "tie"})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def run(*args):
    return subprocess.run([sys.executable, "-m", "finger_reward.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=600)


def test_eval_finger_end_to_end_and_resume(world, tiny_model_dir, tmp_path):
    out, report = tmp_path / "results.json", tmp_path / "report.html"
    done = run("eval", "--benchmark", "finger", "--data", world.instruct_path, "--model", tiny_model_dir,
               "--out", out, "--report", report)
    assert done.returncode == 0, done.stderr
    figures = json.loads(out.read_text())
    assert figures["benchmark"] == "finger-test" and figures["failed_videos"] == []
    table = figures["dimensions"]
    assert set(table) == {*DIMENSIONS, "overall"}
    assert all(0 <= row["acc"] <= 1 for row in table.values())
    assert "NaN" not in out.read_text()  # strict JSON: undefined correlations are null
    assert table["overall"]["questions"] == sum(1 for _ in open(world.instruct_path))
    assert "SRCC" in done.stdout and "visual_quality" in done.stdout
    scores = out.with_suffix(".scores.jsonl")
    assert len(scores.read_text().splitlines()) == len(world.clips)
    assert report.read_text().count('class="card"') == len(world.clips)

    again = run("eval", "--benchmark", "finger", "--data", world.instruct_path, "--model", tiny_model_dir, "--out", out)
    assert again.returncode == 0, again.stderr
    assert len(scores.read_text().splitlines()) == len(world.clips)  # resumed: nothing scored twice
    assert json.loads(out.read_text())["dimensions"] == table


def test_question_agreement_matches_direct_computation(world, tiny_model_dir, tmp_path):
    bench = load_benchmark("finger", world.instruct_path)
    reward = FingerReward.from_pretrained(tiny_model_dir, questions=ev.benchmark_bank(bench))
    scores = ev.score_benchmark(reward, bench, tmp_path / "s.jsonl")
    figures = ev.agreement(bench, scores)
    predicted, truth = [], []
    for item in bench.items:
        result = scores[(item.video, item.question.prompt)]
        predicted.append(next(q.answer for q in result.questions if q.question == item.question.question))
        truth.append(item.answer)
    assert figures["dimensions"]["overall"]["acc"] == pytest.approx(metrics.answer_accuracy(predicted, truth))
    human = ev.human_by_video(bench)
    keys = sorted(human)
    model_overall = [scores[k].overall for k in keys]
    human_overall = [human[k]["overall"] for k in keys]
    assert figures["dimensions"]["overall"]["srcc"] == pytest.approx(metrics.srcc(model_overall, human_overall))


def test_eval_pairs_and_a_missing_video(world, pairs_file, tiny_model_dir, tmp_path):
    lines = pairs_file.read_text().splitlines()
    broken = tmp_path / "pairs.jsonl"
    missing = {**json.loads(lines[0]), "video2_path": str(tmp_path / "gone.mp4")}
    broken.write_text("\n".join([*lines, json.dumps(missing)]) + "\n")
    out = tmp_path / "pairs.json"
    done = run("eval", "--benchmark", "monetbench", "--data", broken, "--model", tiny_model_dir, "--out", out)
    assert done.returncode == 0, done.stderr
    figures = json.loads(out.read_text())
    overall = figures["pairs"]["overall"]
    assert overall["pairs"] == len(lines) and overall["ties"] == 1  # the pair with a missing video is left out
    assert 0 <= overall["tau"] <= 1 and 0 <= overall["diff"] <= 1
    assert figures["failed_videos"] == [str(tmp_path / "gone.mp4")]
    assert "tau" in done.stdout and "1 video(s) failed" in done.stdout


# ---- the published pair layouts, scored by hand-made results ----------------------------------------------

FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"


def _scores_for(bench, value):
    """A VideoScore per (video, prompt) of the benchmark: overall and every dimension = value(video)."""
    from finger_reward.results import VideoScore

    return {key: VideoScore(key[0], key[1], value(key[0]), {d: value(key[0]) for d in DIMENSIONS})
            for key in ev.benchmark_videos(bench)}


def test_videogen_rewardbench_lists_mq_as_unmapped_and_names_what_each_column_is_compared_with():
    bench = load_benchmark("videogen-rewardbench", FIXTURES / "videogen-rewardbench.csv")
    mq = sum(pair.dimension == "MQ" for pair in bench.items)
    figures = ev.agreement(bench, _scores_for(bench, lambda video: len(video) / 100))
    assert set(figures["pairs"]) == {"overall", "VQ", "TA"} and mq > 0
    assert figures["unmapped"] == {"MQ": {"pairs": mq, "reason": ev.UNMAPPED["MQ"]}}
    assert figures["compared_with"] == {"overall": "overall", "VQ": "visual_quality", "TA": "text_alignment"}
    for row in figures["pairs"].values():
        assert {"tau", "tau_videoalign", "diff"} <= set(row) and "arena" not in row
    table = ev.format_table(figures)
    assert f"not compared: MQ ({mq} pairs)" in table and "tau(VA)" in table and "visual_quality" in table


def test_genai_bench_arena_reports_the_four_way_accuracy_beside_tau():
    bench = load_benchmark("genai", FIXTURES / "genai_bench_video_pairs.jsonl",
                           video_map={"left_003.mp4": "/videos/left_003.mp4"})
    # left videos score 0.8, right ones 0.3, except the tie row (both 0.5) and the both-bad row (both 0.1).
    by_name = {"left_000": 0.8, "right_000": 0.3, "left_001": 0.3, "right_001": 0.8, "left_002": 0.5,
               "right_002": 0.5, "left_003": 0.1, "right_003": 0.1}
    figures = ev.agreement(bench, _scores_for(bench, lambda video: by_name[Path(video).stem]))
    overall = figures["pairs"]["overall"]
    assert overall["tau"] == 1.0 and overall["arena"]["accuracy"] == 1.0
    assert overall["arena"]["per_vote"] == {v: 1.0 for v in ("leftvote", "rightvote", "tievote", "bothbad_vote")}
    assert overall["arena"]["majority_baseline"] == 0.25
    assert figures["unmapped"] == {}
    assert "four-way accuracy (GenAI-Bench) 1.000" in ev.format_table(figures)


def test_eval_genai_arena_with_url_videos_through_a_video_map(pairs_file, tiny_model_dir, tmp_path):
    """GenAI-Bench arena rows naming videos by URL: refused with the fix, then scored through --video-map;
    the JSON and the HTML report carry tau, tau_videoalign and the four-way accuracy."""
    rows = [json.loads(line) for line in pairs_file.read_text().splitlines()][:4]
    votes = ["leftvote", "rightvote", "tievote", "bothbad_vote"]
    arena = tmp_path / "arena.jsonl"
    arena.write_text("".join(json.dumps({"prompt": r["prompt"], "left_video": f"https://example.org/v/{i}_l.mp4",
                                         "right_video": f"https://example.org/v/{i}_r.mp4", "vote_type": vote}) + "\n"
                             for i, (r, vote) in enumerate(zip(rows, votes))))
    video_map = tmp_path / "map.json"
    video_map.write_text(json.dumps({**{f"{i}_l.mp4": r["video1_path"] for i, r in enumerate(rows)},
                                     **{f"{i}_r.mp4": r["video2_path"] for i, r in enumerate(rows)}}))
    refused = run("eval", "--benchmark", "genai", "--data", arena, "--model", tiny_model_dir)
    assert refused.returncode != 0 and "is a URL" in refused.stderr and "--video-map" in refused.stderr
    out, report = tmp_path / "arena.json", tmp_path / "arena.html"
    done = run("eval", "--benchmark", "genai", "--data", arena, "--video-map", video_map, "--model", tiny_model_dir,
               "--out", out, "--report", report)
    assert done.returncode == 0, done.stderr
    overall = json.loads(out.read_text())["pairs"]["overall"]
    assert overall["pairs"] == 4 and {"tau", "tau_videoalign", "diff", "arena"} <= set(overall)
    assert set(overall["arena"]["per_vote"]) == set(votes) and overall["arena"]["majority_baseline"] == 0.25
    assert "four-way accuracy (GenAI-Bench)" in done.stdout and "tau(VA)" in report.read_text()
