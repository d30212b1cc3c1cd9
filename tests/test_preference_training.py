"""Preference pairs wherever the evaluator trains: mixed question/preference files, SFT on pairs, the cool-off of
preference rollouts, and a GRPO step on a mixed file with accuracy, preference and format rewards."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from finger_reward.instruct import InstructError, InstructRecord, completion_text
from finger_reward.preference import PreferenceRecord, check_reward_kinds, load_preference, load_training_records
from finger_reward.rewards import accuracy_reward, format_reward, preference_reward

PROMPT = "a red ball rolls across a table"
MAX_FRAMES = 4  # a pair: 2 frames per video


def _question(video, **over) -> dict:
    return {"prompt": PROMPT, "dimension": "dynamic_degree", "entity": "ball", "question": "Does the ball move?",
            "positive": True, "video": str(video), "answer": "Yes", "reason": "The ball rolls from left to right.", **over}


def _pair(video, video_b, **over) -> dict:
    return {"prompt": PROMPT, "dimension": "visual_quality", "video": str(video), "video_b": str(video_b),
            "preferred": "A", "reason": "Video A is sharper.", **over}


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def mixed_path(mp4_paths, tmp_path):
    a, b, c = mp4_paths
    return _write(tmp_path / "mixed.jsonl", [_question(a), _pair(a, b), _question(c, answer="no", question="Is it blurry?",
                                                                                       positive=False),
                                             _pair(c, b, preferred="Video B", reason="Video B moves more smoothly.")])


# ---- loading -------------------------------------------------------------------------------------


def test_a_mixed_file_loads_in_order_with_line_errors(mixed_path, mp4_paths, tmp_path):
    records = load_training_records(mixed_path, mode="reason")
    assert [type(r) for r in records] == [InstructRecord, PreferenceRecord, InstructRecord, PreferenceRecord]
    assert [r.answer for r in records] == ["Yes", "A", "No", "B"]
    assert [r.source for r in records] == [f"{mixed_path}, line {i}" for i in range(1, 5)]
    # Errors name the file, line and field whichever kind the line is.
    lines = mixed_path.read_text().splitlines()
    bad_pair = _write(tmp_path / "bad.jsonl", [json.loads(lines[0]), _pair(*mp4_paths[:2], reason="")])
    with pytest.raises(InstructError, match=r"bad\.jsonl, line 2: field 'reason' is empty"):
        load_training_records(bad_pair, mode="reason")
    assert len(load_training_records(bad_pair)) == 2  # answer mode needs no reason
    bad_question = _write(tmp_path / "bad.jsonl", [json.loads(lines[1]), _question(mp4_paths[0], answer="maybe")])
    with pytest.raises(InstructError, match=r"bad\.jsonl, line 2: field 'answer' must be 'Yes' or 'No'"):
        load_training_records(bad_question)
    # load_preference reads pairs only: a question line is named as a pair without video_b.
    with pytest.raises(InstructError, match=r"mixed\.jsonl, line 1: missing field\(s\) video_b"):
        load_preference(mixed_path)


# ---- rewards on mixed rows -----------------------------------------------------------------------

YES = "<reason>The ball rolls.</reason><answer>Yes</answer>"
PICK_A = "<reason>Video A is sharper.</reason><answer>A</answer>"


def test_each_reward_is_none_on_the_other_kinds_rows():
    completions = [YES, PICK_A, YES, PICK_A]
    columns = {"answer": ["Yes", None, "No", None], "preferred": [None, "A", None, "B"]}
    assert accuracy_reward(completions, **columns) == [1.0, None, 0.0, None]
    assert preference_reward(completions, **columns) == [None, 1.0, None, 0.0]
    assert format_reward(completions, **columns) == [1.0, 1.0, 1.0, 1.0]
    # A preference row's answer (as GRPO's log writes it) is not read by accuracy_reward.
    assert accuracy_reward([PICK_A], answer=["A"], preferred=["A"]) == [None]
    # One kind only, as the evaluator's GRPO passes a group's columns: the other reward is None throughout.
    assert accuracy_reward([PICK_A, YES], preferred=["A", "B"]) == [None, None]
    assert preference_reward([YES, PICK_A], answer=["Yes", "No"]) == [None, None]
    # A question row still needs its answer, and a reward with no column of its own still raises.
    with pytest.raises(KeyError, match="accuracy_reward needs the dataset column 'answer'"):
        accuracy_reward(completions, preferred=[None, "A", None, "B"])
    with pytest.raises(KeyError, match="preference_reward needs the dataset column 'preferred'"):
        preference_reward(completions, other_column=[1] * 4)
    with pytest.raises(ValueError, match="4 completions but 3 values in column 'preferred'"):
        accuracy_reward(completions, answer=["Yes"] * 4, preferred=[None] * 3)


def test_a_reward_no_record_can_use_fails_at_start(mixed_path, tmp_path, mp4_paths):
    records = load_training_records(mixed_path)
    check_reward_kinds([accuracy_reward, preference_reward, format_reward], records)  # both kinds present
    questions, pairs = [r for r in records if isinstance(r, InstructRecord)], [r for r in records if isinstance(r, PreferenceRecord)]
    check_reward_kinds([preference_reward, format_reward], pairs)
    with pytest.raises(ValueError, match=r"preference_reward .* q\.jsonl holds no preference lines"):
        check_reward_kinds([accuracy_reward, preference_reward], questions, data="q.jsonl")
    with pytest.raises(ValueError, match="accuracy_reward .* holds no Yes/No question lines"):
        check_reward_kinds([accuracy_reward, format_reward], pairs)


# ---- SFT on preference rows ----------------------------------------------------------------------


def _sft_recipe(tiny_model_dir, data, out, **over):
    from finger_reward.trainers.sft import SFTRecipe

    options = dict(model=str(tiny_model_dir), data=str(data), output_dir=str(out), per_device_train_batch_size=2,
                   max_steps=1, learning_rate=1e-3, save_steps=100, logging_steps=1, bf16=False, mode="reason",
                   max_frames=MAX_FRAMES, gradient_checkpointing=False)
    return SFTRecipe(**{**options, **over})


@pytest.mark.parametrize("mode", ["reason", "answer"])
def test_sft_step_on_preference_rows_learns_the_pair_completion(tiny_model_dir, mixed_path, tmp_path, mode):
    from finger_reward.trainers.sft import build_trainer

    trainer = build_trainer(_sft_recipe(tiny_model_dir, mixed_path, tmp_path / "out", mode=mode))
    records = load_training_records(mixed_path)
    rows = [trainer.train_dataset[i] for i in range(len(records))]  # dict rows, as the data loader yields them
    assert rows[0]["video_b"] is None and rows[1]["entity"] is None  # one Dataset over both kinds
    collator, tokenizer = trainer.data_collator, trainer.processing_class.tokenizer
    batch = collator(rows[:2])  # a question row and a preference row in one batch
    expected = {"reason": "<reason>Video A is sharper.</reason><answer>A</answer>", "answer": "A"}[mode]
    for i, record in enumerate(records[:2]):
        labels = batch["labels"][i][batch["labels"][i] != -100]
        assert tokenizer.decode(labels) == completion_text(record, mode) + collator.end_of_turn
    pair_labels = batch["labels"][1][batch["labels"][1] != -100]
    assert tokenizer.decode(pair_labels) == expected + "<|im_end|>"
    prompt = tokenizer.decode(batch["input_ids"][1][batch["labels"][1] == -100][: int(batch["attention_mask"][1].sum())])
    assert prompt.count("<|vision_start|>") == 2 and records[1].question in prompt
    assert batch["video_grid_thw"].shape[0] == 3  # one video for the question, two for the pair

    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.state.global_step == 1 and math.isfinite(trainer.state.log_history[0]["loss"])
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())


def test_sft_reads_a_file_of_pairs_only(tiny_model_dir, mp4_paths, tmp_path):
    from finger_reward.trainers.sft import instruct_dataset

    path = _write(tmp_path / "pairs.jsonl", [_pair(*mp4_paths[:2]), _pair(*mp4_paths[1:], preferred="B")])
    dataset = instruct_dataset(str(path), "reason")
    assert dataset["preferred"] == ["A", "B"] and "entity" not in dataset.column_names
    with pytest.raises(InstructError, match="line 2: field 'reason' is empty"):
        instruct_dataset(str(_write(tmp_path / "p.jsonl", [_pair(*mp4_paths[:2]), _pair(*mp4_paths[:2], reason=" ")])), "reason")


# ---- GRPO on a mixed file, and the cool-off of its rollouts --------------------------------------


def _grpo_trainer(tiny_model_dir, data, out, **over):
    from finger_reward.trainers.grpo import GRPORecipe, VideoGRPOTrainer

    options = dict(model=str(tiny_model_dir), data=str(data), output_dir=str(out), num_generations=3,
                   max_completion_length=8, max_steps=1, learning_rate=1e-3, logging_steps=1, save_steps=100,
                   max_frames=MAX_FRAMES, seed=0, bf16=False, gradient_checkpointing=False,
                   reward_funcs=["accuracy_reward", "preference_reward", "format_reward"])
    return VideoGRPOTrainer(GRPORecipe(**{**options, **over}))


def test_grpo_step_on_a_mixed_file_scores_each_row_by_its_own_rewards(tiny_model_dir, mp4_paths, tmp_path):
    a, b, _ = mp4_paths
    data = _write(tmp_path / "mixed.jsonl", [_question(a), _pair(a, b, preferred="B")])
    out = tmp_path / "out"
    # Two groups per step: the question and the pair both roll out in the one step.
    trainer = _grpo_trainer(tiny_model_dir, data, out, per_device_train_batch_size=2)
    question, pair = trainer.records
    # The reward path itself on chosen completions: each reward only on its own kind, summed per row.
    rewards, per_func, _, _ = trainer.score(pair, [PICK_A.replace(">A<", ">B<"), PICK_A, "garbage"], [[1], [2], [3]])
    assert per_func["accuracy_reward"].isnan().all() and per_func["preference_reward"].tolist() == [1.0, 0.0, 0.0]
    assert rewards.tolist() == [2.0, 1.0, 0.0]
    rewards, per_func, _, _ = trainer.score(question, [YES, YES.replace("Yes", "No"), "garbage"], [[1], [2], [3]])
    assert per_func["preference_reward"].isnan().all() and per_func["accuracy_reward"].tolist() == [1.0, 0.0, 0.0]
    assert rewards.tolist() == [2.0, 1.0, 0.0]

    trainer.train()
    rows = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    kinds = ["preferred" in row for row in rows]
    assert sorted(kinds) == [False] * 3 + [True] * 3
    for row in rows:
        text, preferred = [row["completion"]], row.get("preferred")
        if preferred is None:  # a question row: accuracy applies, preference does not
            assert row["preference_reward"] is None
            assert row["accuracy_reward"] == accuracy_reward(text, answer=[row["answer"]])[0]
        else:
            assert row["accuracy_reward"] is None
            assert row["preference_reward"] == preference_reward(text, preferred=[preferred])[0]
        assert row["format_reward"] == format_reward(text, preferred=[preferred])[0]
        assert row["reward"] == sum(row[name] for name in ("accuracy_reward", "preference_reward", "format_reward")
                                    if row[name] is not None)
    (log,) = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    for name, own in (("accuracy_reward", False), ("preference_reward", True)):
        values = [row[name] for row, kind in zip(rows, kinds) if kind == own]
        assert log[f"rewards/{name}/mean"] == pytest.approx(sum(values) / len(values))  # not NaN: the other group left out
    assert log["reward"] == pytest.approx(sum(row["reward"] for row in rows) / len(rows))


def test_grpo_refuses_preference_reward_without_pairs(tiny_model_dir, mp4_paths, tmp_path):
    data = _write(tmp_path / "questions.jsonl", [_question(mp4_paths[0])])
    with pytest.raises(ValueError, match=r"preference_reward .*questions\.jsonl holds no preference lines"):
        _grpo_trainer(tiny_model_dir, data, tmp_path / "out")


def test_cooloff_keeps_exactly_the_correct_rollouts_of_both_kinds(tiny_model_dir, mp4_paths, tmp_path):
    from finger_reward.trainers.cooloff import write_cooloff
    from finger_reward.trainers.sft import instruct_dataset

    a, b, _ = mp4_paths
    trainer = _grpo_trainer(tiny_model_dir, _write(tmp_path / "mixed.jsonl", [_question(a), _pair(a, b, preferred="B")]),
                            tmp_path / "out", num_generations=2, max_completion_length=4)
    question, pair = trainer.records
    q_row, p_row = trainer.rollout(question)["log"][0], trainer.rollout(pair)["log"][0]  # rows as GRPO logs them
    edits = [
        (q_row, "<reason>The ball rolls on.</reason><answer>yes</answer>", True),
        (q_row, "<reason>The ball rolls on.</reason><answer>No</answer>", False),  # wrong answer
        (p_row, "<reason>Video B is steadier, yes.</reason><answer>B</answer>", True),  # a pair's reason may say yes
        (p_row, " <reason>B keeps its edges.</reason>\n<answer>B</answer> ", True),
        (p_row, "<reason>Video A is steadier.</reason><answer>A</answer>", False),  # the other video
        (p_row, "<reason>Video B is steadier.</reason><answer>Video B</answer>", False),  # right video, not the A/B token
        (p_row, "B", False),  # no tags
    ]
    rows = [{**row, "completion": text} for row, text, _ in edits]
    path = _write(tmp_path / "completions.jsonl", rows)
    out = write_cooloff(path, tmp_path / "cooloff.jsonl")
    written = load_training_records(out, mode="reason")
    kept = [(row, text) for row, text, good in edits if good]
    assert len(written) == len(kept)
    for got, (row, text) in zip(written, kept):
        reason = text.split("<reason>")[1].split("</reason>")[0].strip()
        source = question if row is q_row else pair
        assert got == type(source)(**{**source.to_dict(), "reason": reason})
        assert format_reward([completion_text(got, "reason")], preferred=[getattr(got, "preferred", None)]) == [1.0]
    # The SFT loader reads the file back: question and preference rows in one Dataset.
    dataset = instruct_dataset(str(out), "reason")
    assert dataset["preferred"] == [None, "B", "B"] and dataset["video_b"][1] == os.path.abspath(b)
