"""FingerReward end to end on the tiny Qwen2.5-VL and real .mp4 files."""

import math
import pickle

import pytest
import torch

from finger_reward import BatchError, FingerReward, Question, QuestionBank, QuestionError, VideoError, VideoScore
from finger_reward.questions import DIMENSIONS

PROMPT = "a red circle moves from left to right"
OTHER = "a blue square stays still"


def make_questions(prompt: str) -> list[Question]:
    return [
        Question(prompt, "text_alignment", "red circle", "Is the circle red?", True),
        Question(prompt, "dynamic_degree", "red circle", "Does the red circle stay still?", False),
        Question(prompt, "visual_quality", "video", "Is the video sharp and clean?", True),
        Question(prompt, "visual_quality", "video", "Is the video noisy?", False),
        Question(prompt, "temporal_consistency", "red circle", "Does the circle keep its colour?", True),
        Question(prompt, "factual_consistency", "red circle", "Does the circle jump to another place?", False),
    ]


@pytest.fixture(scope="module")
def bank_path(tmp_path_factory):
    bank = QuestionBank(make_questions(PROMPT) + make_questions(OTHER)[:2])
    return bank.to_jsonl(tmp_path_factory.mktemp("bank") / "questions.jsonl")


@pytest.fixture(scope="module")
def reward(tiny_model_dir, bank_path):
    return FingerReward.from_pretrained(tiny_model_dir, questions=bank_path)


def test_scores_real_videos_with_full_results(reward, mp4_paths):
    results = reward.score(mp4_paths, PROMPT)
    assert [r.video for r in results] == [str(p) for p in mp4_paths]
    for result in results:
        assert isinstance(result, VideoScore) and result.ok
        assert set(result.dimensions) == set(DIMENSIONS)
        assert 0 <= result.overall <= 1 and 0 <= result.hard_overall <= 1
        assert result.overall == pytest.approx(sum(result.dimensions.values()) / 5)
        assert len(result.questions) == 6
        for q in result.questions:
            assert q.p_yes + q.p_no == pytest.approx(1, abs=1e-6)
            assert q.score == pytest.approx(q.p_yes if q.positive else q.p_no)
            assert q.answer == ("Yes" if q.p_yes >= q.p_no else "No") and q.reason is None
        vq = [q.score for q in result.questions if q.dimension == "visual_quality"]
        assert result.dimensions["visual_quality"] == pytest.approx(sum(vq) / 2)
    assert len({round(r.overall, 6) for r in results}) == len(results)  # the videos matter
    assert reward(mp4_paths, PROMPT) == pytest.approx([r.overall for r in results])


def test_batch_equals_single(reward, mp4_paths):
    prompts = [PROMPT, OTHER, PROMPT]
    batch = reward.score(mp4_paths, prompts)
    for video, prompt, together in zip(mp4_paths, prompts, batch):
        alone = reward.score([video], [prompt])[0]
        assert alone.overall == pytest.approx(together.overall, abs=1e-6)
        assert [q.p_yes for q in alone.questions] == pytest.approx([q.p_yes for q in together.questions], abs=1e-6)


def test_flipping_polarity_flips_the_score(tiny_model_dir, mp4_paths):
    questions = make_questions(PROMPT)
    flipped = [Question(q.prompt, q.dimension, q.entity, q.question, not q.positive) for q in questions]
    a = FingerReward.from_pretrained(tiny_model_dir, questions=questions).score(mp4_paths[:1], PROMPT)[0]
    b = FingerReward.from_pretrained(tiny_model_dir, questions=flipped).score(mp4_paths[:1], PROMPT)[0]
    for qa, qb in zip(a.questions, b.questions):
        assert qb.score == pytest.approx(1 - qa.score, abs=1e-6)
    assert b.overall == pytest.approx(1 - a.overall, abs=1e-6)


def test_sum_aggregate_and_weights(tiny_model_dir, bank_path, mp4_paths):
    mean = FingerReward.from_pretrained(tiny_model_dir, questions=bank_path).score(mp4_paths[:1], PROMPT)[0]
    summed = FingerReward.from_pretrained(tiny_model_dir, questions=bank_path, aggregate="sum",
                                          weights={"visual_quality": 1.0}).score(mp4_paths[:1], PROMPT)[0]
    assert summed.dimensions["visual_quality"] == pytest.approx(2 * mean.dimensions["visual_quality"])
    assert summed.overall == pytest.approx(summed.dimensions["visual_quality"])


def test_reason_mode_returns_reasons(tiny_model_dir, bank_path, mp4_paths):
    reward = FingerReward.from_pretrained(tiny_model_dir, questions=bank_path, mode="reason", max_new_tokens=6)
    result = reward.score(mp4_paths[:1], PROMPT)[0]
    assert all(isinstance(q.reason, str) and q.reason for q in result.questions)
    assert 0 <= result.overall <= 1


def test_in_memory_videos(reward):
    frames = torch.rand(6, 3, 56, 84, generator=torch.Generator().manual_seed(3))
    from_float = reward.score([frames], PROMPT)[0]
    from_uint8 = reward.score([(frames * 255).round().to(torch.uint8)], PROMPT)[0]
    assert from_float.overall == pytest.approx(from_uint8.overall, abs=1e-6)
    signed = FingerReward(reward.engine, questions=reward.bank, value_range=(-1, 1)).score([frames * 2 - 1], PROMPT)[0]
    assert signed.overall == pytest.approx(from_float.overall, abs=1e-3)


def test_one_bad_video_fails_alone(reward, mp4_paths, tmp_path):
    missing = tmp_path / "missing.mp4"
    videos = [mp4_paths[0], missing, torch.zeros(4, 3, 5), mp4_paths[1]]
    with pytest.raises(BatchError) as caught:
        reward.score(videos, PROMPT)
    err = caught.value
    assert sorted(err.failures) == [1, 2]
    assert isinstance(err.failures[1], VideoError) and "missing.mp4" in str(err) and "file not found" in str(err)
    assert "#2" in str(err) and "3 dims" in str(err)
    good = reward.score([mp4_paths[0], mp4_paths[1]], PROMPT)
    assert err.results[0].overall == pytest.approx(good[0].overall)
    assert err.results[3].overall == pytest.approx(good[1].overall)
    assert not err.results[1].ok and math.isnan(err.results[1].overall)


def test_on_error_nan(reward, mp4_paths):
    lenient = FingerReward(reward.engine, questions=reward.bank, on_error="nan")
    scores = lenient([mp4_paths[0], b"not a video"], PROMPT)
    assert not math.isnan(scores[0]) and math.isnan(scores[1])
    assert "cannot be decoded" in lenient.score([b"not a video"], PROMPT)[0].error


def test_prompt_without_questions_is_named(reward, mp4_paths):
    with pytest.raises(BatchError, match="no questions for prompt 'a green star'"):
        reward.score(mp4_paths[:1], "a green star")
    empty = FingerReward(reward.engine, questions=[])  # a bank only, and an empty one
    with pytest.raises(BatchError) as caught:
        empty.score(mp4_paths[:1], PROMPT)
    assert isinstance(caught.value.failures[0], QuestionError)


def test_argument_errors(reward, mp4_paths):
    with pytest.raises(ValueError, match="2 videos but 3 prompts"):
        reward.score(mp4_paths[:2], [PROMPT] * 3)
    with pytest.raises(TypeError, match="wrap a single video in a list"):
        reward.score(str(mp4_paths[0]), PROMPT)
    with pytest.raises(ValueError, match="aggregate='max'"):
        FingerReward(reward.engine, aggregate="max")
    with pytest.raises(ValueError, match="on_error='skip'"):
        FingerReward(reward.engine, on_error="skip")
    with pytest.raises(ValueError, match="non-negative"):
        FingerReward(reward.engine, weights={"visual_quality": -1})
    with pytest.raises(ValueError, match="processor="):
        FingerReward.from_pretrained(reward.engine.model)


def test_loaded_model_and_name(tiny_model_and_processor, bank_path, mp4_paths):
    model, processor = tiny_model_and_processor
    reward = FingerReward.from_pretrained(model, processor=processor, questions=bank_path)
    assert reward.__name__ == "finger_reward"
    assert len(reward(mp4_paths[:1], PROMPT)) == 1


def test_results_serialise(reward, mp4_paths):
    result = reward.score(mp4_paths[:1], PROMPT)[0]
    restored = pickle.loads(pickle.dumps(result))
    assert restored == result
    as_dict = result.to_dict()
    assert as_dict["questions"][0]["question"] == "Is the circle red?"
    assert set(as_dict) >= {"overall", "dimensions", "questions", "hard_overall", "error"}


def test_pickles_without_its_batcher(reward, mp4_paths):
    future = reward.submit(mp4_paths[0], PROMPT)
    expected = future.result(timeout=60).overall
    clone = pickle.loads(pickle.dumps(reward))
    assert clone._batcher is None
    assert clone([mp4_paths[0]], PROMPT)[0] == pytest.approx(expected, abs=1e-6)
    assert clone.submit(mp4_paths[0], PROMPT).result(timeout=60).overall == pytest.approx(expected, abs=1e-6)
    clone.close()
    reward.close()


# ---- frame rate of in-memory videos ---------------------------------------------------------------


def test_81_frames_at_16_fps_score_exactly_like_the_lossless_file(reward, tmp_path):
    from finger_reward.video import encode_frames
    from finger_reward.video import VideoFrames
    from tests.conftest import random_frames

    frames = random_frames(3, num_frames=81, height=64, width=96)  # Wan's 81 frames = 5 s at 16 fps
    path = tmp_path / "wan16.mp4"
    path.write_bytes(encode_frames(torch.from_numpy(frames).permute(0, 3, 1, 2), 16.0))  # libx264rgb, crf 0
    from_file = reward.score([path], PROMPT)[0]
    assert from_file.sampled == {"frames": 10, "fps": 10 / (81 / 16), "height": 56, "width": 84}
    as_array = reward.score([frames], PROMPT, video_fps=16)[0]
    wrapped = reward.score([VideoFrames(frames, fps=16)], PROMPT)[0]
    by_default = FingerReward(reward.engine, questions=reward.bank, video_fps=16, **reward.video_options)
    for got in (as_array, wrapped, by_default.score([frames], PROMPT)[0]):
        assert got.sampled == from_file.sampled  # the same sampled frames, told the same rate
        assert [q.p_yes for q in got.questions] == [q.p_yes for q in from_file.questions]  # exactly
        assert got.overall == from_file.overall


def test_long_in_memory_video_without_a_rate_is_an_error_naming_video_fps(reward, caplog):
    from finger_reward import video as video_module
    from tests.conftest import random_frames

    long, short = random_frames(4, num_frames=81, height=56, width=84), random_frames(5, num_frames=8, height=56, width=84)
    with pytest.raises(BatchError) as caught:
        reward.score([long, short], PROMPT)
    assert sorted(caught.value.failures) == [0]  # the short one still scores
    message = str(caught.value.failures[0])
    assert "#0" in message and "81" in message and "max_frames=48" in message and "video_fps=" in message
    video_module._assumed_logged.clear()
    with caplog.at_level("WARNING", logger="finger_reward.video"):
        reward.score([short, short], PROMPT)
    assert sum("no video_fps" in r.getMessage() for r in caplog.records) == 1  # the assumption, logged once
    # one rate per video; None where unknown
    first, second = reward.score([long, short], PROMPT, video_fps=[16, None])
    assert first.sampled["frames"] == 10 and second.sampled == {"frames": 8, "fps": 2.0, "height": 56, "width": 84}
    with pytest.raises(ValueError, match="video_fps must be one frame rate or a list of 2"):
        reward.score([long, short], PROMPT, video_fps=[16])
    with pytest.raises(ValueError, match=r"video_fps\[1\]=0"):
        reward.score([long, short], PROMPT, video_fps=[16, 0])


def test_submit_and_call_take_video_fps(reward):
    from tests.conftest import random_frames

    frames = random_frames(6, num_frames=33, height=56, width=84)
    want = reward.score([frames], PROMPT, video_fps=16)[0]
    assert want.sampled["frames"] == 4  # 33 frames at 16 fps: 2.06 s -> 4 frames at 2 fps
    assert reward([frames], PROMPT, video_fps=16) == [want.overall]
    assert reward.submit(frames, PROMPT, video_fps=16).result(timeout=60).overall == want.overall
    reward.close()
