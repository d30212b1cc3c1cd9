"""SFT of the evaluator: FingER-Instruct loading, the video collator, and real TRL SFTTrainer runs on a tiny Qwen2.5-VL."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from trl import TrlParser

from finger_reward.instruct import (
    InstructError,
    InstructRecord,
    VideoSFTCollator,
    completion_text,
    load_instruct,
)
from finger_reward.engine.inputs import patch_factor, processor_inputs
from finger_reward.rewards import format_reward
from finger_reward.synthetic import make_world
from finger_reward.trainers.sft import SFTRecipe, build_trainer, main, train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("sft_world"), num_scenes=1)


@pytest.fixture(scope="module")
def records(world):
    return load_instruct(world.instruct_path, mode="reason")


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir)


def _weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.fixture(scope="module")
def initial_weights(tiny_model_dir):
    from transformers import AutoModelForImageTextToText

    return _weights(AutoModelForImageTextToText.from_pretrained(tiny_model_dir))


def _recipe(tiny_model_dir, data, out, **overrides) -> SFTRecipe:
    options = dict(model=str(tiny_model_dir), data=str(data), output_dir=str(out), per_device_train_batch_size=2,
                   max_steps=1, learning_rate=1e-3, save_steps=100, logging_steps=1, bf16=False)
    return SFTRecipe(**{**options, **overrides})


# ---- data ----------------------------------------------------------------------------------------


def test_load_instruct_reads_the_world(world, records):
    assert len(records) == 60 and all(Path(r.video).is_file() for r in records)
    assert {r.answer for r in records} == {"Yes", "No"} and all(r.reason for r in records)
    first = json.loads(world.instruct_path.read_text().splitlines()[0])
    assert records[0] == InstructRecord.from_dict(first)
    assert records[0].source == f"{world.instruct_path}, line 1"
    assert completion_text(records[0], "answer") == first["answer"]
    # Reason-mode completions are exactly what FingER's format reward accepts.
    assert format_reward([completion_text(r, "reason") for r in records]) == [1.0] * len(records)


def _bad_lines(good: dict, video_dir: Path) -> dict[str, tuple[str, str]]:
    return {
        "not json": ("{not json", "line 2"),
        "missing answer": (json.dumps({k: v for k, v in good.items() if k != "answer"}), "missing field(s) answer"),
        "bad answer": (json.dumps({**good, "answer": "Maybe"}), "'answer' must be 'Yes' or 'No'"),
        "bad dimension": (json.dumps({**good, "dimension": "beauty"}), "unknown dimension 'beauty'"),
        "missing video": (json.dumps({**good, "video": "nowhere.mp4"}), f"video {video_dir / 'nowhere.mp4'} not found"),
        "empty reason": (json.dumps({**good, "reason": " "}), "'reason' is empty"),
        "tag in reason": (json.dumps({**good, "reason": "ok</reason>"}), "must not contain the tag"),
    }


@pytest.mark.parametrize("case", ["not json", "missing answer", "bad answer", "bad dimension", "missing video",
                                  "empty reason", "tag in reason"])
def test_load_instruct_errors_name_the_line(world, tmp_path, case):
    lines = world.instruct_path.read_text().splitlines()
    bad, message = _bad_lines(json.loads(lines[0]), tmp_path)[case]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join([lines[0], bad, lines[1]]) + "\n")
    with pytest.raises(InstructError) as err:
        load_instruct(path, mode="reason")
    assert f"{path}, line 2" in str(err.value) and message in str(err.value)


def test_answer_case_is_normalised_and_relative_videos_resolve(world, tmp_path):
    row = json.loads(world.instruct_path.read_text().splitlines()[0])
    video = Path(row["video"])
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / video.name).write_bytes(video.read_bytes())
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({**row, "answer": " yes ", "video": f"v/{video.name}"}) + "\n")
    (record,) = load_instruct(path)
    assert record.answer == "Yes" and record.video == str(tmp_path / "v" / video.name)


# ---- the collator --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["answer", "reason"])
def test_collator_labels_cover_exactly_the_completion(processor, records, mode):
    collator = VideoSFTCollator(processor, mode)
    batch_records = [records[0], records[13], records[27]]  # different videos and questions
    batch = collator(batch_records)
    tokenizer = processor.tokenizer
    assert (batch["attention_mask"] == 0).any(), "the batch should need padding"
    for i, record in enumerate(batch_records):
        prompt_len = processor_inputs(processor, collator.prompt_text(record), collator.load_clip(record))["input_ids"].shape[1]
        length = int(batch["attention_mask"][i].sum())
        assert batch["attention_mask"][i, :length].all() and not batch["attention_mask"][i, length:].any()
        labels, ids = batch["labels"][i], batch["input_ids"][i]
        assert (labels[:prompt_len] == -100).all() and (labels[length:] == -100).all()
        assert torch.equal(labels[prompt_len:length], ids[prompt_len:length])
        assert (ids[length:] == tokenizer.pad_token_id).all()
        text = tokenizer.decode(labels[labels != -100])
        assert text == completion_text(record, mode) + "<|im_end|>"
    # Dataset rows (dicts, as the Trainer's data loader yields them) give the same batch.
    rows = collator([r.to_dict() for r in batch_records])
    assert rows.keys() == batch.keys() and all(torch.equal(rows[k], batch[k]) for k in batch)


@pytest.mark.parametrize("mode", ["answer", "reason"])
def test_collator_inputs_equal_the_engines(tiny_model_and_processor, world, records, mode):
    """Same prompt tokens and same video tensors as the engine gets for the clip FingerReward prepares."""
    from finger_reward import FingerReward

    model, processor = tiny_model_and_processor
    reward = FingerReward.from_pretrained(model, processor=processor, questions=world.bank_path, mode=mode)
    engine = reward.engine
    assert patch_factor(processor) == engine.patch_factor
    record = records[25]
    (job,) = reward.prepare([record.video], [record.prompt])
    expected = engine._model_inputs(engine.split.prefix + engine.split.text_after_video(record.question), job.clip)
    batch = VideoSFTCollator(processor, mode)([record])
    prompt_len = expected["input_ids"].shape[1]
    for key in ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
        assert torch.equal(batch[key], expected[key]), key
    for key in ("input_ids", "mm_token_type_ids"):
        assert torch.equal(batch[key][:, :prompt_len], expected[key]), key
    assert (batch["labels"][:, :prompt_len] == -100).all() and (batch["labels"][:, prompt_len:] != -100).all()
    if mode == "answer":  # the first trained token is one the engine reads P(Yes)/P(No) from
        assert int(batch["labels"][0, prompt_len]) in set(engine.yes_ids) | set(engine.no_ids)


def test_collator_video_errors_name_the_video_and_line(processor, records, tmp_path):
    from finger_reward.errors import VideoError

    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    record = InstructRecord(**{**records[0].to_dict(), "video": str(broken)})
    with pytest.raises(VideoError) as err:
        VideoSFTCollator(processor, "answer")([records[1], record])
    assert str(broken) in str(err.value) and records[0].source in str(err.value)


def test_loss_depends_on_the_video_and_reaches_the_vision_tower(tiny_model_dir, processor, records):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir).train()
    batch = VideoSFTCollator(processor, "answer")(records[:2])
    loss = model(**batch).loss
    loss.backward()
    vision_grad = sum(p.grad.abs().sum() for p in model.model.visual.parameters() if p.grad is not None)
    assert vision_grad > 0
    with torch.no_grad():
        other = model(**{**batch, "pixel_values_videos": batch["pixel_values_videos"].flip(0)}).loss
    assert abs(other.item() - loss.item()) > 1e-4


# ---- training with TRL's SFTTrainer --------------------------------------------------------------


def _changed(after: dict[str, torch.Tensor], before: dict[str, torch.Tensor]) -> set[str]:
    return {name for name, value in after.items() if not torch.equal(value, before[name])}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["answer", "reason"])
def test_one_sft_step_trains_language_model_and_vision_tower(tiny_model_dir, world, initial_weights, tmp_path, mode):
    eval_path = tmp_path / "eval.jsonl"
    eval_path.write_text("\n".join(world.instruct_path.read_text().splitlines()[:2]) + "\n")
    recipe = _recipe(tiny_model_dir, world.instruct_path, tmp_path / "out", mode=mode,
                     eval_data=str(eval_path), eval_steps=1)
    trainer = train(recipe)
    assert trainer.state.global_step == 1
    changed = _changed(_weights(trainer.model), initial_weights)
    assert any("language_model" in name for name in changed)
    assert any(".visual." in name for name in changed), "the vision tower got no gradient"
    logs = trainer.state.log_history
    assert math.isfinite(logs[0]["loss"]) and any("eval_loss" in entry for entry in logs)
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.slow
def test_lora_changes_only_lora_weights(tiny_model_dir, world, initial_weights, tmp_path):
    trainer = train(_recipe(tiny_model_dir, world.instruct_path, tmp_path / "out", lora=True, mode="reason"))
    changed = set()
    for name, value in trainer.model.named_parameters():
        if "lora_" in name:
            assert "language_model" in name, f"LoRA on {name} outside the language model"
            changed |= {name} if value.abs().sum() > 0 and "lora_B" in name else set()
        else:
            base = name.removeprefix("base_model.model.").replace(".base_layer", "")
            assert torch.equal(value, initial_weights[base]), f"{name} changed under LoRA"
    assert changed, "no LoRA weight was trained"
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_checkpoint_resume_continues_from_the_saved_step(tiny_model_dir, world, tmp_path):
    """Two steps straight through (from the CLI and YAML) equal one step, a checkpoint, and one resumed step."""
    from transformers import AutoModelForImageTextToText

    straight = tmp_path / "straight"
    main(["--config", str(CONFIGS / "sft_answer.yaml"), "--model", str(tiny_model_dir),
          "--data", str(world.instruct_path), "--output_dir", str(straight), "--max_steps", "2", "--save_steps", "1",
          "--bf16", "false", "--per_device_train_batch_size", "2", "--global_batch_size", "2",
          "--dataloader_num_workers", "0", "--learning_rate", "1e-3", "--logging_steps", "1"])
    assert (straight / "checkpoint-1").is_dir() and (straight / "checkpoint-2").is_dir()
    resumed = train(_recipe(tiny_model_dir, world.instruct_path, tmp_path / "resumed", max_steps=2,
                            resume_from_checkpoint=str(straight / "checkpoint-1")))
    assert resumed.state.global_step == 2
    assert [e["step"] for e in resumed.state.log_history if "loss" in e] == [1, 2]  # step 1 comes from the checkpoint
    reference = _weights(AutoModelForImageTextToText.from_pretrained(straight))
    after = _weights(resumed.model)
    one_step = _weights(AutoModelForImageTextToText.from_pretrained(straight / "checkpoint-1"))
    assert _changed(after, one_step), "the resumed run did not train"
    for name, value in after.items():
        torch.testing.assert_close(value, reference[name], rtol=0, atol=1e-6, msg=name)


# ---- recipes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["answer", "reason"])
def test_configs_hold_the_papers_settings(mode):
    argv = ["--config", str(CONFIGS / f"sft_{mode}.yaml"), "--model", "m", "--data", "d.jsonl", "--max_frames", "8"]
    (recipe,) = TrlParser([SFTRecipe]).parse_args_and_config(argv)
    assert recipe.mode == mode and recipe.learning_rate == 5e-6 and recipe.num_train_epochs == 2
    assert recipe.fps == 2 and recipe.max_pixels == 448 * 448 and recipe.max_frames == 8
    assert recipe.global_batch_size == 32 and recipe.bf16 and not recipe.lora
    assert recipe.accumulation_steps(8) * recipe.per_device_train_batch_size * 8 == 32
    assert recipe.accumulation_steps(1) == 32
    with pytest.raises(ValueError, match="not a multiple"):
        recipe.accumulation_steps(3)


def test_recipe_errors_say_the_fix():
    with pytest.raises(ValueError, match="--model PATH --data"):
        SFTRecipe()
    with pytest.raises(ValueError, match="mode='think'"):
        SFTRecipe(model="m", data="d", mode="think")
    recipe = SFTRecipe(model="m", data="d", global_batch_size=32, gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match="here 4 steps match"):
        recipe.accumulation_steps(8)


def test_freeze_vision_leaves_only_the_language_side_trainable(tiny_model_dir, world, tmp_path):
    trainer = build_trainer(_recipe(tiny_model_dir, world.instruct_path, tmp_path, freeze_vision=True))
    params = dict(trainer.model.named_parameters())
    assert not any(p.requires_grad for n, p in params.items() if ".visual." in n)
    assert all(p.requires_grad for n, p in params.items() if "language_model" in n)
