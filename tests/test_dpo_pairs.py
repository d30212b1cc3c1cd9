"""DPO pair selection: pure strategies on hand-made scores; the full loop on a real tiny Wan and tiny FingER."""

import json
import math

import pytest

from finger_reward import FingerReward
from finger_reward.dpo_pairs import STRATEGIES, select_dpo_pairs, select_pairs
from finger_reward.results import VideoScore
from finger_reward.tiny_wan import build_tiny_wan_pipeline
from finger_reward.video import load_video

CALL = dict(num_frames=5, height=32, width=32, num_inference_steps=2, guidance_scale=1.0, max_sequence_length=16)
PROMPTS = ["a red circle moves left", "a blue square moves up", "a green star flies across the sky"]


def vs(overall, **dims):
    return VideoScore(video="v.mp4", prompt="p", overall=overall, dimensions=dims)


FAILED = VideoScore.failed("bad.mp4", "p", "could not decode")


# ---- pure strategies ------------------------------------------------------------------------------


def test_best_worst_takes_top_and_bottom():
    assert select_pairs([vs(0.5), vs(0.9), vs(0.1), vs(0.7)]) == [(1, 2)]


def test_margin_filters_pairs():
    scores = [vs(0.5), vs(0.75), vs(0.625)]  # exact in binary: the gap is exactly 0.25
    assert select_pairs(scores, margin=0.2) == [(1, 0)]
    assert select_pairs(scores, margin=0.25) == []  # the gap must exceed the margin
    assert select_pairs([vs(0.5), vs(0.5)]) == []  # equal scores are no preference


def test_all_pairs_counts_every_ordered_gap_above_margin():
    scores = [vs(0.1), vs(0.4), vs(0.2), vs(0.8)]
    assert len(select_pairs(scores, "all_pairs")) == 6  # 4 choose 2, all distinct
    pairs = select_pairs(scores, "all_pairs", margin=0.15)
    assert sorted(pairs) == [(1, 0), (1, 2), (3, 0), (3, 1), (3, 2)]
    assert all(scores[c].overall > scores[r].overall for c, r in pairs)


def test_round_robin_default_compare_matches_scores():
    assert select_pairs([vs(0.3), vs(0.9), vs(0.1)], "round_robin") == [(1, 2)]
    assert select_pairs([vs(0.30), vs(0.31)], "round_robin", margin=0.05) == []  # a tie: no winner


def test_round_robin_custom_compare_counts_wins():
    # compare prefers the shorter video name, whatever the scores: most wins vs fewest wins (Eq. 8)
    scores = [VideoScore(video=name, prompt="p", overall=s) for name, s in (("bbb", 0.9), ("a", 0.1), ("cccc", 0.5))]
    calls = []

    def shorter(a, b):
        calls.append((a.video, b.video))
        return (len(a.video) < len(b.video)) - (len(a.video) > len(b.video))

    assert select_pairs(scores, "round_robin", compare=shorter) == [(1, 2)]
    assert len(calls) == 3  # N choose 2 comparisons
    assert select_pairs(scores, "round_robin", compare=lambda a, b: 0) == []  # all tied: no pair
    with pytest.raises(ValueError, match="compare must return"):
        select_pairs(scores, "round_robin", compare=lambda a, b: 0.5)


def test_per_dimension_selection():
    scores = [vs(0.9, temporal_consistency=0.2), vs(0.1, temporal_consistency=0.8),
              vs(0.5, temporal_consistency=0.5), vs(0.95)]  # the last has no temporal question
    assert select_pairs(scores, dimension="temporal_consistency") == [(1, 0)]
    assert select_pairs(scores) == [(3, 1)]
    assert len(select_pairs(scores, "all_pairs", dimension="temporal_consistency")) == 3
    with pytest.raises(ValueError, match="temporal_consistency"):
        select_pairs(scores, dimension="motion")


def test_failed_candidates_never_paired():
    nan = vs(math.nan)
    scores = [FAILED, vs(0.4), nan, vs(0.6)]
    for strategy in STRATEGIES:
        assert {i for pair in select_pairs(scores, strategy) for i in pair} <= {1, 3}, strategy
    assert select_pairs([FAILED, vs(0.4), nan]) == []


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="best_worst, all_pairs, round_robin"):
        select_pairs([vs(0.1)], "tournament")
    with pytest.raises(ValueError, match="margin"):
        select_pairs([vs(0.1)], margin=-1)
    with pytest.raises(ValueError, match="round_robin"):
        select_pairs([vs(0.1)], "all_pairs", compare=lambda a, b: 0)


# ---- the loop on real tiny models ----------------------------------------------------------------


class CountingPipeline:
    """The real pipeline, counting its calls (a wrapper, not a mock)."""

    def __init__(self, pipe):
        from finger_reward.integrations.diffusers import pipeline_fps

        self.pipe, self.prompts = pipe, []
        self.config = {"fps": pipeline_fps(pipe)}  # a wrapper states the wrapped pipeline's rate in its config

    def __call__(self, prompt, **kwargs):
        self.prompts.append(prompt)
        return self.pipe(prompt, **kwargs)


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_wan_pipeline(seed=0)


@pytest.fixture(scope="module")
def reward(tiny_model_dir):
    return FingerReward.from_pretrained(tiny_model_dir)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def run(pipe, reward, out, prompts, **options):
    return select_dpo_pairs(pipe, prompts, reward, out, num_candidates=3, strategy="all_pairs",
                            pipeline_kwargs=CALL, seed=7, progress=False, **options)


def test_select_dpo_pairs_writes_scores_and_resumes(pipe, reward, tmp_path):
    first = run(pipe, reward, tmp_path / "a", PROMPTS[:2])
    pairs = read_jsonl(first)
    assert pairs and {p["prompt"] for p in pairs} <= set(PROMPTS[:2])
    assert len(list((tmp_path / "a" / "videos").rglob("*.mp4"))) == 6
    assert (tmp_path / "a" / "videos" / "1" / "9.mp4").exists()  # prompt index 1, seed 7 + 2
    for p in pairs:
        assert p["chosen_score"] >= p["rejected_score"]
        assert {p["chosen_seed"], p["rejected_seed"]} <= {7, 8, 9} and p["strategy"] == "all_pairs"
    # the recorded scores are those of the written files
    files = sorted({(p["prompt"], p[side]) for p in pairs for side in ("chosen", "rejected")})
    fresh = reward.score([str(tmp_path / "a" / f) for _, f in files], [prompt for prompt, _ in files])
    recorded = {(p["prompt"], p[side]): (p[f"{side}_score"], p[f"{side}_dimensions"])
                for p in pairs for side in ("chosen", "rejected")}
    for key, score in zip(files, fresh):
        assert load_video(str(tmp_path / "a" / key[1])).frames.shape[0] >= 1
        overall, dims = recorded[key]
        assert overall == pytest.approx(score.overall, abs=1e-5)
        assert dims == pytest.approx(score.dimensions, abs=1e-5)

    # deterministic for a seed: a fresh directory gets the same file
    second = run(pipe, reward, tmp_path / "b", PROMPTS[:2])
    assert second.read_text() == first.read_text()

    # resumable: one more prompt generates only its own candidates
    counting = CountingPipeline(pipe)
    run(counting, reward, tmp_path / "b", PROMPTS)
    assert counting.prompts == [PROMPTS[2]] * 3
    lines = read_jsonl(second)
    assert lines[: len(pairs)] == pairs and {p["prompt"] for p in lines[len(pairs):]} <= {PROMPTS[2]}
    with pytest.raises(ValueError, match="other settings"):
        run(counting, reward, tmp_path / "b", PROMPTS, margin=0.5)


def test_prompt_without_pair_is_recorded_and_skipped(pipe, reward, tmp_path):
    counting = CountingPipeline(pipe)
    run(counting, reward, tmp_path, PROMPTS[:1], margin=1.0)  # no gap exceeds 1: no pair
    assert not (tmp_path / "pairs.jsonl").exists() or not read_jsonl(tmp_path / "pairs.jsonl")
    (done,) = read_jsonl(tmp_path / "done.jsonl")
    assert done["prompt"] == PROMPTS[0] and [c["seed"] for c in done["candidates"]] == [7, 8, 9]
    run(counting, reward, tmp_path, PROMPTS[:1], margin=1.0)
    assert len(counting.prompts) == 3


def test_select_pairs_cli(tiny_model_dir, tmp_path):
    import json
    import subprocess
    import sys

    from finger_reward.tiny_wan import make_tiny_wan_pipeline

    pipeline_dir = make_tiny_wan_pipeline(tmp_path / "wan")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red kite flies over a hill\n")
    args = [sys.executable, "-m", "finger_reward.cli", "select-pairs", "--pipeline", str(pipeline_dir), "--prompts",
            str(prompts), "--num-candidates", "2", "--out", str(tmp_path / "out"), "--model", str(tiny_model_dir),
            "--num-frames", "5", "--height", "32", "--width", "32", "--steps", "2"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = tmp_path / "out"
    lines = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()] if (out / "pairs.jsonl").exists() else []
    done_lines = (out / "done.jsonl").read_text().splitlines() if (out / "done.jsonl").exists() else []
    assert len(lines) + len(done_lines) == 1
    for line in lines:
        assert line["chosen_score"] >= line["rejected_score"]
    both = subprocess.run([*args[:-8], "--model", str(tiny_model_dir), "--reward-url", "http://127.0.0.1:9"],
                          capture_output=True, text=True, timeout=120)
    assert both.returncode == 2 and "exactly one of --reward-url" in both.stderr


def test_select_pairs_cli_through_a_service_with_a_token(tiny_model_dir, tmp_path):
    import subprocess
    import sys

    from finger_reward import FingerReward
    from finger_reward.serve import ServeConfig
    from finger_reward.serve.local import LocalServer
    from finger_reward.tiny_wan import make_tiny_wan_pipeline

    pipeline_dir = make_tiny_wan_pipeline(tmp_path / "wan")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red kite flies over a hill\n")
    with LocalServer(FingerReward.from_pretrained(tiny_model_dir), ServeConfig(port=0, token="t0k")) as server:
        args = [sys.executable, "-m", "finger_reward.cli", "select-pairs", "--pipeline", str(pipeline_dir),
                "--prompts", str(prompts), "--num-candidates", "2", "--out", str(tmp_path / "out"),
                "--reward-url", server.url, "--num-frames", "5", "--height", "32", "--width", "32", "--steps", "2"]
        refused = subprocess.run(args, capture_output=True, text=True, timeout=300)
        assert refused.returncode != 0 and "401" in refused.stderr
        done = subprocess.run([*args, "--reward-token", "t0k"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "out" / "pairs.jsonl").exists() or (tmp_path / "out" / "done.jsonl").exists()
