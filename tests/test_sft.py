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
from finger_reward.rope import with_rope_positions
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


def test_clip_cache_decodes_each_video_once_and_keeps_the_latest(processor, records):
    collator = VideoSFTCollator(processor, "reason", clip_cache=2)
    by_video = list({r.video: r for r in records}.values())[:3]
    first = collator.load_clip(by_video[0])
    assert collator.load_clip(by_video[0]) is first  # a hit returns the decoded clip itself
    collator.load_clip(by_video[1])
    collator.load_clip(by_video[2])  # evicts the least recently used: video 0
    assert list(collator._clips) == [by_video[1].video, by_video[2].video]
    again = collator.load_clip(by_video[0])
    assert again is not first and torch.equal(again.frames, first.frames)
    uncached = VideoSFTCollator(processor, "reason")
    assert uncached.load_clip(by_video[0]) is not uncached.load_clip(by_video[0])
    batch, cached = uncached(by_video[:2]), collator(by_video[:2])
    assert all(torch.equal(batch[k], cached[k]) for k in batch)
    with pytest.raises(ValueError, match="clip_cache"):
        VideoSFTCollator(processor, "reason", clip_cache=-1)


def test_loss_depends_on_the_video_and_reaches_the_vision_tower(tiny_model_dir, processor, records):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir).train()
    batch = with_rope_positions(model.config, VideoSFTCollator(processor, "answer")(records[:2]))
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


# ---- Q-Save rating loss (CE + MSE on the rating expectation) -------------------------------------

RATING_QUESTION = "How would you rate the visual quality of this video? Choose Bad, Poor, Fair, Good or Excellent."
LEVEL_VALUES = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])  # Q-Save Sec. 4.2.2, Bad..Excellent


@pytest.fixture(scope="module")
def rating_path(world, records, tmp_path_factory):
    """Rating lines (with 'mos') about the world's clips, and one plain Yes/No line."""
    from finger_reward.instruct import rating_level

    videos = list(dict.fromkeys(r.video for r in records))
    lines = []
    for video, mos in zip(videos, (1.3, 4.6, 3.0, 2.2)):
        base = next(r for r in records if r.video == video).to_dict()
        lines.append({**base, "question": RATING_QUESTION, "dimension": "visual_quality", "answer": rating_level(mos),
                      "mos": mos, "reason": "the shape stays sharp and the colours stay clean"})
    lines.append(records[0].to_dict())
    path = tmp_path_factory.mktemp("rating") / "rating.jsonl"
    path.write_text("".join(json.dumps({k: v for k, v in line.items() if k != "source"}) + "\n" for line in lines))
    return path


def test_rating_records_and_levels(rating_path, records):
    from finger_reward.instruct import normalised_mos, rating_level

    # Q-Save Sec. 3.4.2 on 1..5: (1, 1.8] Bad, (1.8, 2.6] Poor, ... (4.2, 5] Excellent; the lowest score reads Bad.
    assert [rating_level(m) for m in (1, 1.8, 1.81, 2.6, 3.4, 3.41, 4.2, 5)] == \
        ["Bad", "Bad", "Poor", "Poor", "Fair", "Good", "Good", "Excellent"]
    assert rating_level(70, low=0, high=100) == "Good" and normalised_mos(4.0) == 0.75
    with pytest.raises(ValueError, match="outside the scale"):
        normalised_mos(6.0)
    loaded = load_instruct(rating_path, mode="reason")
    assert [r.mos for r in loaded] == [1.3, 4.6, 3.0, 2.2, None] and [r.answer for r in loaded[:4]] == ["Bad", "Excellent", "Fair", "Poor"]
    row = {k: v for k, v in records[0].to_dict().items() if k != "source"}
    for bad, message in (({"mos": 3.0}, "answers with a rating level"), ({"answer": "Good"}, "'Yes' or 'No'"),
                         ({"mos": "high", "answer": "Good"}, "'mos' must be a finite number")):
        with pytest.raises(InstructError, match=message):
            InstructRecord.from_dict({**row, **bad})
    assert InstructRecord.from_dict({**row, "mos": 4, "answer": " good"}).answer == "Good"


@pytest.mark.parametrize("mode", ["answer", "reason"])
def test_collator_marks_the_rating_token(processor, rating_path, mode):
    from finger_reward.instruct import rating_token_ids
    from finger_reward.scoring import RATING_LEVELS

    loaded = load_instruct(rating_path, mode=mode)
    collator = VideoSFTCollator(processor, mode, mos_range=(1, 5))
    ids = rating_token_ids(processor.tokenizer)
    assert collator.rating_ids == ids and len(set(ids)) == 5  # one token per level in the tiny tokenizer
    batch = collator([loaded[0], loaded[4], loaded[1]])
    positions = batch["rating_positions"].tolist()
    assert positions[1] == -1 and math.isnan(batch["rating_targets"][1])
    assert batch["rating_targets"][[0, 2]].tolist() == pytest.approx([0.075, 0.9])
    for row, record in ((0, loaded[0]), (2, loaded[1])):
        assert batch["input_ids"][row, positions[row]] == ids[RATING_LEVELS.index(record.answer)]
        assert batch["labels"][row, positions[row]] == batch["input_ids"][row, positions[row]]
        # It is the first token of the answer: everything before it in the completion is the reason part.
        before = batch["labels"][row][(batch["labels"][row] != -100)].tolist()
        first = (batch["labels"][row] != -100).nonzero()[0].item()
        prefix = processor.tokenizer.decode(before[: positions[row] - first])
        assert prefix == ("" if mode == "answer" else f"<reason>{record.reason}</reason><answer>")
    assert "rating_positions" not in VideoSFTCollator(processor, mode)([loaded[0]])  # off by default


def test_rating_token_ids_need_single_tokens():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from finger_reward.instruct import rating_token_ids

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(["Good"] * 10, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    with pytest.raises(ValueError, match=r"splits the rating level\(s\) Bad, Poor, Fair, Excellent into"):
        rating_token_ids(PreTrainedTokenizerFast(tokenizer_object=bpe))


def _by_hand(model, tokenizer, batch):
    """CE from the model's own forward (full logits), and mean (r_hat - target)^2 written out (Q-Save Sec. 4.2.2-4.2.3)."""
    from finger_reward.instruct import rating_token_ids

    plain = {k: v for k, v in batch.items() if not k.startswith("rating")}
    out = model(**with_rope_positions(model.config, plain))
    rows = (batch["rating_positions"] >= 0).nonzero().squeeze(-1)
    logits = out.logits[rows, batch["rating_positions"][rows] - 1]  # these logits predict the rating token
    probs = torch.softmax(logits[:, rating_token_ids(tokenizer)], dim=-1)
    r_hat = (probs * LEVEL_VALUES).sum(-1)
    return out.loss, ((r_hat - batch["rating_targets"][rows]) ** 2).mean()


@pytest.mark.parametrize("mode", ["answer", "reason"])
def test_rating_loss_is_ce_plus_weighted_mse(tiny_model_dir, rating_path, processor, tmp_path, mode):
    weighted = build_trainer(_recipe(tiny_model_dir, rating_path, tmp_path, mode=mode, rating_loss_weight=2.5))
    model = weighted.model.eval()
    batch = weighted.data_collator([weighted.train_dataset[i] for i in (0, 4, 1)])  # two ratings and a Yes/No row
    with torch.no_grad():
        ce, mse = _by_hand(model, processor.tokenizer, batch)
        loss = weighted.compute_loss(model, dict(batch))
    assert mse > 1e-3
    torch.testing.assert_close(loss, ce + 2.5 * mse, rtol=1e-5, atol=1e-6)
    assert weighted._metrics["eval"]["rating_mse"][-1] == pytest.approx(mse.item(), rel=1e-5)

    # Gradients: the MSE term reaches the LM head only through the five level tokens' rows.
    model.zero_grad()
    (weighted.compute_loss(model, dict(batch)) - _by_hand(model, processor.tokenizer, batch)[0]).backward()
    grad = model.get_output_embeddings().weight.grad
    levels = weighted.rating_ids
    assert grad[levels].abs().sum() > 0
    others = torch.ones(len(grad), dtype=torch.bool)
    others[levels] = False
    assert grad[others].abs().max() < 1e-6
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.model.language_model.parameters())

    # Weight 0 is plain SFT: no rating fields in the batch, the loss is the model's own CE.
    plain = build_trainer(_recipe(tiny_model_dir, rating_path, tmp_path, mode=mode))
    plain_batch = plain.data_collator([plain.train_dataset[i] for i in (0, 4, 1)])
    assert "rating_positions" not in plain_batch
    with torch.no_grad():
        torch.testing.assert_close(plain.compute_loss(plain.model.eval(), dict(plain_batch)), ce, rtol=1e-5, atol=1e-6)


def test_rating_loss_needs_mos_records(tiny_model_dir, world, tmp_path):
    with pytest.raises(ValueError, match="no record of .* has a 'mos'"):
        build_trainer(_recipe(tiny_model_dir, world.instruct_path, tmp_path, rating_loss_weight=1.0))
    with pytest.raises(ValueError, match="mos_min < mos_max"):
        SFTRecipe(model="m", data="d", mos_min=5, mos_max=1)


@pytest.mark.slow
def test_rating_sft_step_logs_the_mse(tiny_model_dir, rating_path, tmp_path):
    trainer = train(_recipe(tiny_model_dir, rating_path, tmp_path / "out", mode="reason", rating_loss_weight=1.0,
                            eval_data=str(rating_path)))
    logged = [entry for entry in trainer.state.log_history if "rating_mse" in entry]
    assert logged and 0 <= logged[0]["rating_mse"] <= 1
    assert not (tmp_path / "out" / "eval.json").exists()  # rating records have no Yes/No accuracy


# ---- accuracy after training, cool-off config ----------------------------------------------------


@pytest.mark.slow
def test_eval_data_writes_answer_accuracy(tiny_model_dir, world, tmp_path):
    from finger_reward.evaluation.heldout import evaluate_instruct

    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("\n".join(world.instruct_path.read_text().splitlines()[1::6]) + "\n")
    trainer = train(_recipe(tiny_model_dir, world.instruct_path, tmp_path / "out", eval_data=str(heldout), max_frames=4))
    result = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert result["mode"] == "answer" and result["dimensions"]["overall"]["questions"] == 10
    direct = evaluate_instruct(trainer.model, heldout, processor=trainer.processing_class, max_frames=4, progress=False)
    assert result["dimensions"] == direct["dimensions"]
    logged = trainer.state.log_history[-1]
    assert {f"eval_acc/{d}" for d in result["dimensions"]} <= set(logged)
    assert logged["eval_acc_prob/overall"] == result["dimensions"]["overall"]["acc_prob"]
    assert any("eval_loss" in entry for entry in trainer.state.log_history)  # the eval loss still runs


def test_cooloff_config_loads():
    (recipe,) = TrlParser([SFTRecipe]).parse_args_and_config(["--config", str(CONFIGS / "sft_cooloff.yaml")])
    assert recipe.mode == "reason" and recipe.model == "out/grpo_coldstart"
    assert recipe.data == "out/grpo_coldstart/cooloff.jsonl" and recipe.learning_rate == 5e-6
    assert recipe.rating_loss_weight == 0 and recipe.fps == 2 and recipe.max_pixels == 448 * 448
