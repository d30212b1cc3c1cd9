"""diffusers adapters on a real tiny Wan pipeline and the real tiny FingER model (no mocks)."""

import math
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from finger_reward import DIMENSIONS, FingerError, FingerReward, VideoError
from finger_reward.integrations.diffusers import FlowGRPOReward, VideoRewardDropIn, pipeline_videos
from finger_reward.serve import FingerRewardClient
from finger_reward.tiny_wan import build_tiny_wan_pipeline, make_tiny_wan_pipeline

PROMPTS = ["a red circle moves left to right", "a blue square stays still"]
CALL = dict(num_frames=5, height=32, width=32, num_inference_steps=2, guidance_scale=1.0, max_sequence_length=16)


def generate(pipe, output_type: str, seed: int = 0, prompts=PROMPTS):
    return pipe(list(prompts), output_type=output_type, generator=torch.Generator().manual_seed(seed), **CALL)


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_wan_pipeline(seed=0)


@pytest.fixture(scope="module")
def outputs(pipe):
    return {kind: generate(pipe, kind) for kind in ("np", "pt", "pil")}


@pytest.fixture(scope="module")
def reward(tiny_model_dir):
    return FingerReward.from_pretrained(tiny_model_dir)  # no bank: template questions


def test_every_output_type_converts(outputs):
    raw = outputs["np"].frames
    assert raw.shape == (2, 5, 32, 32, 3) and raw.dtype == np.float32

    as_np = pipeline_videos(outputs["np"])
    assert len(as_np) == 2
    for i, video in enumerate(as_np):
        assert video.dtype == np.uint8 and video.shape == (5, 32, 32, 3)
        np.testing.assert_array_equal(video, np.clip(np.rint(raw[i] * 255), 0, 255).astype(np.uint8))
    assert len({v.tobytes() for v in as_np}) == 2  # two different videos, in batch order

    as_pt = pipeline_videos(outputs["pt"].frames, output_type="pt")  # raw .frames work too
    assert len(as_pt) == 2
    for i, video in enumerate(as_pt):
        assert video.dtype == torch.float32 and video.shape == (5, 3, 32, 32)
        assert 0 <= video.min() and video.max() <= 1
        np.testing.assert_allclose(video.permute(0, 2, 3, 1).numpy(), raw[i], atol=1e-6)

    as_pil = pipeline_videos(outputs["pil"])
    assert len(as_pil) == 2
    for i, video in enumerate(as_pil):
        assert len(video) == 5 and all(isinstance(im, Image.Image) and im.size == (32, 32) for im in video)
        frames = np.stack([np.asarray(im.convert("RGB")) for im in video])
        assert np.abs(frames.astype(int) - as_np[i].astype(int)).max() <= 1


def test_output_types_give_the_same_scores(outputs, reward):
    scores = {kind: [r.overall for r in reward.score(pipeline_videos(out), PROMPTS)] for kind, out in outputs.items()}
    assert all(0 <= s <= 1 for s in scores["np"])
    assert scores["pt"] == pytest.approx(scores["np"], abs=1e-6)
    assert scores["pil"] == pytest.approx(scores["np"], abs=1e-6)
    # The tolerance can fail: one grey level brighter moves the scores far more than it.
    brighter = [np.minimum(v.astype(int) + 1, 255).astype(np.uint8) for v in pipeline_videos(outputs["np"])]
    shifted = [r.overall for r in reward.score(brighter, PROMPTS)]
    assert max(abs(a - b) for a, b in zip(shifted, scores["np"])) > 1e-4


def test_latent_output_is_refused_with_the_fix(pipe, outputs):
    latents = generate(pipe, "latent")
    assert latents.frames.shape[1] == 16  # (B, C=16, F', H/8, W/8)
    with pytest.raises(FingerError, match=r'shape \(2, 16, 2, 4, 4\) are not \(B, F, C, H, W\) with C=3.*latents.*output_type "np", "pt" or "pil"'):
        pipeline_videos(latents)
    with pytest.raises(FingerError, match=r'output_type="latent" gives latents.*"np", "pt" or "pil"'):
        pipeline_videos(latents, output_type="latent")
    with pytest.raises(FingerError, match=r"not \(B, F, H, W, C\) with C=3 \(got C=16\)"):
        pipeline_videos(np.zeros((2, 3, 4, 4, 16), np.float32))
    with pytest.raises(ValueError, match="output_type='pt' but the frames are a numpy array"):
        pipeline_videos(outputs["np"], output_type="pt")
    with pytest.raises(FingerError, match=r"4 dims .*expected 5: \(B, F, H, W, C\)"):
        pipeline_videos(outputs["np"].frames[0])


def test_nan_and_out_of_range_frames_name_the_batch_item(outputs):
    frames = outputs["np"].frames.copy()
    frames[1, 2, 0, 0, 0] = np.nan
    with pytest.raises(VideoError, match=r"batch item #1: contains NaN"):
        pipeline_videos(frames)
    pt = outputs["pt"].frames.clone()
    pt[1] = pt[1] * 2 + 0.5
    with pytest.raises(VideoError, match=r"batch item #1: values span \[0\.5, .*outside \[0, 1\]"):
        pipeline_videos(pt)
    pt[0, 0, 0, 0, 0] = -0.5
    with pytest.raises(VideoError, match=r"batch item #0: .*batch items #1 are bad too"):
        pipeline_videos(pt)


def test_flow_grpo_reward_on_pipeline_output(outputs, reward):
    fn = FlowGRPOReward(reward)
    expected = reward.score(pipeline_videos(outputs["pt"]), PROMPTS)
    # Flow-GRPO passes the pt frames (B, F, C, H, W), prompts, per-sample metadata and extra flags.
    scores, info = fn(outputs["pt"].frames, PROMPTS, [{}, {}], only_strict=False)
    assert isinstance(scores, np.ndarray) and scores.dtype == np.float32 and scores.shape == (2,)
    assert scores.tolist() == pytest.approx([r.overall for r in expected], abs=1e-6)
    assert set(info) == {"overall", "success", "errors", *DIMENSIONS}
    for dim in DIMENSIONS:
        assert info[dim].dtype == np.float32 and info[dim].shape == (2,)
        assert info[dim].tolist() == pytest.approx([r.dimensions[dim] for r in expected], abs=1e-6)
    assert info["success"].dtype == bool and info["success"].tolist() == [True, True]
    assert info["errors"] == [None, None]
    again, _ = fn(outputs["np"], PROMPTS)  # the output object itself, np frames
    assert again.tolist() == pytest.approx(scores.tolist(), abs=1e-4)

    weighted, winfo = FlowGRPOReward(reward, dimension_weights={"text_alignment": 1.0})(outputs["pt"], PROMPTS)
    np.testing.assert_allclose(weighted, winfo["text_alignment"], atol=1e-6)
    assert not np.allclose(weighted, winfo["overall"])
    with pytest.raises(ValueError, match="unknown dimension"):
        FlowGRPOReward(reward, dimension_weights={"motion": 1.0})


def test_flow_grpo_reports_a_corrupt_video_as_failed(outputs, reward):
    good = pipeline_videos(outputs["np"])
    corrupt = np.full((5, 32, 32, 3), np.nan, np.float32)
    scores, info = FlowGRPOReward(reward)([good[0], corrupt, good[1]], [PROMPTS[0], PROMPTS[0], PROMPTS[1]], None)
    assert math.isnan(scores[1]) and not np.isnan(scores[[0, 2]]).any()
    assert info["success"].tolist() == [True, False, True]
    assert info["errors"][0] is None and info["errors"][2] is None and "NaN" in info["errors"][1]
    assert all(math.isnan(info[dim][1]) for dim in DIMENSIONS)
    assert scores[[0, 2]].tolist() == pytest.approx([r.overall for r in reward.score(good, PROMPTS)], abs=1e-6)

    batched = outputs["np"].frames.copy()
    batched[0, 0, 0, 0, 0] = np.nan  # a bad item inside batched output fails alone, too
    scores, info = FlowGRPOReward(reward)(batched, PROMPTS, [{}, {}])
    assert info["success"].tolist() == [False, True] and math.isnan(scores[0]) and not math.isnan(scores[1])
    assert "batch item #0: contains NaN" in info["errors"][0]


def test_flow_grpo_reward_pickles():
    fn = FlowGRPOReward(FingerRewardClient("http://127.0.0.1:9", token="t"), dimension_weights={"visual_quality": 2.0})
    clone = pickle.loads(pickle.dumps(fn))
    assert isinstance(clone, FlowGRPOReward) and clone.__name__ == "finger_reward"
    assert clone.dimension_weights == {"visual_quality": 2.0} and clone.reward.url == "http://127.0.0.1:9"


def test_videoalign_drop_in_on_real_files(reward, mp4_paths, tmp_path):
    missing = tmp_path / "missing.mp4"
    paths = [*mp4_paths, missing]
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[1]]
    rewards = VideoRewardDropIn(reward).reward(paths, prompts)
    expected = reward.score(list(mp4_paths), prompts[:3])
    assert len(rewards) == 4
    for entry, result in zip(rewards[:3], expected):
        assert set(entry) == {"VQ", "MQ", "TA", "Overall", "dimensions", "error"} and entry["error"] is None
        dims = result.dimensions
        assert entry["VQ"] == pytest.approx(dims["visual_quality"])
        assert entry["TA"] == pytest.approx(dims["text_alignment"])
        motion = [dims["temporal_consistency"], dims["dynamic_degree"], dims["factual_consistency"]]
        assert entry["MQ"] == pytest.approx(sum(motion) / 3)
        assert entry["Overall"] == pytest.approx(result.overall) and 0 <= entry["Overall"] <= 1
        assert entry["dimensions"] == pytest.approx(dims)
    failed = rewards[3]
    assert failed["VQ"] is None and failed["MQ"] is None and failed["TA"] is None and failed["Overall"] is None
    assert "missing.mp4" in failed["error"] and "file not found" in failed["error"]


def test_videoalign_drop_in_options(reward, mp4_paths):
    paths = list(mp4_paths[:1])
    drop_in = VideoRewardDropIn(reward, norm_stats={"VQ": (0.5, 0.1), "Overall": (0.5, 0.2)})
    plain, normed = drop_in.reward(paths, PROMPTS[0])[0], drop_in.reward(paths, PROMPTS[0], use_norm=True)[0]
    assert normed["VQ"] == pytest.approx((plain["VQ"] - 0.5) / 0.1)
    assert normed["Overall"] == pytest.approx((plain["Overall"] - 0.5) / 0.2) and normed["TA"] == plain["TA"]
    # num_frames is honoured: exactly that many evenly spread frames, at the file's real timing.
    three = VideoRewardDropIn(reward).reward(paths, PROMPTS[0], num_frames=3)[0]
    same = FingerReward(reward.engine, fps=1000.0, max_frames=3).score(paths, PROMPTS[0])[0]
    assert three["Overall"] == pytest.approx(same.overall) and three["Overall"] != pytest.approx(plain["Overall"])
    assert reward.video_options["max_frames"] == 48  # the caller's reward is left as it was
    with pytest.raises(ValueError, match="fps or num_frames, not both"):
        drop_in.reward(paths, PROMPTS[0], fps=2, num_frames=3)
    with pytest.raises(ValueError, match="use_norm=True needs norm_stats"):
        VideoRewardDropIn(reward).reward(paths, PROMPTS[0], use_norm=True)
    with pytest.raises(ValueError, match="apply only to a local FingerReward"):
        VideoRewardDropIn(FingerRewardClient("http://127.0.0.1:9")).reward(paths, PROMPTS[0], fps=4)


def test_tiny_wan_saves_reloads_and_regenerates_offline(pipe, outputs, tmp_path):
    from diffusers import WanPipeline

    again = generate(pipe, "np").frames
    np.testing.assert_array_equal(again, outputs["np"].frames)  # fixed seed, same frames
    assert not np.array_equal(generate(pipe, "np", seed=1).frames, again)  # the seed matters
    reloaded = WanPipeline.from_pretrained(make_tiny_wan_pipeline(tmp_path / "wan", seed=0))
    reloaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(generate(reloaded, "np").frames, outputs["np"].frames)


# ---- pipeline_fps ---------------------------------------------------------------------------------


def test_pipeline_fps_by_family_config_and_override(pipe):
    from finger_reward.integrations.diffusers import PIPELINE_FPS, pipeline_fps
    from finger_reward.tiny_ltx import build_tiny_ltx_pipeline

    assert pipeline_fps(pipe) == 16.0  # WanPipeline: Wan2.1
    assert pipeline_fps(build_tiny_wan_pipeline(seed=0, ti2v=True)) == 24.0  # Wan2.2-TI2V-5B: expand_timesteps
    assert pipeline_fps(build_tiny_ltx_pipeline(seed=0)) == 24.0
    other = build_tiny_wan_pipeline(seed=0)
    other.register_to_config(fps=12)  # a checkpoint that records its own rate wins over the table
    assert pipeline_fps(other) == 12.0

    class Custom:
        config = {}

    with pytest.raises(ValueError, match="Custom.*video_fps=.*PIPELINE_FPS"):
        pipeline_fps(Custom())
    PIPELINE_FPS["Custom"] = 10.0
    try:
        assert pipeline_fps(Custom()) == 10.0
    finally:
        del PIPELINE_FPS["Custom"]
