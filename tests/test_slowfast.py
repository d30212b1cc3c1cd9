"""Q-Save SlowFast sampling: frame classification, pathways from real .mp4 files, token counts, scoring."""

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from finger_reward import FingerReward, Question, QuestionBank
from finger_reward.cli import main
from finger_reward.engine import TransformersEngine
from finger_reward import pretrained
from finger_reward.engine.inputs import patch_factor, processor_inputs
from finger_reward.errors import FingerError
from finger_reward.instruct import InstructRecord, VideoSFTCollator
from finger_reward.prompts import build_messages, expand_video, split_prompt
from finger_reward.serve import FingerRewardClient, ServeConfig
from finger_reward.serve.local import LocalServer
from finger_reward.synthetic import Scene, render, write_video
from finger_reward.video import FAST, SLOW, SlowFast, classify_frames, load_video, patch_similarity
from tests.serve_checks import assert_same

PROMPT = "a red circle moves from left to right on a dark background"
QUESTIONS = [
    Question(PROMPT, "text_alignment", "red circle", "Is the circle red?", True),
    Question(PROMPT, "dynamic_degree", "red circle", "Does the red circle stay still?", False),
    Question(PROMPT, "visual_quality", "video", "Is the video sharp and clean?", True),
    Question(PROMPT, "factual_consistency", "red circle", "Does the circle jump to another place?", False),
]
TEXTS = [q.question for q in QUESTIONS]
H, W = 224, 336  # 8 x 12 patches of 28 pixels: a quarter of the pixels is 112 x 168, also whole patches


def strip(patches: int, value: int = 0) -> torch.Tensor:
    """One uint8 frame (3, 28, 28 * patches): a row of `patches` patches of 28 x 28 pixels."""
    return torch.full((3, 28, 28 * patches), value, dtype=torch.uint8)


def changed(frame: torch.Tensor, patches: list[int], value: int = 255) -> torch.Tensor:
    out = frame.clone()
    for k in patches:
        out[:, :, 28 * k : 28 * (k + 1)] = value
    return out


# ---- patch similarity and classify_frames on hand-built frames -----------------------------------


def test_similarity_definition():
    frame = torch.randint(0, 256, (3, 56, 84), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    assert patch_similarity(frame, frame) == 1.0  # identical frames
    assert patch_similarity(frame, 255 - frame) == 0.0  # every patch changed
    base = strip(10)
    assert patch_similarity(base, changed(base, [3])) == 0.9  # exactly one patch of ten
    assert patch_similarity(base, changed(base, [3])) == patch_similarity(changed(base, [3]), base)
    assert patch_similarity(base, changed(base, [0, 1, 2, 3])) == pytest.approx(0.6)
    # Codec-like noise of +-4 levels leaves every patch unchanged; a tolerance of 0 counts it.
    noise = torch.randint(-4, 5, base.shape, generator=torch.Generator().manual_seed(1))
    noisy = (base.int() + 100 + noise).clamp(0, 255).to(torch.uint8)
    flat = torch.full_like(base, 100)
    assert patch_similarity(flat, noisy) == 1.0
    assert patch_similarity(flat, noisy, tolerance=0.0) == 0.0
    # Edge patches are smaller, not dropped: a 30-pixel-wide frame has two 28-pixel columns of patches.
    odd = torch.zeros(3, 28, 30, dtype=torch.uint8)
    odd_changed = odd.clone()
    odd_changed[:, :, 28:] = 255
    assert patch_similarity(odd, odd_changed) == 0.5
    with pytest.raises(ValueError, match="one size"):
        patch_similarity(base, strip(9))
    with pytest.raises(ValueError, match="patch=0"):
        patch_similarity(base, base, patch=0)


def test_static_clip_is_one_slow_frame_then_all_fast():
    frames = torch.randint(0, 256, (1, 3, 56, 84), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    assert classify_frames(frames.repeat(7, 1, 1, 1)) == [SLOW] + [FAST] * 6
    assert classify_frames(frames) == [SLOW]


def test_scene_cut_starts_a_new_slow_frame():
    a, b = strip(10, 40), strip(10, 200)
    b5 = changed(b, [5])
    frames = torch.stack([a, a, a, b, b, b5, b5, b])
    # One changed patch of ten is 0.9 similarity: not above 0.9, so b5 is slow at the paper's threshold,
    # and so is going back to b afterwards.
    assert classify_frames(frames) == [SLOW, FAST, FAST, SLOW, FAST, SLOW, FAST, SLOW]


def test_frames_are_compared_with_the_latest_slow_frame_not_the_previous_one():
    base = strip(10)
    # Each frame changes one more patch: 0.9 similar to the previous frame, drifting from the slow one.
    drift = torch.stack([changed(base, list(range(k))) for k in range(5)])
    assert classify_frames(drift, threshold=0.85) == [SLOW, FAST, SLOW, FAST, SLOW]
    assert classify_frames(drift, threshold=0.75) == [SLOW, FAST, FAST, SLOW, FAST]


def test_threshold_edges():
    base = strip(10)
    one_of_ten = torch.stack([base, changed(base, [7])])
    assert classify_frames(one_of_ten, threshold=0.9) == [SLOW, SLOW]  # 0.9 does not exceed 0.9
    assert classify_frames(one_of_ten, threshold=0.89) == [SLOW, FAST]
    identical = torch.stack([base, base, base])
    assert classify_frames(identical, threshold=1.0) == [SLOW] * 3  # nothing exceeds 1: plain sampling
    assert classify_frames(identical, threshold=0.0) == [SLOW, FAST, FAST]
    all_changed = torch.stack([base, changed(base, list(range(10)))])
    assert classify_frames(all_changed, threshold=0.0) == [SLOW, SLOW]  # similarity 0 does not exceed 0
    with pytest.raises(ValueError, match=r"\(T, C, H, W\) with T >= 1"):
        classify_frames(torch.zeros(0, 3, 28, 28, dtype=torch.uint8))


# ---- load_video on real .mp4 files --------------------------------------------------------------


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Real H.264 files at 8 fps: a scene cut at 1 s, a frozen clip, a teleport at frame 8."""
    root = tmp_path_factory.mktemp("slowfast")
    red, blue = Scene("red", "circle", "left to right"), Scene("blue", "square", "top to bottom")
    size = dict(height=H, width=W)
    cut = np.concatenate([render(red, "frozen", num_frames=8, **size), render(blue, "frozen", num_frames=8, **size)])
    return {
        "cut": write_video(cut, root / "cut.mp4", fps=8),
        "frozen": write_video(render(red, "frozen", num_frames=14, **size), root / "frozen.mp4", fps=8),
        "teleport": write_video(render(red, "teleport", num_frames=16, **size), root / "teleport.mp4", fps=8),
    }


def test_load_video_splits_a_scene_cut_into_pathways(videos):
    clip = load_video(videos["cut"], fps=4.0, max_pixels=H * W, slowfast=SlowFast())
    plain = load_video(videos["cut"], fps=4.0, max_pixels=H * W)
    torch.testing.assert_close(clip.frames, plain.frames)  # every sampled frame, at full resolution
    assert clip.fps == plain.fps == 4.0 and clip.frames.shape == (8, 3, H, W)
    slow, fast = clip.pathways
    assert (slow.kind, slow.indices, fast.kind, fast.indices) == (SLOW, (0, 4), FAST, (1, 2, 3, 5, 6, 7))
    assert clip.timestamps(slow) == [0.0, 1.0]  # the cut is at 1 s
    assert clip.timestamps(fast) == [0.25, 0.5, 0.75, 1.25, 1.5, 1.75]
    torch.testing.assert_close(slow.frames, clip.frames[[0, 4]])
    assert fast.frames.shape == (6, 3, H // 2, W // 2)  # a quarter of the pixels by default
    # The fast frames show the same picture, smaller.
    small = torch.nn.functional.interpolate(clip.frames[list(fast.indices)].float(), size=(H // 2, W // 2),
                                            mode="bilinear", antialias=True)
    assert (small - fast.frames.float()).abs().mean() < 3
    videos_given = [(frames.shape, meta["frames_indices"], meta["total_num_frames"]) for frames, meta in clip.videos]
    assert videos_given == [(slow.frames.shape, [0, 4], 8), (fast.frames.shape, [1, 2, 3, 5, 6, 7], 8)]


@pytest.mark.parametrize("pixels, factor", [(H * W, 28), (150_000, 28), (100_000, 32)])
def test_pathway_sizes_are_multiples_of_the_patch_factor(videos, pixels, factor):
    fast_pixels = 20_000
    clip = load_video(videos["teleport"], fps=8.0, max_pixels=pixels, patch_factor=factor,
                      slowfast=SlowFast(fast_max_pixels=fast_pixels))
    slow, fast = clip.pathways
    for pathway, budget in ((slow, pixels), (fast, fast_pixels)):
        h, w = pathway.frames.shape[2:]
        assert h % factor == 0 and w % factor == 0 and h * w <= budget, (h, w, budget)
    assert sorted(slow.indices + fast.indices) == list(range(16))
    assert 8 in slow.indices  # the teleport
    assert slow.frames.shape[2:] == clip.frames.shape[2:]


def test_a_frozen_clip_is_one_slow_frame(videos):
    clip = load_video(videos["frozen"], fps=8.0, max_pixels=H * W, slowfast=SlowFast())
    slow, fast = clip.pathways
    assert slow.indices == (0,) and fast.indices == tuple(range(1, 14))
    everything_slow = load_video(videos["frozen"], fps=8.0, max_pixels=H * W, slowfast=SlowFast(threshold=1.0))
    assert [p.kind for p in everything_slow.pathways] == [SLOW]
    assert everything_slow.token_counts()[0] == everything_slow.token_counts()[1]


# ---- the prompt layout and the token counts the processor really makes ---------------------------


def test_prompt_layout(tiny_model_and_processor, videos):
    _, processor = tiny_model_and_processor
    clip = load_video(videos["cut"], fps=4.0, max_pixels=H * W, slowfast=SlowFast())
    rendered = processor.apply_chat_template(build_messages("Is it red?", "answer"), tokenize=False,
                                             add_generation_prompt=True)
    expanded = expand_video(rendered, processor, clip)
    block = "<|vision_start|><|video_pad|><|vision_end|>"
    assert (f"Slow frames at 0.0s, 1.0s:{block}\nFast frames at 0.25s, 0.5s, 0.75s, 1.25s, 1.5s, 1.75s:{block}"
            "Is it red?") in expanded
    # The same text as rendering the SlowFast messages directly, and the plain prompt is left alone.
    assert expanded == processor.apply_chat_template(build_messages("Is it red?", "answer", clip), tokenize=False,
                                                     add_generation_prompt=True)
    plain = load_video(videos["cut"], fps=4.0, max_pixels=H * W)
    assert expand_video(rendered, processor, plain) == rendered
    with pytest.raises(ValueError, match="exactly one video placeholder"):
        expand_video(rendered + block, processor, clip)


def count_video_tokens(processor, clip) -> tuple[int, torch.Tensor]:
    inputs = processor_inputs(processor, split_prompt(processor).prefix, clip)
    return int((inputs["input_ids"] == processor.video_token_id).sum()), inputs["video_grid_thw"]


@pytest.mark.parametrize("video, fps", [("cut", 4.0), ("frozen", 4.0), ("teleport", 8.0)])
def test_token_counts_equal_what_the_processor_makes(tiny_model_and_processor, videos, video, fps):
    _, processor = tiny_model_and_processor
    factor = patch_factor(processor)
    clip = load_video(videos[video], fps=fps, max_pixels=H * W, slowfast=SlowFast())
    plain = load_video(videos[video], fps=fps, max_pixels=H * W)
    given, plain_tokens = clip.token_counts(factor)
    tokens, grid = count_video_tokens(processor, clip)
    assert tokens == given
    assert count_video_tokens(processor, plain)[0] == plain_tokens == plain.token_counts(factor)[0]
    assert given < plain_tokens
    # One grid row per pathway; an odd frame count is padded to the next temporal patch of 2.
    expected = [[-(-len(p.indices) // 2), p.frames.shape[2] // 14, p.frames.shape[3] // 14] for p in clip.pathways]
    assert grid.tolist() == expected and len(expected) == 2


def test_cut_clip_token_saving(videos):
    clip = load_video(videos["cut"], fps=4.0, max_pixels=H * W, slowfast=SlowFast())
    # plain: 8 frames -> 4 temporal patches x 8 x 12; SlowFast: 1 x 8 x 12 slow + 3 x 4 x 6 fast
    assert clip.token_counts(28) == (96 + 72, 384)


def test_qwen3_vl_processor_token_counts(videos):
    from finger_reward.tiny import build_processor

    processor = build_processor(arch="qwen3_vl")
    factor = patch_factor(processor)
    clip = load_video(videos["teleport"], fps=8.0, max_pixels=H * W, patch_factor=factor, slowfast=SlowFast())
    assert count_video_tokens(processor, clip)[0] == clip.token_counts(factor)[0]


# ---- scoring: shared prefix equals the plain loop; FingerReward end to end -----------------------


@pytest.fixture(scope="module")
def clips(videos):
    frames = torch.rand(7, 3, 84, 140, generator=torch.Generator().manual_seed(3))
    frames[4:] = frames[3]  # a still ending: fast frames
    return [
        load_video(videos["cut"], fps=4.0, max_pixels=H * W, slowfast=SlowFast(), name="cut"),
        load_video(videos["teleport"], fps=4.0, max_pixels=H * W, slowfast=SlowFast(), name="teleport"),
        load_video(frames, slowfast=SlowFast(), name="tensor"),
    ]


def test_clips_have_two_pathways(clips):
    assert [len(c.pathways) for c in clips] == [2, 2, 2]


def test_shared_prefix_equals_plain_forward(tiny_model_and_processor, clips):
    model, processor = tiny_model_and_processor
    shared, plain = TransformersEngine(model, processor), TransformersEngine(model, processor, share_prefix=False)
    for clip in clips:
        fast, slow = shared.answer(clip, TEXTS).probs, plain.answer(clip, TEXTS).probs
        torch.testing.assert_close(fast, slow, atol=1e-4, rtol=0)
        torch.testing.assert_close(fast.sum(-1), torch.ones(len(TEXTS)))
    assert fast[:, 0].std() > 1e-2  # the tiny model reacts to the question
    # Batched across videos (SlowFast with one and with two pathways, and a plain clip): the same numbers.
    one_pathway = load_video(clips[2].frames, slowfast=SlowFast(threshold=1.0), name="all slow")
    plain_clip = load_video(clips[2].frames, name="plain")
    group = clips + [one_pathway, plain_clip]
    together = shared.answer_many(group, [TEXTS] * len(group))
    for clip, answers in zip(group, together):
        torch.testing.assert_close(answers.probs, plain.answer(clip, TEXTS).probs, atol=1e-4, rtol=0)
    # SlowFast changes what the model sees.
    assert (together[2].probs - together[4].probs).abs().max() > 1e-4


def test_reason_mode_shared_prefix_equals_generate(tiny_model_and_processor, clips):
    model, processor = tiny_model_and_processor
    shared = TransformersEngine(model, processor, mode="reason", max_new_tokens=6)
    plain = TransformersEngine(model, processor, mode="reason", max_new_tokens=6, share_prefix=False)
    fast, slow = shared.answer(clips[0], TEXTS), plain.answer(clips[0], TEXTS)
    assert fast.reasons == slow.reasons and all(fast.reasons)
    torch.testing.assert_close(fast.probs, slow.probs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("mode", ["answer", "reason"])
def test_finger_reward_scores_slowfast_clips(tiny_model_dir, videos, mode, caplog):
    options = dict(questions=QUESTIONS, mode=mode, max_new_tokens=4, fps=4.0, max_pixels=H * W)
    reward = FingerReward.from_pretrained(tiny_model_dir, slowfast=SlowFast(), **options)
    paths = [videos["cut"], videos["teleport"]]
    with caplog.at_level(logging.INFO, logger="finger_reward.reward"):
        results = reward.score(paths, PROMPT)
    for result in results:
        assert result.ok and 0 <= result.overall <= 1 and len(result.questions) == len(QUESTIONS)
        for q in result.questions:
            assert q.p_yes + q.p_no == pytest.approx(1, abs=1e-6)
            assert (q.reason is not None) == (mode == "reason")
    assert "cut.mp4: SlowFast 2 slow at 336x224, 6 fast at 168x112: 168 video tokens instead of 384" in caplog.text
    plain = FingerReward.from_pretrained(tiny_model_dir, **options).score(paths, PROMPT)
    assert all(abs(a.overall - b.overall) > 1e-6 for a, b in zip(results, plain))  # the option is not ignored


def test_job_token_estimate_follows_the_pathways(tiny_model_dir, videos):
    options = dict(questions=QUESTIONS, fps=4.0, max_pixels=H * W)
    slowfast = FingerReward.from_pretrained(tiny_model_dir, slowfast=SlowFast(), **options)
    plain = FingerReward.from_pretrained(tiny_model_dir, **options)
    [job] = slowfast.prepare([videos["cut"]], [PROMPT])
    [plain_job] = plain.prepare([videos["cut"]], [PROMPT])
    processor = slowfast.engine.processor
    total = processor_inputs(processor, split_prompt(processor).prefix, job.clip)["input_ids"].shape[1]
    plain_total = processor_inputs(processor, split_prompt(processor).prefix, plain_job.clip)["input_ids"].shape[1]
    questions = 48 * len(QUESTIONS)
    system = plain_total - plain_job.clip.token_counts()[0]  # prefix tokens besides the video
    assert plain_job.tokens - questions == plain_total - system
    # SlowFast: its video tokens are exact, its timestamp markers estimated.
    assert job.tokens - questions == pytest.approx(total - system, rel=0.1)
    assert job.tokens < plain_job.tokens


# ---- bad options ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, problem",
    [
        (dict(threshold=1.5), "threshold=1.5 must be a patch similarity in [0, 1]"),
        (dict(threshold=-0.1), "threshold=-0.1"),
        (dict(patch=0), "patch=0 must be a positive whole number"),
        (dict(patch=2.5), "patch=2.5"),
        (dict(tolerance=1.0), "tolerance=1.0 must be in [0, 1)"),
        (dict(fast_max_pixels=0), "fast_max_pixels=0 must be a positive pixel count"),
    ],
)
def test_bad_slowfast_options(options, problem):
    with pytest.raises(ValueError) as info:
        SlowFast(**options)
    assert problem in str(info.value)


def test_bad_slowfast_arguments(tiny_model_dir, mp4_paths):
    expected = r"fast_max_pixels=300000 must be between one patch \(28x28=784\) and max_pixels=200704"
    with pytest.raises(ValueError, match=expected):
        load_video(mp4_paths[0], slowfast=SlowFast(fast_max_pixels=300_000))
    with pytest.raises(ValueError, match="fast_max_pixels=500 must be between one patch"):
        load_video(mp4_paths[0], slowfast=SlowFast(fast_max_pixels=500))
    with pytest.raises(ValueError, match="slowfast must be a SlowFast"):
        load_video(mp4_paths[0], slowfast=0.9)
    with pytest.raises(ValueError, match="slowfast must be a SlowFast.*got float"):
        FingerReward.from_pretrained(tiny_model_dir, questions=QUESTIONS, slowfast=0.9)


# ---- the command line ---------------------------------------------------------------------------


def run(*args):
    return subprocess.run([sys.executable, "-m", "finger_reward.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_cli_score_with_slowfast_reports_the_tokens_saved(tiny_model_dir, videos, tmp_path, capsys):
    bank = QuestionBank(QUESTIONS).to_jsonl(tmp_path / "bank.jsonl")
    common = ["score", videos["cut"], "--prompt", PROMPT, "--questions", bank, "--model", tiny_model_dir,
              "--fps", 4, "--max-pixels", H * W, "--json"]
    done = run(*common, "--slowfast")
    assert done.returncode == 0, done.stderr
    assert "168 video tokens instead of 384 (56% fewer)" in done.stderr
    row = json.loads(done.stdout)
    assert row["error"] is None and 0 <= row["overall"] <= 1
    with pytest.raises(SystemExit) as info:
        main([*map(str, common), "--slowfast", "1.5"])
    assert info.value.code == 2
    assert "expected a patch similarity threshold in (0, 1]" in capsys.readouterr().err


# ---- SlowFast everywhere a clip is sampled: the service, checkpoint defaults, the trainers ---------


@pytest.fixture(scope="module")
def bank_path(tmp_path_factory):
    return QuestionBank(QUESTIONS).to_jsonl(tmp_path_factory.mktemp("slowfast_bank") / "bank.jsonl")


def test_served_slowfast_scores_as_the_slowfast_reward(tiny_model_dir, bank_path, videos):
    config = ServeConfig(model=str(tiny_model_dir), questions=str(bank_path), fps=4.0, max_pixels=H * W,
                         slowfast=0.8, port=0, max_wait_ms=5)
    served = config.build_reward()  # what `finger-reward serve` and every Ray replica load
    assert served.video_options["slowfast"] == SlowFast(threshold=0.8)
    direct = FingerReward.from_pretrained(tiny_model_dir, questions=QUESTIONS, fps=4.0, max_pixels=H * W,
                                          slowfast=SlowFast(threshold=0.8))
    paths = [videos["cut"], videos["teleport"]]
    with LocalServer(served, config) as server:
        got = FingerRewardClient(server.url).score(paths, PROMPT)
    want = direct.score(paths, PROMPT)
    for g, w in zip(got, want):
        assert_same(g, w)
    plain = FingerReward.from_pretrained(tiny_model_dir, questions=QUESTIONS, fps=4.0, max_pixels=H * W)
    assert all(abs(g.overall - p.overall) > 1e-6 for g, p in zip(got, plain.score(paths, PROMPT)))


def test_serve_config_slowfast_values(tmp_path):
    assert "slowfast" not in ServeConfig().reward_options()  # None: as the checkpoint was trained
    assert ServeConfig(slowfast=True).slowfast == 0.9  # as the bare --slowfast flag
    assert ServeConfig(slowfast=False).reward_options()["slowfast"] is None  # plain, whatever the checkpoint says
    assert ServeConfig(slowfast=1).reward_options()["slowfast"] == SlowFast(threshold=1.0)
    path = tmp_path / "serve.yaml"
    path.write_text("slowfast: 0.85\n")
    assert ServeConfig.from_yaml(path).reward_options()["slowfast"] == SlowFast(threshold=0.85)
    assert ServeConfig.from_yaml(path, slowfast=False).slowfast is False  # the command line wins


@pytest.fixture
def checkpoint(tiny_model_dir, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(tiny_model_dir, path)
    return path


def test_checkpoint_slowfast_round_trip(checkpoint, bank_path, videos):
    pretrained.write_scoring_defaults(checkpoint, mode="answer", fps=4.0, max_pixels=H * W, slowfast=0.8)
    assert json.loads((checkpoint / pretrained.SCORING_FILE).read_text())["slowfast"] == 0.8
    assert pretrained.scoring_defaults(checkpoint)["slowfast"] == 0.8
    reward = FingerReward.from_pretrained(checkpoint, questions=QUESTIONS)
    assert reward.video_options["slowfast"] == SlowFast(threshold=0.8)
    [job] = reward.prepare([videos["cut"]], [PROMPT])
    assert [p.kind for p in job.clip.pathways] == [SLOW, FAST]  # the clip really is sampled SlowFast
    # An explicit argument wins, None included (plain frames from a SlowFast-trained checkpoint).
    assert FingerReward.from_pretrained(checkpoint, questions=QUESTIONS, slowfast=None).video_options["slowfast"] is None
    other = SlowFast(threshold=0.95, fast_max_pixels=28 * 28 * 4)
    assert FingerReward.from_pretrained(checkpoint, questions=QUESTIONS, slowfast=other).video_options["slowfast"] == other
    # The service follows the checkpoint unless told otherwise.
    serve = dict(model=str(checkpoint), questions=str(bank_path))
    assert ServeConfig(**serve).build_reward().video_options["slowfast"] == SlowFast(threshold=0.8)
    assert ServeConfig(**serve, slowfast=False).build_reward().video_options["slowfast"] is None
    assert ServeConfig(**serve, slowfast=0.7).build_reward().video_options["slowfast"] == SlowFast(threshold=0.7)
    # A checkpoint trained on plain frames says so.
    pretrained.write_scoring_defaults(checkpoint, mode="answer", slowfast=None)
    assert json.loads((checkpoint / pretrained.SCORING_FILE).read_text())["slowfast"] is None
    assert FingerReward.from_pretrained(checkpoint, questions=QUESTIONS).video_options["slowfast"] is None


def test_cli_score_follows_the_checkpoint_unless_told_off(checkpoint, bank_path, videos, capsys):
    pretrained.write_scoring_defaults(checkpoint, mode="answer", fps=4.0, max_pixels=H * W, slowfast=0.9)
    common = ["score", str(videos["cut"]), "--prompt", PROMPT, "--questions", str(bank_path), "--model", str(checkpoint),
              "--json"]
    assert main(common) == 0
    assert "168 video tokens instead of 384" in capsys.readouterr().err
    assert main([*common, "--slowfast", "off"]) == 0
    assert "SlowFast" not in capsys.readouterr().err


@pytest.mark.parametrize("value", [0, 1.5, -0.2, float("nan"), "0.9"])
def test_bad_threshold_is_refused_naming_slowfast(checkpoint, tmp_path, value):
    from finger_reward.trainers.grpo import GRPORecipe
    from finger_reward.trainers.sft import SFTRecipe

    where = f"slowfast={value!r} must be a SlowFast patch similarity threshold in (0, 1]"
    for build in (lambda: ServeConfig(slowfast=value), lambda: SFTRecipe(model="m", data="d.jsonl", slowfast=value),
                  lambda: GRPORecipe(model="m", data="d.jsonl", slowfast=value),
                  lambda: pretrained.write_scoring_defaults(checkpoint, slowfast=value)):
        with pytest.raises(ValueError) as info:
            build()
        assert where in str(info.value)
    (checkpoint / pretrained.SCORING_FILE).write_text(json.dumps({"mode": "answer", "slowfast": value}))
    with pytest.raises(FingerError, match=r"finger_reward\.json: slowfast="):
        FingerReward.from_pretrained(checkpoint, questions=QUESTIONS)
    path = tmp_path / "serve.yaml"
    path.write_text(json.dumps({"slowfast": value}))  # JSON is YAML
    with pytest.raises(ValueError, match=r"slowfast=.* must be a SlowFast"):
        ServeConfig.from_yaml(path)


def test_cli_serve_refuses_a_bad_threshold(tiny_model_dir, capsys):
    with pytest.raises(SystemExit) as info:
        main(["serve", "--model", str(tiny_model_dir), "--slowfast", "1.5"])
    assert info.value.code == 2
    assert "expected a patch similarity threshold in (0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--model", str(tiny_model_dir), "--slowfast", "0"])
    assert "'0': expected a patch similarity threshold" in capsys.readouterr().err


def _record(video) -> InstructRecord:
    q = QUESTIONS[0]
    return InstructRecord(q.prompt, q.dimension, q.entity, q.question, q.positive, str(video), "Yes",
                          reason="The circle is red throughout.")


@pytest.mark.parametrize("mode", ["answer", "reason"])
def test_sft_collator_with_slowfast_feeds_what_the_engine_scores(tiny_model_and_processor, videos, mode):
    model, processor = tiny_model_and_processor
    reward = FingerReward.from_pretrained(model, processor=processor, questions=QUESTIONS, mode=mode, fps=4.0,
                                          max_pixels=H * W, slowfast=SlowFast())
    engine = reward.engine
    record = _record(videos["cut"])
    [job] = reward.prepare([record.video], [record.prompt])
    assert len(job.clip.pathways) == 2
    expected = engine.preprocess(job.clip)  # the processor's prefix inputs: system turn and both pathways
    collator = VideoSFTCollator(processor, mode, fps=4.0, max_pixels=H * W, slowfast=SlowFast())
    batch = collator([record])
    for key in ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
        assert torch.equal(batch[key], expected[key]), key
    assert batch["video_grid_thw"].shape[0] == 2  # one row per pathway
    prefix = expected["input_ids"].shape[1]
    for key in ("input_ids", "mm_token_type_ids"):
        assert torch.equal(batch[key][:, :prefix], expected[key]), key
    # After the shared prefix, the engine's question suffix, then the trained completion.
    suffix = processor.tokenizer.encode(engine.split.text_after_video(record.question), add_special_tokens=False)
    assert batch["input_ids"][0, prefix: prefix + len(suffix)].tolist() == suffix
    assert (batch["labels"][0, : prefix + len(suffix)] == -100).all() and (batch["labels"][0, prefix + len(suffix):] != -100).all()
    plain = VideoSFTCollator(processor, mode, fps=4.0, max_pixels=H * W)([record])
    assert plain["video_grid_thw"].shape[0] == 1
    assert plain["pixel_values_videos"].shape[0] > batch["pixel_values_videos"].shape[0]  # the tokens SlowFast saves
    with pytest.raises(ValueError, match="slowfast must be a SlowFast.*got float"):
        VideoSFTCollator(processor, mode, slowfast=0.9)


def test_trainers_sample_slowfast_and_write_it_to_the_checkpoint(tiny_model_dir, tiny_model_and_processor, videos,
                                                                  tmp_path):
    from trl import TrlParser

    from finger_reward.trainers.grpo import GRPORecipe, VideoGRPOTrainer
    from finger_reward.trainers.sft import SFTRecipe, build_trainer

    configs = Path(__file__).resolve().parents[1] / "configs"
    (sft,) = TrlParser([SFTRecipe]).parse_args_and_config(
        ["--config", str(configs / "sft_reason.yaml"), "--model", "m", "--data", "d.jsonl"])
    assert sft.slowfast is None
    (sft,) = TrlParser([SFTRecipe]).parse_args_and_config(
        ["--config", str(configs / "sft_reason.yaml"), "--model", "m", "--data", "d.jsonl", "--slowfast", "0.9"])
    assert sft.slowfast == 0.9
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps(_record(videos["cut"]).to_dict()) + "\n")
    recipe = SFTRecipe(model=str(tiny_model_dir), data=str(data), mode="reason", output_dir=str(tmp_path / "sft"),
                       fps=4.0, max_pixels=H * W, slowfast=0.9, max_steps=1)
    assert build_trainer(recipe).data_collator.video_options["slowfast"] == SlowFast(threshold=0.9)

    model, processor = tiny_model_and_processor
    grpo = GRPORecipe(model=str(tiny_model_dir), data=str(data), output_dir=str(tmp_path / "grpo"), num_generations=2,
                      beta=0.0, fps=4.0, max_pixels=H * W, slowfast=0.9)
    trainer = VideoGRPOTrainer(grpo, model=model, processor=processor, records=[_record(videos["cut"])])
    inputs = trainer.prompt_inputs(trainer.records[0])  # what every rollout and loss forward sees
    engine = TransformersEngine(model, processor, mode="reason")
    clip = load_video(videos["cut"], fps=4.0, max_pixels=H * W, slowfast=SlowFast(threshold=0.9))
    torch.testing.assert_close(inputs["pixel_values_videos"], engine.preprocess(clip)["pixel_values_videos"])
    assert inputs["video_grid_thw"].shape[0] == 2
    trainer.save_model(tmp_path / "saved")
    assert pretrained.scoring_defaults(tmp_path / "saved")["slowfast"] == 0.9
    scored = FingerReward.from_pretrained(tmp_path / "saved", questions=QUESTIONS)
    assert scored.video_options["slowfast"] == SlowFast(threshold=0.9) and scored.engine.mode == "reason"
