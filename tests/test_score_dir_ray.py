"""`finger-reward score-dir --ray`: Ray Data with 2 CPU workers on a real local Ray, tiny model, synthetic clips."""

import functools
import json
import logging
import subprocess
import sys

import pytest

from finger_reward import FingerReward
from finger_reward.cli import main
from finger_reward.errors import FingerError
from finger_reward.offline import _pool_size, score_on_ray
from finger_reward.synthetic import make_world

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context"),  # Ray Data copying its own settings
]

TOL = 1e-5


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Six synthetic clips, a corrupt one and a missing one, listed in a prompts JSONL relative to the root."""
    root = tmp_path_factory.mktemp("world")
    world = make_world(root, num_scenes=1)
    (root / "videos" / "junk.mp4").write_bytes(bytes(range(256)) * 20)
    prompt = world.clips[0].prompt
    names = [c.path.relative_to(root).as_posix() for c in world.clips] + ["videos/junk.mp4", "videos/missing.mp4"]
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"video": name, "prompt": prompt}) + "\n" for name in names))
    return world, root, prompts


def score_dir(world, tiny_model_dir, out, *extra):
    _, root, prompts = world
    return main(["score-dir", str(root), "--prompts", str(prompts), "--questions", str(world[0].bank_path),
                 "--model", str(tiny_model_dir), "--out", str(out), "--chunk", "2", *map(str, extra)])


def rows_by_video(path):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    by_video = {row["video"]: row for row in rows}
    assert len(by_video) == len(rows), "a video was written twice"
    return by_video


@pytest.fixture(scope="module")
def single(world, tiny_model_dir, tmp_path_factory):
    """The single-process score-dir results file (before the module's Ray starts)."""
    out = tmp_path_factory.mktemp("single") / "results.jsonl"
    assert score_dir(world, tiny_model_dir, out) == 1  # the corrupt and the missing video fail
    return out


@pytest.fixture(scope="module")
def ray_cluster(single):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def assert_same_scores(got, want):
    assert got["prompt"] == want["prompt"]
    if want["error"] is not None:
        assert got["error"] == want["error"] and got["overall"] is None
        return
    assert got["error"] is None
    assert got["overall"] == pytest.approx(want["overall"], abs=TOL)
    assert got["hard_overall"] == pytest.approx(want["hard_overall"], abs=TOL)
    assert got["dimensions"] == pytest.approx(want["dimensions"], abs=TOL)
    assert [q["question"] for q in got["questions"]] == [q["question"] for q in want["questions"]]
    for q, w in zip(got["questions"], want["questions"]):
        assert (q["p_yes"], q["p_no"], q["score"]) == pytest.approx((w["p_yes"], w["p_no"], w["score"]), abs=TOL)


def test_import_does_not_import_ray():
    code = "import sys, finger_reward.offline, finger_reward.cli; assert 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_pool_size(caplog):
    assert _pool_size({"CPU": 16, "GPU": 4}, None, None) == (4, 1.0)
    assert _pool_size({"CPU": 16, "GPU": 4}, None, 2) == (2, 2)
    assert _pool_size({"CPU": 16, "GPU": 4}, 3, 0.5) == (3, 0.5)
    assert _pool_size({"CPU": 2}, None, None) == (1, 0.0)
    assert _pool_size({"CPU": 2}, 2, None) == (2, 0.0)
    assert _pool_size({"GPU": 4}, 3, 2) == (3, 2)  # an autoscaling cluster may add GPUs
    assert "need 6 GPUs but the Ray cluster has 4 now" in caplog.text
    with pytest.raises(FingerError, match="workers >= 1"):
        _pool_size({"GPU": 4}, 0, None)


def test_ray_options_need_ray(world, tiny_model_dir, tmp_path, capsys):
    assert score_dir(world, tiny_model_dir, tmp_path / "r.jsonl", "--workers", "2") == 2
    assert "--workers is an option of --ray" in capsys.readouterr().err
    assert not (tmp_path / "r.jsonl").exists()


def test_ray_equals_single_process(ray_cluster, world, tiny_model_dir, single, tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    assert score_dir(world, tiny_model_dir, out, "--ray", "--workers", 2) == 1
    err = capsys.readouterr().err
    total = len(world[0].clips) + 2
    assert f"scoring {total} video(s) on 2 Ray worker(s)" in err and f"{total} video(s) scored by 2 worker(s)" in err
    assert f"{total - 2} scored, 2 failed, 0 skipped (already scored) of {total} video(s)" in err
    got, want = rows_by_video(out), rows_by_video(single)
    assert set(got) == set(want) and len(got) == total
    for video, row in want.items():
        assert_same_scores(got[video], row)
    failed = sorted(video.rsplit("/", 1)[-1] for video, row in got.items() if row["error"])
    assert failed == ["junk.mp4", "missing.mp4"]
    assert "missing.mp4" in got[next(v for v in got if v.endswith("missing.mp4"))]["error"]


def test_resume_scores_only_the_rest(ray_cluster, world, tiny_model_dir, single, tmp_path, caplog):
    """A file a killed run left (3 results, a cut-off 4th line) is completed; what it held is not scored again."""
    caplog.set_level(logging.INFO, logger="finger_reward.offline")
    lines = single.read_text().splitlines()
    kept = [json.loads(line) for line in lines[:3]]
    kept[0]["overall"] = 0.123456  # a mark: rescoring this video would overwrite or duplicate it
    out = tmp_path / "results.jsonl"
    out.write_text("".join(json.dumps(row) + "\n" for row in kept) + lines[3][:30])
    before = out.read_text().splitlines()[:3]
    want = rows_by_video(single)
    keys = [(video, row["prompt"]) for video, row in want.items()]
    load = functools.partial(FingerReward.from_pretrained, str(tiny_model_dir), questions=world[0].bank_path)

    results = score_on_ray(keys, out, load, workers=2, batch_size=2)
    assert f"scoring {len(keys) - 3} video(s) on 2 Ray worker(s)" in caplog.text
    assert "unfinished last line" in caplog.text
    after = out.read_text().splitlines()
    assert after[:3] == before and len(after) == len(keys)
    got = rows_by_video(out)
    assert got[kept[0]["video"]]["overall"] == 0.123456
    for video, row in want.items():
        if video != kept[0]["video"]:
            assert_same_scores(got[video], row)
    assert set(results) == set(keys) and results[keys[0]].overall == 0.123456

    caplog.clear()
    # A rerun retries only the failed rows (the junk and the missing video), in place: one row per video.
    failed = sum(row["error"] is not None for row in want.values())
    assert set(score_on_ray(keys, out, load, workers=2)) == set(keys)
    assert f"scoring {failed} video(s) on 2 Ray worker(s)" in caplog.text
    again = out.read_text().splitlines()
    assert len(again) == len(keys) and [line for line in again if line in after[:3]] == after[:3]


def test_a_model_that_cannot_load_is_a_clear_error(ray_cluster, world, tmp_path):
    keys = [(str(world[0].clips[0].path), world[0].clips[0].prompt)]
    load = functools.partial(FingerReward.from_pretrained, str(tmp_path / "no-model"))
    with pytest.raises(FingerError, match=r"stopped after 0 of 1 video\(s\).*no-model"):
        score_on_ray(keys, tmp_path / "r.jsonl", load, workers=1, start_timeout_s=120)
    assert (tmp_path / "r.jsonl").read_text() == ""
