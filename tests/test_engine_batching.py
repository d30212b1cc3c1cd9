"""Batching across videos: `answer_many` gives every video the result it gets alone."""

import math

import pytest
import torch

from finger_reward.engine import TransformersEngine
from finger_reward.video import load_video
from tests.test_engine import QUESTIONS, OutOfMemoryAbove



@pytest.fixture(scope="module")
def clips(mp4_paths):
    """Clips of different lengths and sizes: three .mp4 files and two tensors with odd frame counts."""
    tensors = [((5, 3, 40, 150), 1), ((7, 3, 90, 60), 2)]
    return [load_video(p, name=str(p)) for p in mp4_paths] + [
        load_video(torch.rand(*shape, generator=torch.Generator().manual_seed(seed)), name=f"tensor{seed}")
        for shape, seed in tensors
    ]


@pytest.fixture(scope="module")
def questions(clips):
    """A different number and mix of questions per clip."""
    return [QUESTIONS[i % 2 :] if i % 3 else QUESTIONS for i in range(len(clips))]


@pytest.fixture(scope="module")
def alone(tiny_model_and_processor, clips, questions):
    """Each video answered by itself, the reference for every batched run."""
    engine = TransformersEngine(*tiny_model_and_processor)
    return [engine.answer(clip, qs).probs for clip, qs in zip(clips, questions)]


def assert_all_close(results, expected):
    assert len(results) == len(expected)
    for got, want in zip(results, expected):
        torch.testing.assert_close(got.probs, want, atol=1e-4, rtol=0)


def test_answer_many_equals_answer_and_plain_loop(tiny_model_and_processor, clips, questions, alone):
    model, processor = tiny_model_and_processor
    engine = TransformersEngine(model, processor, max_batch_tokens=10**9)
    assert len(engine._groups(*_group_inputs(engine, clips, questions))) == 1  # one batch for all
    batched = engine.answer_many(clips, questions)
    assert_all_close(batched, alone)
    plain = TransformersEngine(model, processor, share_prefix=False)
    assert_all_close(batched, [plain.answer(clip, qs).probs for clip, qs in zip(clips, questions)])
    # The videos must differ in their answers, or mixing up cache rows would go unseen.
    assert min((a[0] - b[0]).abs().max() for a, b in zip(alone, alone[1:])) > 1e-3


@pytest.mark.parametrize("order", [[0], [3, 0], [0, 4, 2, 1], [1, 2, 4, 0], [4, 3, 0, 1, 2]])
def test_result_does_not_depend_on_the_rest_of_the_batch(tiny_model_and_processor, clips, questions, alone, order):
    engine = TransformersEngine(*tiny_model_and_processor, max_batch_tokens=10**9)
    batched = engine.answer_many([clips[i] for i in order], [questions[i] for i in order])
    assert_all_close(batched, [alone[i] for i in order])


def test_small_budget_splits_into_groups(tiny_model_and_processor, clips, questions, alone):
    engine = TransformersEngine(*tiny_model_and_processor, max_batch_tokens=1500)
    groups = engine._groups(*_group_inputs(engine, clips, questions))
    assert 1 < len(groups) < len(clips) and any(len(g) > 1 for g in groups)
    lengths = _group_inputs(engine, clips, questions)[0]
    flat = [i for g in groups for i in g]
    assert sorted(flat) == list(range(len(clips)))
    assert [lengths[i]["input_ids"].shape[1] for i in flat] == sorted(x["input_ids"].shape[1] for x in lengths.values())
    assert_all_close(engine.answer_many(clips, questions), alone)
    tiny_budget = TransformersEngine(*tiny_model_and_processor, max_batch_tokens=1)  # every video alone
    assert len(tiny_budget._groups(*_group_inputs(tiny_budget, clips, questions))) == len(clips)
    assert_all_close(tiny_budget.answer_many(clips, questions), alone)


def test_videos_without_questions(tiny_model_and_processor, clips, questions, alone):
    engine = TransformersEngine(*tiny_model_and_processor)
    results = engine.answer_many(clips[:3], [questions[0], [], questions[2]])
    assert results[1].probs.shape == (0, 2)
    assert_all_close([results[0], results[2]], [alone[0], alone[2]])
    assert engine.answer_many([], []) == []
    with pytest.raises(ValueError, match="2 clips but 1"):
        engine.answer_many(clips[:2], [QUESTIONS])


class OutOfMemoryAbove3(OutOfMemoryAbove):
    """Out-of-memory injected whenever a question pass holds more than 3 rows."""

    limit = 3


def test_out_of_memory_splits_the_group_and_retries(tiny_model_and_processor, clips, questions, alone, caplog):
    engine = OutOfMemoryAbove3(*tiny_model_and_processor, max_batch_tokens=10**9)
    engine.attempts = []
    results = engine.answer_many(clips, questions)
    assert_all_close(results, alone)
    assert engine.attempts[0] == sum(map(len, questions))  # the whole batch was tried first
    assert "videos per batch; splitting into" in caplog.text  # groups were split
    assert "questions per batch; retrying with" in caplog.text  # a lone video's questions were split


def test_reason_mode_answers_each_video(tiny_model_and_processor, clips):
    engine = TransformersEngine(*tiny_model_and_processor, mode="reason", max_new_tokens=4)
    many = engine.answer_many(clips[:2], [QUESTIONS[:2], QUESTIONS[:1]])
    for clip, qs, got in zip(clips, [QUESTIONS[:2], QUESTIONS[:1]], many):
        want = engine.answer(clip, qs)
        assert got.reasons == want.reasons
        torch.testing.assert_close(got.probs, want.probs, atol=1e-5, rtol=0)


def _group_inputs(engine, clips, questions):
    inputs = {i: engine._prefix_inputs(clip) for i, clip in enumerate(clips)}
    suffixes = {i: [engine._suffix_ids(q) for q in qs] for i, qs in enumerate(questions)}
    return inputs, suffixes


class FailingBatches(TransformersEngine):
    """Batches of several videos fail; a video answered alone works."""

    def answer_many(self, clips, questions_per_clip):
        self.batches.append(len(clips))
        raise RuntimeError("batch failed (injected)")


def test_reward_run_batches_across_videos_and_retries_alone(tiny_model_and_processor, mp4_paths, caplog):
    from finger_reward import FingerReward, Question

    questions = [Question("a red ball", "visual_quality", "video", q, True) for q in QUESTIONS]
    engine = TransformersEngine(*tiny_model_and_processor)
    calls = []
    engine.answer_many = lambda clips, qs: calls.append(len(clips)) or TransformersEngine.answer_many(engine, clips, qs)
    reward = FingerReward(engine, questions=questions, on_error="nan")
    videos = [*mp4_paths, "missing.mp4"]
    batched = reward.score(videos, "a red ball")
    assert calls == [3]  # the three readable videos in one call
    assert math.isnan(batched[3].overall) and batched[3].error

    failing = FailingBatches(*tiny_model_and_processor)
    failing.batches = []
    alone = FingerReward(failing, questions=questions, on_error="nan").score(videos, "a red ball")
    assert failing.batches == [3] and "answering each alone" in caplog.text
    for a, b in zip(batched[:3], alone[:3]):
        assert a.error is None and abs(a.overall - b.overall) < 1e-4
