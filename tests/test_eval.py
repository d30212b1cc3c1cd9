"""`finger-reward eval` end to end on synthetic-world data with the tiny model, and the agreement math."""

import json
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
