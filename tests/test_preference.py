"""VQ-Insight's preference comparison: the two-video prompt, FingerReward.compare, preference rows and their GRPO recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from trl import TrlParser

from finger_reward import FingerReward, prompts
from finger_reward.engine import TransformersEngine
from finger_reward.engine.inputs import patch_factor, processor_inputs
from finger_reward.errors import VideoError
from finger_reward.instruct import InstructError, VideoSFTCollator
from finger_reward.preference import (PreferenceRecord, load_preference, load_training_records, p_first_better,
                                      pair_max_frames)
from finger_reward.questions.record import DIMENSIONS
from finger_reward.rewards import format_reward, preference_reward
from finger_reward.rope import RopeLayout, rope_positions, with_rope_positions
from finger_reward.trainers.grpo import GRPORecipe, VideoGRPOTrainer
from finger_reward.video import load_video

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PROMPT = "a red ball rolls across a table"
MAX_FRAMES = 8  # per pair: 4 frames per video
GOOD_A = "<reason>Video A is sharper and steadier.</reason><answer>A</answer>"


@pytest.fixture(scope="module")
def reward(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    return FingerReward(TransformersEngine(model, processor), max_frames=MAX_FRAMES)


def _clips(processor, *paths, max_frames=MAX_FRAMES):
    return tuple(load_video(p, max_frames=pair_max_frames(max_frames), patch_factor=patch_factor(processor)) for p in paths)


def _pair_text(processor, question, mode="answer"):
    split = prompts.split_prompt(processor, mode, pair=True)
    return split.prefix + split.text_after_video(question)


def _one_token_ids(tokenizer, letter):
    ids = [tokenizer.encode(s, add_special_tokens=False) for s in (letter, " " + letter)]
    return sorted({i[0] for i in ids if len(i) == 1})


# ---- the two-video prompt -------------------------------------------------------------------------


def test_pair_prompt_holds_both_videos_with_their_rope_positions(tiny_model_and_processor, mp4_paths):
    model, processor = tiny_model_and_processor
    a, b = _clips(processor, mp4_paths[0], mp4_paths[1])
    inputs = processor_inputs(processor, _pair_text(processor, prompts.pair_question("visual_quality", PROMPT)), (a, b))
    ids = inputs["input_ids"][0]
    text = processor.tokenizer.decode(ids)
    assert text.count("<|vision_start|>") == 2 and text.index("Video A:") < text.index("Video B:")
    assert text.index("Video B:") < text.index("Which video is better in visual quality")
    grids = inputs["video_grid_thw"]
    assert grids.shape[0] == 2 and not torch.equal(grids[0], grids[1])  # two sizes: one row per video, in order
    merge = processor.video_processor.merge_size ** 2
    assert int((ids == processor.video_token_id).sum()) == int(grids.prod(-1).sum()) // merge

    layout = RopeLayout.from_config(model.config)
    pair_pos, _ = rope_positions(layout, inputs["input_ids"], video_grid_thw=grids,
                                 second_per_grid_ts=inputs["second_per_grid_ts"])
    video = (ids == processor.video_token_id).nonzero().flatten().tolist()
    n_a = int(grids[0].prod()) // merge
    blocks = [video[:n_a], video[n_a:]]
    assert blocks[1][0] > blocks[0][-1] + 1  # "Video B:" text between the blocks
    for k, (clip, block) in enumerate(zip((a, b), blocks)):
        pos = pair_pos[:, 0, block]
        before, after = pair_pos[:, 0, block[0] - 1], pair_pos[:, 0, block[-1] + 1]
        # Each block starts one past the text before it and the text after it resumes one past the block's maximum
        # (the original rule, not transformers 5.x's), so Video B sits after all of Video A.
        assert (pos.min(1).values == before + 1).all() and (after == pos.max() + 1).all()
        # The block's own layout is the one it has when its video is scored alone.
        alone = processor_inputs(processor, prompts.split_prompt(processor).prefix, clip)
        alone_ids = alone["input_ids"][0]
        alone_pos, _ = rope_positions(layout, alone["input_ids"], video_grid_thw=alone["video_grid_thw"],
                                      second_per_grid_ts=alone["second_per_grid_ts"])
        alone_block = alone_pos[:, 0, alone_ids == processor.video_token_id]
        assert torch.equal(pos - pos.min(1, keepdim=True).values, alone_block - alone_block.min(1, keepdim=True).values)
    assert pair_pos[0, 0, blocks[1]].min() > pair_pos[0, 0, blocks[0]].max()


def test_pair_question_and_prompt_errors(tiny_model_and_processor):
    _, processor = tiny_model_and_processor
    assert all(prompts.PAIR_ASPECTS[d].split(" (")[0] in prompts.pair_question(d, PROMPT) for d in DIMENSIONS)
    with pytest.raises(ValueError, match="not one of"):
        prompts.pair_question("sharpness", PROMPT)
    reason = prompts.split_prompt(processor, "reason", pair=True)
    assert "<answer></answer>" in reason.prefix and reason.prefix.count(processor.video_token) == 2


# ---- compare ------------------------------------------------------------------------------------


def test_compare_equals_the_answer_logits_of_a_full_forward(reward, tiny_model_and_processor, mp4_paths):
    model, processor = tiny_model_and_processor
    result = reward.compare(mp4_paths[0], mp4_paths[1], PROMPT, both_orders=False)
    assert list(result.dimensions) == list(DIMENSIONS)
    assert all(0.0 <= p <= 1.0 for p in result.dimensions.values())
    a_ids, b_ids = _one_token_ids(processor.tokenizer, "A"), _one_token_ids(processor.tokenizer, "B")
    clips = _clips(processor, mp4_paths[0], mp4_paths[1])
    for dim in DIMENSIONS:
        inputs = processor_inputs(processor, _pair_text(processor, prompts.pair_question(dim, PROMPT)), clips)
        with torch.no_grad():
            logits = model(**with_rope_positions(model.config, inputs)).logits[0, -1]
        p = logits[a_ids + b_ids].softmax(-1)[: len(a_ids)].sum().item()
        assert result.dimensions[dim] == pytest.approx(p, abs=1e-5), dim
    weights = reward.weights
    assert result.overall == pytest.approx(sum(weights[d] * result.dimensions[d] for d in DIMENSIONS))
    assert result.preferred == ("A" if result.overall > 0.5 else "B")


def test_swapping_the_videos(reward, mp4_paths):
    a, b = mp4_paths[0], mp4_paths[1]
    ab, ba = (reward.compare(x, y, PROMPT, both_orders=False) for x, y in ((a, b), (b, a)))
    assert any(abs(ab.dimensions[d] - ba.dimensions[d]) > 1e-4 for d in DIMENSIONS), "the order of the videos is ignored"
    both, swapped = reward.compare(a, b, PROMPT), reward.compare(b, a, PROMPT)
    assert both.both_orders and swapped.both_orders
    for d in DIMENSIONS:
        assert both.dimensions[d] == pytest.approx(1 - swapped.dimensions[d], abs=1e-6)
        assert both.dimensions[d] == pytest.approx((ab.dimensions[d] + 1 - ba.dimensions[d]) / 2, abs=1e-5)
    assert both.overall == pytest.approx(1 - swapped.overall, abs=1e-6)


def test_batched_compare_equals_single(reward, mp4_paths):
    pairs = [(mp4_paths[0], mp4_paths[1]), (mp4_paths[2], mp4_paths[0])]
    batched = reward.compare_many(pairs, ["p one", "p two"], dimensions=["visual_quality", "text_alignment"],
                                  both_orders=False)
    for (a, b), prompt, result in zip(pairs, ["p one", "p two"], batched):
        single = reward.compare(a, b, prompt, dimensions=["visual_quality", "text_alignment"], both_orders=False)
        assert list(result.dimensions) == ["visual_quality", "text_alignment"] and result.video_a == str(a)
        for d, p in single.dimensions.items():
            assert result.dimensions[d] == pytest.approx(p, abs=1e-5)


def test_reason_mode_compare_gives_a_reason_per_order(tiny_model_and_processor, mp4_paths):
    model, processor = tiny_model_and_processor
    reward = FingerReward(TransformersEngine(model, processor, mode="reason", max_new_tokens=4), max_frames=MAX_FRAMES)
    result = reward.compare(mp4_paths[0], mp4_paths[1], PROMPT, dimensions=["dynamic_degree"])
    assert set(result.reasons) == {"dynamic_degree"} and len(result.reasons["dynamic_degree"]) == 2
    assert 0.0 <= result.dimensions["dynamic_degree"] <= 1.0


def test_a_bad_video_fails_with_its_name(reward, mp4_paths, tmp_path):
    missing = tmp_path / "missing.mp4"
    with pytest.raises(VideoError, match=r"video_b \(.*missing\.mp4\)"):
        reward.compare(mp4_paths[0], str(missing), PROMPT)
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"not a video at all" * 50)
    with pytest.raises(VideoError, match=r"video_a \(.*corrupt\.mp4\)"):
        reward.compare(str(corrupt), mp4_paths[0], PROMPT)
    with pytest.raises(VideoError, match=r"video_b .* of pair #1"):
        reward.compare_many([(mp4_paths[0], mp4_paths[1]), (mp4_paths[0], str(missing))], PROMPT)
    with pytest.raises(ValueError, match="dimensions"):
        reward.compare(mp4_paths[0], mp4_paths[1], PROMPT, dimensions=["sharpness"])


def test_p_first_better_averages_orders():
    ab, ba = torch.tensor([[0.8, 0.2], [0.3, 0.7]]), torch.tensor([[0.6, 0.4], [0.1, 0.9]])
    assert p_first_better(ab).tolist() == pytest.approx([0.8, 0.3])
    assert p_first_better(ab, ba).tolist() == pytest.approx([(0.8 + 0.4) / 2, (0.3 + 0.9) / 2])
    assert p_first_better(ba, ab).tolist() == pytest.approx([1 - 0.6, 1 - 0.6])
    with pytest.raises(ValueError, match="different questions"):
        p_first_better(ab, ba[:1])


# ---- preference rows ------------------------------------------------------------------------------


def _write_pairs(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _row(mp4_paths, **over):
    return {"prompt": PROMPT, "dimension": "visual_quality", "video": str(mp4_paths[0]), "video_b": str(mp4_paths[1]),
            "preferred": "A", "reason": "Video A is sharper.", **over}


def test_preference_rows_load_with_clear_errors(mp4_paths, tmp_path):
    path = _write_pairs(tmp_path / "pairs.jsonl", [_row(mp4_paths), _row(mp4_paths, preferred="Video B", dimension="dynamic_degree")])
    records = load_training_records(path)
    assert [type(r) for r in records] == [PreferenceRecord] * 2 and [r.preferred for r in records] == ["A", "B"]
    assert records[1].question == prompts.pair_question("dynamic_degree", PROMPT) and records[0].answer == "A"
    for bad, field in [({"preferred": "tie"}, "preferred"), ({"dimension": "sharpness"}, "dimension"),
                       ({"video_b": str(tmp_path / "gone.mp4")}, "video_b"), ({"video_b": None}, "video_b")]:
        bad_path = _write_pairs(tmp_path / "bad.jsonl", [_row(mp4_paths), _row(mp4_paths, **bad)])
        with pytest.raises(InstructError, match=rf"bad\.jsonl.*line 2.*'{field}'"):
            load_preference(bad_path)
    row = _row(mp4_paths)
    del row["preferred"]
    with pytest.raises(InstructError, match="line 1.*missing field.*preferred"):
        load_preference(_write_pairs(tmp_path / "bad.jsonl", [row]))


def test_format_reward_on_preference_rows():
    completions = [GOOD_A, "<reason>x</reason><answer>Video A</answer>", "<reason>x</reason><answer>Yes</answer>",
                   "<reason>Sharp, yes.</reason><answer>B</answer>", "<reason>fine</reason><answer>Yes</answer>"]
    assert format_reward(completions, preferred=["A", "A", "B", "A", None]) == [1.0, 0.0, 0.0, 1.0, 1.0]
    assert format_reward(completions) == [0.0, 0.0, 1.0, 0.0, 1.0]  # no preference column: FingER's Yes/No format


def test_collator_builds_the_pair_prompt(tiny_model_and_processor, mp4_paths, tmp_path):
    _, processor = tiny_model_and_processor
    (record,) = load_preference(_write_pairs(tmp_path / "pairs.jsonl", [_row(mp4_paths)]))
    collator = VideoSFTCollator(processor, "reason", max_frames=MAX_FRAMES)
    assert collator.prompt_text(record) == _pair_text(processor, record.question, "reason")
    a, b = collator.load_clip(record)
    assert a.frames.shape[0] <= pair_max_frames(MAX_FRAMES) and b.name.startswith(str(mp4_paths[1]))
    batch = collator([record])  # SFT on a preference record: <reason>...</reason><answer>A</answer> after the pair prompt
    assert batch["video_grid_thw"].shape[0] == 2
    labels = batch["labels"][0][batch["labels"][0] != -100]
    assert processor.tokenizer.decode(labels).startswith("<reason>Video A is sharper.</reason><answer>A</answer>")


# ---- GRPO with the preference recipe ----------------------------------------------------------------


def test_recipe_parses_with_vqinsight_values():
    (recipe,) = TrlParser([GRPORecipe]).parse_args_and_config(
        ["--config", str(CONFIGS / "grpo_vqinsight_preference.yaml"), "--data", "pairs.jsonl"])
    assert recipe.reward_funcs == ["preference_reward", "format_reward"] and not recipe.temporal_shuffle
    assert (recipe.num_generations, recipe.beta, recipe.learning_rate) == (8, 0.001, 1e-6)


def test_grpo_step_with_the_preference_recipe(tiny_model_dir, mp4_paths, tmp_path):
    data = _write_pairs(tmp_path / "pairs.jsonl", [_row(mp4_paths), _row(mp4_paths, preferred="B", video=str(mp4_paths[2]))])
    out = tmp_path / "out"
    (recipe,) = TrlParser([GRPORecipe]).parse_args_and_config(
        ["--config", str(CONFIGS / "grpo_vqinsight_preference.yaml"), "--model", str(tiny_model_dir), "--data", str(data),
         "--output_dir", str(out), "--num_generations", "3", "--max_completion_length", "8", "--max_steps", "1",
         "--max_frames", str(MAX_FRAMES), "--logging_steps", "1", "--gradient_checkpointing", "false", "--bf16", "false",
         "--learning_rate", "1e-3"])
    trainer = VideoGRPOTrainer(recipe)
    assert [f.__name__ for f in trainer.reward_funcs] == ["preference_reward", "format_reward"]
    record = trainer.records[1]
    batch = trainer.rollout(record)
    # Every row carries both videos: two grid rows per completion, both in the prompt.
    assert batch["video_grid_thw"].shape[0] == 2 * 3
    prompt = trainer.tokenizer.decode(batch["input_ids"][0, : batch["prompt_length"]])
    assert prompt.count("<|vision_start|>") == 2 and record.question in prompt
    texts = [row["completion"] for row in batch["log"]]
    assert [row["preference_reward"] for row in batch["log"]] == preference_reward(texts, preferred=["B"] * 3)
    assert [row["format_reward"] for row in batch["log"]] == format_reward(texts, preferred=["B"] * 3)
    assert all(row["video_b"] == str(mp4_paths[1]) and row["preferred"] == "B" for row in batch["log"])
    # The reward path itself: a gold two-video answer scores 1 + 1, the other video 0 + 1, garbage 0 + 0.
    gold = GOOD_A.replace("<answer>A", "<answer>B")
    rewards, per_func, _, _ = trainer.score(record, [gold, GOOD_A, "garbage"], [[1], [2], [3]])
    assert per_func["preference_reward"].tolist() == [1.0, 0.0, 0.0] and rewards.tolist() == [2.0, 1.0, 0.0]

    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 1 and "rewards/preference_reward/mean" in log[-1]
    rows = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    for row in rows:
        assert row["preference_reward"] == preference_reward([row["completion"]], preferred=[row["preferred"]])[0]
    changed = any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
    assert changed or all(row["advantage"] == 0 for row in rows)
