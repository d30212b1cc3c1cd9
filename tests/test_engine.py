"""The shared-prefix engine equals the plain one-question-per-forward loop on the real architecture."""

import pytest
import torch

from finger_reward.engine import TransformersEngine
from finger_reward.engine.transformers_backend import extract_reason
from finger_reward.video import load_video

QUESTIONS = [
    "Is the red circle moving from left to right?",
    "Does the video flicker?",
    "Is there a blue square in the video at all times?",
    "Yes or no: is the background dark?",
    "Does the object pass through the wall?",
]


@pytest.fixture(scope="module")
def clips(mp4_paths):
    # Different frame counts (odd ones get padded by the processor) and aspect ratios.
    return [load_video(p, name=str(p)) for p in mp4_paths] + [
        load_video(torch.rand(5, 3, 40, 150, generator=torch.Generator().manual_seed(1)), name="tensor")
    ]


def engines(tiny_model_and_processor, **kw):
    model, processor = tiny_model_and_processor
    return TransformersEngine(model, processor, **kw), TransformersEngine(model, processor, share_prefix=False, **kw)


def test_shared_prefix_equals_plain_forward(tiny_model_and_processor, clips):
    shared, plain = engines(tiny_model_and_processor)
    for clip in clips:
        fast, slow = shared.answer(clip, QUESTIONS).probs, plain.answer(clip, QUESTIONS).probs
        assert fast.shape == (len(QUESTIONS), 2)
        torch.testing.assert_close(fast, slow, atol=1e-4, rtol=0)
        torch.testing.assert_close(fast.sum(-1), torch.ones(len(QUESTIONS)))
    # The tiny model must react to the question and to the video, or the comparison proves nothing.
    assert fast[:, 0].std() > 1e-2
    first_clip = shared.answer(clips[0], QUESTIONS).probs
    assert (first_clip - fast).abs().max() > 1e-3


def test_question_chunks_do_not_change_results(tiny_model_and_processor, clips):
    model, processor = tiny_model_and_processor
    whole = TransformersEngine(model, processor).answer(clips[1], QUESTIONS).probs
    chunked = TransformersEngine(model, processor, question_batch_size=2).answer(clips[1], QUESTIONS).probs
    torch.testing.assert_close(whole, chunked, atol=1e-5, rtol=0)


def test_reason_mode_matches_per_question_generate(tiny_model_and_processor, clips):
    shared, plain = engines(tiny_model_and_processor, mode="reason", max_new_tokens=12)
    for clip in clips[:2]:
        fast, slow = shared.answer(clip, QUESTIONS), plain.answer(clip, QUESTIONS)
        assert fast.reasons == slow.reasons  # greedy decoding, token for token
        assert all(isinstance(r, str) and r for r in fast.reasons)
        torch.testing.assert_close(fast.probs, slow.probs, atol=1e-4, rtol=0)
        torch.testing.assert_close(fast.probs.sum(-1), torch.ones(len(QUESTIONS)))


def test_reason_mode_probabilities_differ_from_answer_mode(tiny_model_and_processor, clips):
    model, processor = tiny_model_and_processor
    answer = TransformersEngine(model, processor).answer(clips[0], QUESTIONS[:2])
    reason = TransformersEngine(model, processor, mode="reason", max_new_tokens=4).answer(clips[0], QUESTIONS[:2])
    assert answer.reasons is None and len(reason.reasons) == 2
    assert (answer.probs - reason.probs).abs().max() > 1e-4


@pytest.fixture(scope="module")
def tiny_qwen3_vl():
    from finger_reward.tiny import build_model, build_processor

    processor = build_processor(arch="qwen3_vl")
    return build_model(processor.tokenizer, arch="qwen3_vl"), processor


@pytest.mark.parametrize("mode", ["answer", "reason"])
def test_qwen3_vl_shared_prefix_equals_plain(tiny_qwen3_vl, mode):
    shared, plain = engines(tiny_qwen3_vl, mode=mode, max_new_tokens=6)
    assert shared.patch_factor == 32  # Qwen3-VL: 16-pixel patches, 2x2 merge
    clip = load_video(torch.rand(6, 3, 64, 96, generator=torch.Generator().manual_seed(2)),
                      patch_factor=shared.patch_factor, name="qwen3")
    fast, slow = shared.answer(clip, QUESTIONS), plain.answer(clip, QUESTIONS)
    torch.testing.assert_close(fast.probs, slow.probs, atol=1e-4, rtol=0)
    assert fast.reasons == slow.reasons
    assert fast.probs[:, 0].std() > 1e-2


def test_no_questions(tiny_model_and_processor, clips):
    shared, _ = engines(tiny_model_and_processor)
    assert shared.answer(clips[0], []).probs.shape == (0, 2)


@pytest.mark.parametrize(
    "text, reason",
    [
        ("<reason>The circle is red.</reason><answer>", "The circle is red."),
        ("<reason>It moves</reason>", "It moves"),
        ("no tags at all", "no tags at all"),
        ("<reason>cut off mid", "cut off mid"),
        ("plain<answer>Yes</answer>", "plain"),
    ],
)
def test_extract_reason(text, reason):
    assert extract_reason(text) == reason


def test_unknown_mode(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    with pytest.raises(ValueError, match="mode='fast'"):
        TransformersEngine(model, processor, mode="fast")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_bf16_matches_cpu(tiny_model_dir, clips):
    gpu = TransformersEngine.from_pretrained(str(tiny_model_dir))
    cpu = TransformersEngine.from_pretrained(str(tiny_model_dir), device="cpu")
    assert gpu.model.dtype == torch.bfloat16
    torch.testing.assert_close(gpu.answer(clips[0], QUESTIONS).probs, cpu.answer(clips[0], QUESTIONS).probs, atol=3e-2, rtol=0)


class OutOfMemoryAbove(TransformersEngine):
    """The real engine, with CUDA out-of-memory injected whenever a forward holds more than `limit` questions."""

    limit = 2
    attempts: list

    def _forward(self, state, pieces):
        questions = sum(map(len, pieces))
        self.attempts.append(questions)
        if questions > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return super()._forward(state, pieces)


@pytest.mark.parametrize("mode", ["answer", "reason"])
def test_out_of_memory_splits_the_batch_and_retries(tiny_model_and_processor, clips, mode, caplog):
    model, processor = tiny_model_and_processor
    whole = TransformersEngine(model, processor, mode=mode, max_new_tokens=4).answer(clips[0], QUESTIONS)
    engine = OutOfMemoryAbove(model, processor, mode=mode, max_new_tokens=4, question_batch_size=5)
    engine.attempts = []
    split = engine.answer(clips[0], QUESTIONS)
    torch.testing.assert_close(split.probs, whole.probs, atol=1e-5, rtol=0)
    assert split.reasons == whole.reasons
    assert engine.attempts[0] == 5 and max(engine.attempts[1:]) <= 2
    assert "retrying with 2" in caplog.text


def test_out_of_memory_on_a_single_question_is_raised(tiny_model_and_processor, clips):
    model, processor = tiny_model_and_processor
    engine = OutOfMemoryAbove(model, processor)
    engine.limit, engine.attempts = 0, []
    with pytest.raises(torch.cuda.OutOfMemoryError):
        engine.answer(clips[0], QUESTIONS[:2])
