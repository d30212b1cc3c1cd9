"""Resumable score-dir as a user runs it: the real CLI in subprocesses, real clips, the tiny random model.

A video is known by its path relative to the video root, so a rerun from another folder with the
root spelled another way skips what is done, retries what failed in place, and never duplicates.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from finger_reward.results import VideoScore
from finger_reward.scorefile import append_result, load_scores, pending, video_key
from finger_reward.synthetic import make_world


def run(*args, cwd, timeout=300):
    return subprocess.run([sys.executable, "-m", "finger_reward.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture()
def world(tmp_path):
    """Six real clips under world/videos, listed with one not-yet-existing video in world/prompts.jsonl."""
    root = tmp_path / "world"
    clips = make_world(root, num_scenes=1, num_frames=8, fps=2.0).clips
    names = [c.path.relative_to(root).as_posix() for c in clips] + ["videos/late.mp4"]
    (root / "prompts.jsonl").write_text("".join(json.dumps({"video": n, "prompt": clips[0].prompt}) + "\n"
                                                for n in names))
    return root, clips


def test_rerun_from_another_folder_skips_retries_and_never_duplicates(world, tiny_model_dir, tmp_path):
    root, clips = world
    out = root / "results.jsonl"
    first = run("score-dir", ".", "--prompts", "prompts.jsonl", "--model", tiny_model_dir, "--out", "results.jsonl",
                cwd=root)
    assert first.returncode == 1, first.stderr  # 1 of 7 failed: over the default 10%
    tail = first.stderr.splitlines()[-3:]
    assert "1 x file not found" in tail[0] and "late.mp4" in tail[0]
    assert "hint" in tail[1] and "VIDEO_DIR" in tail[1]
    assert "6 scored, 1 failed, 0 skipped" in tail[2]
    assert "questions: template generator" in first.stderr
    before = out.read_text()
    assert len(rows(out)) == 7

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    spelled = f"{root}{os.sep}.{os.sep}"  # absolute, and spelled differently
    args = ["score-dir", spelled, "--prompts", root / "prompts.jsonl", "--model", tiny_model_dir, "--out", out]
    kept = run(*args, "--no-retry-failed", cwd=elsewhere)
    assert kept.returncode == 1 and "0 scored, 1 failed, 6 skipped" in kept.stderr, kept.stderr
    assert out.read_text() == before

    tolerant = run(*args, "--no-retry-failed", "--max-failures", "20%", cwd=elsewhere)
    assert tolerant.returncode == 0, tolerant.stderr  # 1 of 7 is under 20%

    shutil.copy(clips[0].path, root / "videos" / "late.mp4")
    again = run(*args, cwd=elsewhere)
    assert again.returncode == 0, again.stderr
    assert "1 scored, 0 failed, 6 skipped" in again.stderr
    after = rows(out)
    assert len(after) == 7 and all(row["error"] is None for row in after)
    assert sorted(row["key"] for row in after) == sorted(json.loads(line)["video"] for line in
                                                         (root / "prompts.jsonl").read_text().splitlines())
    assert [line for line in out.read_text().splitlines()][:6] == [
        line for line in before.splitlines() if "late.mp4" not in line]


def test_every_video_failing_exits_nonzero(world, tiny_model_dir, tmp_path):
    root, _ = world
    empty = tmp_path / "empty"
    empty.mkdir()
    done = run("score-dir", empty, "--prompts", root / "prompts.jsonl", "--model", tiny_model_dir,
               "--out", tmp_path / "r.jsonl", "--max-failures", "100%", cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "7 x file not found" in done.stderr and "0 scored, 7 failed" in done.stderr


def test_sigint_saves_what_was_scored_and_exits_130(world, tiny_model_dir, tmp_path):
    root, clips = world
    prompts = tmp_path / "many.jsonl"
    names = [c.path.relative_to(root).as_posix() for c in clips]
    prompts.write_text("".join(json.dumps({"video": names[i % len(names)], "prompt": f"a red circle number {i}"}) + "\n"
                               for i in range(300)))
    out = tmp_path / "results.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "finger_reward.cli", "score-dir", str(root), "--prompts",
                             str(prompts), "--model", str(tiny_model_dir), "--out", str(out), "--chunk", "1"],
                            cwd=tmp_path, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out.exists() and out.read_text().count("\n") >= 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    saved = len(rows(out))
    assert 2 <= saved < 300
    last = stderr.strip().splitlines()[-1]
    assert last == (f"finger-reward: interrupted: {saved} of 300 saved to {out}; run the same command to resume")
    assert "Traceback" not in stderr


def test_duplicates_collapse_to_the_last_success(tmp_path):
    path = tmp_path / "r.jsonl"
    ok_old = VideoScore("v/a.mp4", "p", 0.25)
    ok_new = VideoScore("/somewhere/else/v/a.mp4", "p", 0.75)
    failed = VideoScore.failed("v/a.mp4", "p", "video v/a.mp4: file not found")
    with path.open("w") as out:
        for result in (ok_old, ok_new, failed):
            append_result(out, result, key="v/a.mp4")
        append_result(out, VideoScore.failed("v/b.mp4", "p", "boom"), key="v/b.mp4")
    done, todo = pending([(str(tmp_path / "v/a.mp4"), "p"), (str(tmp_path / "v/b.mp4"), "p")], path, root=tmp_path)
    assert [r.overall for r in done.values()] == [0.75] and todo == [(str(tmp_path / "v/b.mp4"), "p")]
    kept = rows(path)
    assert [(row["key"], row["overall"]) for row in kept] == [("v/a.mp4", 0.75)]  # b's failure dropped for its retry
    assert list(load_scores(path)) == [("/somewhere/else/v/a.mp4", "p")]


def test_video_key_ignores_the_working_directory_and_the_spelling_of_the_root(tmp_path, monkeypatch):
    (tmp_path / "root" / "sub").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert video_key("root/sub/x.mp4", "root") == "sub/x.mp4"
    assert video_key(str(tmp_path / "root/./sub/x.mp4"), f"{tmp_path}/root/") == "sub/x.mp4"
    (tmp_path / "link").symlink_to(tmp_path / "root")
    assert video_key("link/sub/x.mp4", tmp_path / "root") == "sub/x.mp4"
    assert video_key("/elsewhere/x.mp4", "root") == "/elsewhere/x.mp4"


def test_eval_fails_loudly_without_its_video_root_then_resumes_from_another_folder(world, tiny_model_dir, tmp_path):
    root, clips = world
    data = tmp_path / "data" / "instruct.jsonl"
    data.parent.mkdir()
    lines = [json.loads(line) for line in (root / "instruct.jsonl").read_text().splitlines()][:12]
    for line in lines:
        line["video"] = "videos/" + line["video"].rsplit("/", 1)[-1]  # relative to the world, not the data file
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    scores = tmp_path / "scores.jsonl"
    args = ["eval", "--benchmark", "finger", "--data", data, "--model", tiny_model_dir, "--scores", scores]

    lost = run(*args, cwd=tmp_path)
    assert lost.returncode == 1, lost.stderr
    assert "file not found" in lost.stderr and "--video-root" in lost.stderr and "0 scored" in lost.stderr

    found = run(*args, "--video-root", "world", cwd=tmp_path)
    assert found.returncode == 0, found.stderr
    videos = len({line["video"] for line in lines})
    assert f"{videos} scored, 0 failed, 0 skipped" in found.stderr
    assert len(rows(scores)) == videos  # the failed rows were replaced, not added to

    again = run(*args, "--video-root", f"{root}{os.sep}", cwd=root / "videos")
    assert again.returncode == 0 and f"0 scored, 0 failed, {videos} skipped" in again.stderr, again.stderr
    assert len(rows(scores)) == videos
