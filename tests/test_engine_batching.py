"""Batching across videos: `answer_many` gives every video the result it gets alone, in both modes."""

import copy
import math

import pytest
import torch

from finger_reward.engine import TransformersEngine, budget
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
    engine = TransformersEngine(*tiny_model_and_processor, max_batch_tokens=400)
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


def test_packed_layout_and_mask():
    from finger_reward.engine.packing import PAD, PREFIX, block_mask, lay_out

    # Video 0 continues questions 0 (two tokens) and 2 (one token); video 1 question 1 at offset 3.
    layout = lay_out([[(0, [5, 6], 0), (2, [7], 0)], [(1, [8], 3)]], pad_id=99)
    assert layout.ids.tolist() == [[5, 6, 7], [8, 99, 99]]
    assert layout.seg.tolist() == [[0, 0, 2], [1, PAD, PAD]]
    assert layout.offsets.tolist() == [[0, 1, 0], [3, 0, 0]]
    assert layout.last == ([0, 0, 1], [1, 2, 0])
    # Cached: video 0 has two prefix slots and a padding slot, video 1 a prefix slot then question 1's token.
    cached = torch.tensor([[PREFIX, PREFIX, PAD], [PREFIX, 1, PAD]])
    seen = block_mask(cached, layout.seg, torch.float32)[:, 0] == 0
    assert seen.shape == (2, 3, 6)
    assert seen[0].int().tolist() == [
        [1, 1, 0, 1, 0, 0],  # question 0, first token: the prefix and itself
        [1, 1, 0, 1, 1, 0],  # question 0, second token: also its first
        [1, 1, 0, 0, 0, 1],  # question 2: the prefix and itself, never question 0
    ]
    assert seen[1].int().tolist() == [
        [1, 1, 0, 1, 0, 0],  # question 1 sees its earlier cached token
        [0, 0, 0, 0, 1, 0],  # padding sees only itself
        [0, 0, 0, 0, 0, 1],
    ]


# ---- reason mode across videos --------------------------------------------------------------------

REASON_TOKENS = 8


@pytest.fixture(scope="module")
def stopping_model(tiny_model_and_processor, clips, questions):
    """The tiny model with its end-of-turn logit made 1.05x that of a token that some reasons write and
    others do not: a row ends its reason (at EOS) where it would have written that token, so rows of one
    batch stop at different steps. The token is picked from the unmodified model's own reasons."""
    model, processor = tiny_model_and_processor
    engine = TransformersEngine(model, processor, mode="reason", max_new_tokens=REASON_TOKENS)
    reasons = [r for a in engine.answer_many(clips, questions) for r in a.reasons]
    rows = [set(processor.tokenizer.encode(r, add_special_tokens=False)) for r in reasons]
    counts = {t: sum(t in row for row in rows) for t in set().union(*rows)}
    token = max(counts, key=lambda t: (0 < counts[t] < len(rows), -abs(counts[t] - len(rows) / 2), -t))
    model = copy.deepcopy(model)
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[end] = 1.05 * head[token]
    return model, processor


@pytest.fixture(scope="module")
def plain_reasons(stopping_model, clips, questions):
    """Every question answered by its own `generate` over the full prompt: the reference."""
    plain = TransformersEngine(*stopping_model, mode="reason", max_new_tokens=REASON_TOKENS, share_prefix=False)
    return [plain.answer(clip, qs) for clip, qs in zip(clips, questions)]


def assert_same_reasons(results, expected):
    assert len(results) == len(expected)
    for got, want in zip(results, expected):
        assert got.reasons == want.reasons  # greedy decoding, token for token
        torch.testing.assert_close(got.probs, want.probs, atol=1e-4, rtol=0)


def test_reason_mode_batched_across_videos_equals_per_question_generate(
    tiny_model_and_processor, stopping_model, clips, questions, plain_reasons
):
    engine = TransformersEngine(*stopping_model, mode="reason", max_new_tokens=REASON_TOKENS, max_batch_tokens=10**9)
    assert len(engine._groups(*_group_inputs(engine, clips, questions))) == 1  # one decode for every row
    batched = engine.answer_many(clips, questions)
    assert_same_reasons(batched, plain_reasons)
    assert all(r for a in batched for r in a.reasons)
    # Rows must stop at different steps, or a row that goes on after its batch mates stopped is untested.
    unstopped = TransformersEngine(*tiny_model_and_processor, mode="reason", max_new_tokens=REASON_TOKENS)
    reference = [r for a in unstopped.answer_many(clips, questions) for r in a.reasons]
    stopped = [a != b for a, b in zip((r for a in batched for r in a.reasons), reference)]
    assert any(stopped) and not all(stopped)


@pytest.mark.parametrize("order", [[3, 0], [4, 1, 0, 2]])
def test_reason_result_does_not_depend_on_the_rest_of_the_batch(stopping_model, clips, questions, plain_reasons, order):
    engine = TransformersEngine(*stopping_model, mode="reason", max_new_tokens=REASON_TOKENS, max_batch_tokens=10**9)
    batched = engine.answer_many([clips[i] for i in order], [questions[i] for i in order])
    assert_same_reasons(batched, [plain_reasons[i] for i in order])


def test_reason_mode_out_of_memory_splits_groups_and_questions(stopping_model, clips, questions, plain_reasons, caplog):
    engine = OutOfMemoryAbove3(*stopping_model, mode="reason", max_new_tokens=REASON_TOKENS, max_batch_tokens=10**9)
    engine.attempts = []
    results = engine.answer_many(clips, questions)
    assert_same_reasons(results, plain_reasons)
    assert engine.attempts[0] == sum(map(len, questions))
    assert "videos per batch; splitting into" in caplog.text
    assert "questions per batch; retrying with" in caplog.text


def test_reason_groups_count_the_generated_tokens(tiny_model_and_processor, clips, questions):
    answer = TransformersEngine(*tiny_model_and_processor, max_batch_tokens=400)
    reason = TransformersEngine(*tiny_model_and_processor, mode="reason", max_new_tokens=64, max_batch_tokens=400)
    answer_groups = answer._groups(*_group_inputs(answer, clips, questions))
    reason_groups = reason._groups(*_group_inputs(reason, clips, questions))
    assert len(reason_groups) > len(answer_groups)


# ---- precomputed inputs, token budget, compile ----------------------------------------------------


def test_preprocessed_inputs_give_the_same_answers(tiny_model_and_processor, clips, questions, alone):
    model, processor = tiny_model_and_processor
    engine = TransformersEngine(model, processor)
    inputs = [engine.preprocess(clip) for clip in clips]
    assert all(set(x) >= {"input_ids", "pixel_values_videos", "video_grid_thw"} for x in inputs)
    assert_all_close(engine.answer_many(clips, questions, inputs), alone)
    torch.testing.assert_close(engine.answer(clips[1], questions[1], inputs[1]).probs, alone[1], atol=1e-5, rtol=0)
    assert TransformersEngine(model, processor, share_prefix=False).preprocess(clips[0]) is None
    with pytest.raises(ValueError, match="and 1 preprocessed inputs"):
        engine.answer_many(clips[:2], questions[:2], inputs[:1])


def test_budget_arithmetic():
    # Qwen2.5-VL-7B's decoder in bf16: 28 layers, 4 KV heads of 128, hidden 3584, MLP 18944.
    kv = budget.kv_bytes_per_token(layers=28, kv_heads=4, head_dim=128, dtype_bytes=2)
    assert kv == 2 * 28 * 4 * 128 * 2 == 57_344
    act = budget.activation_bytes_per_token(3584, 18944, 2)
    assert act == 2 * (4 * 3584 + 3 * 18944)
    free = 60 * 2**30
    want = int((free * 0.85 - 2**30) // (kv + act))
    assert budget.batch_tokens_for_memory(free, kv, act) == want
    assert budget.batch_tokens_for_memory(free, kv, act, fraction=0.5) < want
    assert budget.batch_tokens_for_memory(2 * free, kv, act) > 2 * want - 2  # linear in free memory
    assert budget.batch_tokens_for_memory(0, kv, act) == 1024  # a lone video still runs
    with pytest.raises(ValueError, match="fraction"):
        budget.batch_tokens_for_memory(free, kv, act, fraction=0)
    with pytest.raises(ValueError, match="kv_bytes"):
        budget.batch_tokens_for_memory(free, 0, act)


def test_budget_reads_the_model_config(tiny_model_and_processor):
    from transformers import Qwen2_5_VLConfig

    config = Qwen2_5_VLConfig(text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                               num_attention_heads=28, num_key_value_heads=4))
    assert budget.slot_bytes(config, 2) == (57_344, 2 * (4 * 3584 + 3 * 18944))
    model = tiny_model_and_processor[0]
    text = model.config.text_config
    kv, _ = budget.slot_bytes(model.config, 4)
    assert kv == 2 * text.num_hidden_layers * text.num_key_value_heads * text.head_dim * 4


def test_auto_budget_falls_back_on_cpu(tiny_model_and_processor, clips, questions, alone):
    engine = TransformersEngine(*tiny_model_and_processor, max_batch_tokens="auto")
    assert engine.batch_tokens == budget.DEFAULT_BATCH_TOKENS
    assert_all_close(engine.answer_many(clips, questions), alone)
    for bad in (0, -5, "many", 2.5, True):
        with pytest.raises(ValueError, match="max_batch_tokens"):
            TransformersEngine(*tiny_model_and_processor, max_batch_tokens=bad)
    from finger_reward import FingerReward

    model, processor = tiny_model_and_processor
    reward = FingerReward.from_pretrained(model, processor=processor, max_batch_tokens="auto", compile=True)
    assert reward.engine.max_batch_tokens == "auto" and reward.engine._base._orig_mod is model.model


def test_flash_attention_is_refused_with_the_fix(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    flash = copy.deepcopy(model)
    flash.config.text_config._attn_implementation = "flash_attention_2"  # only read, never run: no kernel here
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        TransformersEngine(flash, processor)
    TransformersEngine(flash, processor, share_prefix=False)  # the plain loop needs no custom mask


def test_compile_option_is_accepted(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    compiled = TransformersEngine(model, processor, compile=True)
    assert compiled._base is not model.model and compiled._base._orig_mod is model.model  # wrapped, not changed
    assert TransformersEngine(model, processor)._base is model.model


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU: torch.compile's first call takes minutes on 2 CPU cores")
def test_compiled_engine_equals_eager(tiny_model_dir, clips, questions):
    eager = TransformersEngine.from_pretrained(str(tiny_model_dir))
    compiled = TransformersEngine(eager.model, eager.processor, compile=True)
    for got, want in zip(compiled.answer_many(clips, questions), eager.answer_many(clips, questions)):
        torch.testing.assert_close(got.probs, want.probs, atol=1e-3, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_budget_on_the_gpu_reads_free_memory_and_changes_no_answer(tiny_model_dir, clips, questions):
    """The budget comes from free CUDA memory (not the CPU fallback); answers equal one video at a time (bf16)."""
    engine = TransformersEngine.from_pretrained(str(tiny_model_dir), max_batch_tokens="auto")
    free = torch.cuda.mem_get_info()[0] + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    kv, activation = budget.slot_bytes(engine.model.config, 2)
    assert engine.batch_tokens == budget.batch_tokens_for_memory(free, kv, activation) != budget.DEFAULT_BATCH_TOKENS
    alone = [engine.answer_many([clip], [qs])[0] for clip, qs in zip(clips, questions)]
    for got, want in zip(engine.answer_many(clips, questions), alone):
        torch.testing.assert_close(got.probs, want.probs, atol=2e-2, rtol=0)


def _group_inputs(engine, clips, questions):
    inputs = {i: engine._prefix_inputs(clip) for i, clip in enumerate(clips)}
    suffixes = {i: [engine._suffix_ids(q) for q in qs] for i, qs in enumerate(questions)}
    return inputs, suffixes


class FailingBatches(TransformersEngine):
    """Batches of several videos fail; a video answered alone works."""

    def answer_many(self, clips, questions_per_clip, inputs=None):
        self.batches.append(len(clips))
        raise RuntimeError("batch failed (injected)")


def test_reward_run_batches_across_videos_and_retries_alone(tiny_model_and_processor, mp4_paths, caplog):
    from finger_reward import FingerReward, Question

    questions = [Question("a red ball", "visual_quality", "video", q, True) for q in QUESTIONS]
    engine = TransformersEngine(*tiny_model_and_processor)
    calls = []
    engine.answer_many = lambda clips, *args: calls.append(len(clips)) or TransformersEngine.answer_many(engine, clips, *args)
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
