"""GRPO of the evaluator (trainers/grpo.py) on a tiny Qwen2.5-VL: the video reaches every forward pass, steps train, rewards are FingER's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from trl import TrlParser

from finger_reward.instruct import completion_text, load_instruct
from finger_reward.rewards import accuracy_reward, format_reward
from finger_reward.rope import with_rope_positions
from finger_reward.synthetic import make_world
from finger_reward.trainers.grpo import GRPORecipe, VideoGRPOTrainer, train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("grpo_world"), num_scenes=1)


@pytest.fixture(scope="module")
def records(world):
    return load_instruct(world.instruct_path, mode="reason")


def _recipe(model_dir, data, out, **overrides) -> GRPORecipe:
    options = dict(model=str(model_dir), data=str(data), output_dir=str(out), num_generations=3, max_completion_length=12,
                   max_steps=2, learning_rate=1e-3, logging_steps=1, save_steps=100, max_frames=4, seed=0)
    return GRPORecipe(**{**options, **overrides})


def _lengths(completions, **kwargs):
    """A reward that differs within a group of a random model's completions (FingER's are all 0 there)."""
    return [len(c) / 10 for c in completions]


def _weights(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("name, model", [("grpo_zero.yaml", "Qwen/Qwen2.5-VL-7B-Instruct"), ("grpo_coldstart.yaml", "out/sft_reason")])
def test_configs_parse_with_the_papers_values(name, model):
    (recipe,) = TrlParser([GRPORecipe]).parse_args_and_config(["--config", str(CONFIGS / name), "--data", "train.jsonl"])
    assert recipe.model == model and recipe.data == "train.jsonl"
    assert (recipe.num_generations, recipe.beta, recipe.epsilon, recipe.num_iterations, recipe.learning_rate) == (16, 0.04, 0.2, 1, 5e-7)
    assert (recipe.fps, recipe.max_pixels, recipe.max_steps) == (2.0, 448 * 448, 2000)
    (other,) = TrlParser([GRPORecipe]).parse_args_and_config(
        ["--config", str(CONFIGS / name), "--data", "d.jsonl", "--model", "m", "--num_generations", "8", "--beta", "0"])
    assert (other.model, other.num_generations, other.beta) == ("m", 8, 0.0)


def test_recipe_rejects_a_group_of_one(tiny_model_dir):
    with pytest.raises(ValueError, match="num_generations"):
        GRPORecipe(model=str(tiny_model_dir), data="x.jsonl", num_generations=1)


def test_loss_depends_on_the_video(tiny_model_dir, world, records, tmp_path):
    trainer = VideoGRPOTrainer(_recipe(tiny_model_dir, world.instruct_path, tmp_path), records=records)
    record = records[0]
    batch = trainer.rollout(record)
    # Every forward pass gets the video: the processor's tensors for G rows, mm_token_type_ids marking the video tokens.
    assert batch["video_grid_thw"].shape[0] == 3 and batch["pixel_values_videos"].shape[0] == 3 * batch["video_grid_thw"][0].prod()
    assert (batch["mm_token_type_ids"] == 2).sum() > 0 and batch["second_per_grid_ts"].shape == (3,)
    # The training forward reproduces the sampling policy's log-probabilities: ratio 1, KL 0 at the start.
    with torch.no_grad():
        assert torch.allclose(trainer.per_token_logps(trainer.model, batch), batch["old_per_token_logps"], atol=1e-5)
    # A random model's completions all score 0 under FingER's rewards; give the group distinct advantages.
    batch["advantages"] = torch.tensor([1.0, -0.5, -0.5])
    trainer.model.zero_grad()
    loss, metrics = trainer.compute_loss(batch)
    loss.backward()
    visual = [p.grad for p in trainer.model.model.visual.parameters() if p.grad is not None]
    assert visual and max(g.abs().max().item() for g in visual) > 0, "no gradient reaches the vision tower"
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-6)

    # The same batch with another clip's video (same shape, different content) gives another loss.
    other = next(r for r in records if r.video != record.video)
    video = trainer.repeat_inputs(trainer.prompt_inputs(other), 3)
    assert torch.equal(video["video_grid_thw"], batch["video_grid_thw"])
    assert not torch.equal(video["pixel_values_videos"], batch["pixel_values_videos"])
    swapped = {**batch, "pixel_values_videos": video["pixel_values_videos"]}
    with torch.no_grad():
        same, _ = trainer.compute_loss(batch)
        changed, _ = trainer.compute_loss(swapped)
    assert same.item() == pytest.approx(loss.item(), abs=1e-6)
    assert abs(changed.item() - same.item()) > 1e-6, "the loss ignores the video"


def test_logged_rewards_are_finger_rewards(tiny_model_dir, world, records, tmp_path):
    trainer = VideoGRPOTrainer(_recipe(tiny_model_dir, world.instruct_path, tmp_path, num_generations=4), records=records)
    record = records[1]
    batch = trainer.rollout(record)
    texts = [row["completion"] for row in batch["log"]]
    accuracy = accuracy_reward(texts, answer=[record.answer] * 4)
    fmt = format_reward(texts)
    assert [row["accuracy_reward"] for row in batch["log"]] == accuracy
    assert [row["format_reward"] for row in batch["log"]] == fmt
    assert [row["reward"] for row in batch["log"]] == pytest.approx([a + f for a, f in zip(accuracy, fmt)])
    assert batch["metrics"]["rewards/accuracy_reward/mean"] == pytest.approx(sum(accuracy) / 4)
    assert batch["metrics"]["rewards/format_reward/mean"] == pytest.approx(sum(fmt) / 4)
    assert all("parsed_answer" in row for row in batch["log"])  # accuracy_reward's log_extra column
    # The reward path scores a gold completion 1 + 1 and garbage 0 + 0; advantages are group-normalised (Eq. 8).
    gold = completion_text(record, "reason")
    rewards, per_func, _, _ = trainer.score(record, [gold, "garbage"], [[1], [2]])
    assert per_func["accuracy_reward"].tolist() == [1.0, 0.0] and per_func["format_reward"].tolist() == [1.0, 0.0]
    assert rewards.tolist() == [2.0, 0.0]


def test_grpo_steps_change_the_weights(tiny_model_dir, world, records, tmp_path):
    recipe = _recipe(tiny_model_dir, world.instruct_path, tmp_path / "out", max_steps=2, forward_batch_size=2)
    trainer = VideoGRPOTrainer(recipe, records=records, reward_funcs=[accuracy_reward, format_reward, _lengths])
    before = _weights(trainer.model)
    trainer.train()
    trainer.save_model(recipe.output_dir)
    after = _weights(trainer.model)
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert any("visual" in n for n in changed) and any("language_model" in n for n in changed)
    log = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2]
    assert {"loss", "reward", "reward_std", "kl", "rewards/accuracy_reward/mean", "rewards/format_reward/mean",
            "rewards/_lengths/mean", "clip_ratio/region_mean", "completions/mean_length"} <= set(log[0])
    assert log[1]["kl"] > 0  # after one step the policy has left the reference
    assert len((tmp_path / "out" / "completions.jsonl").read_text().splitlines()) == 2 * 3
    assert (tmp_path / "out" / "config.json").is_file()
    assert trainer.args.num_generations == 3 and trainer.args.beta == 0.04 and trainer.args.epsilon == 0.2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_loaded_model_trains_on_the_gpu_in_bf16(tiny_model_dir, world, records, tmp_path):
    recipe = _recipe(tiny_model_dir, world.instruct_path, tmp_path / "gpu", max_steps=2, bf16=True)
    trainer = VideoGRPOTrainer(recipe, records=records, reward_funcs=[accuracy_reward, format_reward, _lengths])
    assert trainer.device.type == "cuda" and trainer.ref_model is not None
    before = _weights(trainer.model)
    trainer.train()
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in trainer.log_history)
    assert any(not torch.equal(before[n], p) for n, p in _weights(trainer.model).items())


def test_lora_run_with_default_rewards(tiny_model_dir, world, tmp_path):
    """`train(recipe)` end to end with LoRA: the reference is the model with adapters disabled."""
    recipe = _recipe(tiny_model_dir, world.instruct_path, tmp_path / "lora", lora=True, lora_target_modules="all-linear",
                     num_generations=2, max_steps=1, max_completion_length=8)
    trainer = train(recipe)
    assert trainer.ref_model is None and trainer.log_history[0]["step"] == 1
    assert (tmp_path / "lora" / "adapter_config.json").is_file()


def test_training_forward_matches_the_sampling_policy(tiny_model_dir, world, records, tmp_path):
    """The log-probabilities of the loss equal those `generate` sampled from (video, mrope positions and all)."""
    trainer = VideoGRPOTrainer(_recipe(tiny_model_dir, world.instruct_path, tmp_path), records=records)
    prompt = trainer.repeat_inputs(trainer.prompt_inputs(records[2]), 2)
    out = trainer.model.generate(**with_rope_positions(trainer.model.config, prompt), do_sample=True, temperature=1.0, top_k=0, max_new_tokens=10,
                                 eos_token_id=trainer.eos_ids, pad_token_id=trainer.pad_id,
                                 output_scores=True, return_dict_in_generate=True)
    P = prompt["input_ids"].shape[1]
    sampled = torch.stack(out.scores, 1).log_softmax(-1).gather(-1, out.sequences[:, P:, None]).squeeze(-1)
    batch = {"input_ids": out.sequences, "attention_mask": torch.ones_like(out.sequences), "prompt_length": P,
             "mm_token_type_ids": torch.cat([prompt["mm_token_type_ids"], torch.zeros_like(out.sequences[:, P:])], 1),
             **{k: prompt[k] for k in ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")}}
    # Positions up to each row's first end token (after it generate pads, and the loss masks them out).
    is_eos = torch.isin(out.sequences[:, P:], torch.tensor(trainer.eos_ids))
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1), is_eos.shape[1])
    mask = torch.arange(is_eos.shape[1])[None] <= first[:, None]
    with torch.no_grad():
        ours = trainer.per_token_logps(trainer.model, batch)
        assert torch.allclose(ours[mask], sampled[mask], atol=1e-4)
        # Without the video's pixels (TRL 1.16's GRPOTrainer forwards none) the log-probabilities are silently different.
        text_only = {k: v for k, v in batch.items() if k != "pixel_values_videos"}
        assert not torch.allclose(trainer.per_token_logps(trainer.model, text_only)[mask], sampled[mask], atol=1e-2)


def test_main_runs_a_config_from_the_command_line(tiny_model_dir, world, tmp_path):
    from finger_reward.trainers.grpo import main

    out = tmp_path / "cli"
    trainer = main(["--config", str(CONFIGS / "grpo_coldstart.yaml"), "--model", str(tiny_model_dir), "--data", str(world.instruct_path),
                    "--output_dir", str(out), "--num_generations", "2", "--max_steps", "1", "--max_completion_length", "6",
                    "--max_frames", "4", "--bf16", "false", "--forward_batch_size", "1"])
    assert trainer.global_step == 1 and trainer.recipe.beta == 0.04 and trainer.recipe.gradient_checkpointing
    assert (out / "log.jsonl").is_file() and (out / "config.json").is_file()


# ---- checkpoints and resume --------------------------------------------------------------------


def _trainer(model_dir, world, records, out, **overrides):
    options = {"max_steps": 3, "save_steps": 1, "max_completion_length": 8, **overrides}
    recipe = _recipe(model_dir, world.instruct_path, out, **options)
    return VideoGRPOTrainer(recipe, records=records, reward_funcs=[accuracy_reward, format_reward, _lengths])


def _assert_same_weights(a, b):
    for name, value in _weights(a).items():
        torch.testing.assert_close(value, _weights(b)[name], rtol=0, atol=1e-6, msg=name)


def test_resume_from_a_checkpoint_equals_training_straight_through(tiny_model_dir, world, records, tmp_path):
    """3 steps straight == 1 step, a kill (the run wrote on to step 3), and a resume from checkpoint-1 to step 3."""
    import shutil

    straight = _trainer(tiny_model_dir, world, records, tmp_path / "straight").train()
    checkpoint = tmp_path / "straight" / "checkpoint-1"
    for name in ("model.safetensors", "config.json", "optimizer.pt", "scheduler.pt", "rng_state.pth",
                 "trainer_state.json", "grpo_state.json", "processor_config.json", "tokenizer.json"):
        assert (checkpoint / name).is_file(), name
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == 1
    assert not (tmp_path / "straight" / "checkpoint-3").exists()  # the final model goes to output_dir itself
    # The killed run's folder holds everything the straight run wrote, steps 2 and 3 included.
    shutil.copytree(tmp_path / "straight", tmp_path / "killed")
    resumed = _trainer(tiny_model_dir, world, records, tmp_path / "killed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "killed" / "checkpoint-1"))
    assert resumed.global_step == 3
    _assert_same_weights(resumed.model, straight.model)
    assert [row["step"] for row in resumed.log_history] == [1, 2, 3]
    assert [row["loss"] for row in resumed.log_history] == pytest.approx([row["loss"] for row in straight.log_history], abs=1e-6)
    assert resumed.log_history[2]["loss"] != 0  # the steps after the checkpoint trained
    # Same sampled completions (the RNG state came back) and the files read as one uninterrupted run.
    for name in ("log.jsonl", "completions.jsonl"):
        assert (tmp_path / "killed" / name).read_text() == (tmp_path / "straight" / name).read_text(), name
    assert [row["completion"] for row in resumed.completions] == [row["completion"] for row in straight.completions[3:]]

    # True means the newest checkpoint in output_dir (checkpoint-2 here): one more step to 3.
    shutil.copytree(tmp_path / "straight", tmp_path / "latest")
    latest = _trainer(tiny_model_dir, world, records, tmp_path / "latest").train(resume_from_checkpoint=True)
    assert len(latest.completions) == 3 and latest.global_step == 3
    _assert_same_weights(latest.model, straight.model)


def test_lora_resume_restores_the_adapters(tiny_model_dir, world, records, tmp_path):
    options = dict(lora=True, max_steps=2)
    straight = _trainer(tiny_model_dir, world, records, tmp_path / "straight", **options).train()
    assert (tmp_path / "straight" / "checkpoint-1" / "adapter_model.safetensors").is_file()
    resumed = _trainer(tiny_model_dir, world, records, tmp_path / "resumed", **options)
    resumed.train(resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-1"))
    _assert_same_weights(resumed.model, straight.model)
    # Resumed into a new output_dir: its log starts with the restored history.
    assert [json.loads(line)["step"] for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()] == [1, 2]


def test_resume_errors_name_the_problem(tiny_model_dir, world, records, tmp_path):
    trainer = _trainer(tiny_model_dir, world, records, tmp_path / "empty")
    with pytest.raises(ValueError, match="holds no checkpoint-"):
        trainer.train(resume_from_checkpoint="last")
    (tmp_path / "empty" / "checkpoint-4").mkdir(parents=True)
    with pytest.raises(ValueError, match="missing optimizer.pt"):
        trainer.train(resume_from_checkpoint=True)


def test_recipe_resume_and_num_iterations_save_between_generation_batches(tiny_model_dir, world, tmp_path):
    """With mu = 2 a checkpoint lands after the batch whose steps cross save_steps; `train(recipe)` resumes from the recipe."""
    recipe = _recipe(tiny_model_dir, world.instruct_path, tmp_path / "out", num_iterations=2, max_steps=4, save_steps=1,
                     num_generations=2, max_completion_length=6)
    first = train(recipe)
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*")) == ["checkpoint-2"]
    again = train(GRPORecipe(**{**recipe.__dict__, "resume_from_checkpoint": "last"}))
    assert [row["step"] for row in again.log_history] == [1, 2, 3, 4]
    assert [row["loss"] for row in again.log_history] == pytest.approx([row["loss"] for row in first.log_history], abs=1e-6)


# ---- SFT cool-off data ---------------------------------------------------------------------------


def test_cooloff_keeps_exactly_the_correct_rollouts(tiny_model_dir, world, records, tmp_path):
    """Rollout lines of a real trainer, some with their completion replaced by a correct, wrong or badly formatted one."""
    from finger_reward.instruct import InstructRecord
    from finger_reward.trainers.cooloff import main as cooloff_main, write_cooloff

    trainer = VideoGRPOTrainer(_recipe(tiny_model_dir, world.instruct_path, tmp_path, num_generations=2), records=records)
    yes, no = next(r for r in records if r.answer == "Yes"), next(r for r in records if r.answer == "No")
    rows = trainer.rollout(yes)["log"] + trainer.rollout(no)["log"]  # a random model: all wrong
    assert {k: rows[0][k] for k in ("prompt", "dimension", "entity", "question", "positive", "answer")} == {
        k: v for k, v in yes.to_dict().items() if k in ("prompt", "dimension", "entity", "question", "positive", "answer")}
    flipped = {"Yes": "No", "No": "Yes"}
    edits = [
        (yes, f"<reason>the red ball stays sharp</reason><answer>{yes.answer}</answer>", True),
        (no, f" <reason>{no.reason}</reason>\n<answer>{no.answer.lower()}</answer> ", True),
        (yes, f"<reason>{yes.reason}</reason><answer>{flipped[yes.answer]}</answer>", False),  # wrong answer
        (no, f"<reason>yes, it is clean</reason><answer>{no.answer}</answer>", False),  # Yes/No outside the answer
        (yes, f"{yes.answer}", False),  # no tags
    ]
    source = rows[0] if rows[0]["question"] == yes.question else rows[-1]
    other = rows[-1] if source is rows[0] else rows[0]
    rows += [{**(source if record is yes else other), "completion": text, "accuracy_reward": 0.0} for record, text, _ in edits]
    path = tmp_path / "completions.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + '{"step": 9, "compl')  # a kill mid-line
    out = write_cooloff(path, tmp_path / "cooloff.jsonl")
    written = load_instruct(out, mode="reason")
    expected = [(record, text) for record, text, good in edits if good]
    assert len(written) == len(expected)
    for got, (record, text) in zip(written, expected):
        assert got == InstructRecord(**{**record.to_dict(), "reason": text.split("<reason>")[1].split("</reason>")[0].strip()})
        assert format_reward([completion_text(got, "reason")]) == [1.0]
    # The CLI on the output_dir, and an older file without question fields looked up in the training data.
    (tmp_path / "old").mkdir()
    keep = ("step", "question", "video", "answer", "completion")
    (tmp_path / "old" / "completions.jsonl").write_text("".join(json.dumps({k: row[k] for k in keep}) + "\n" for row in rows))
    with pytest.raises(Exception, match="lacks the question fields"):
        cooloff_main([str(tmp_path / "old"), "--out", str(tmp_path / "x.jsonl")])
    cli = cooloff_main([str(tmp_path / "old"), "--out", str(tmp_path / "cli.jsonl"), "--data", str(world.instruct_path)])
    assert load_instruct(cli, mode="reason") == written


# ---- evaluation after training -------------------------------------------------------------------


def test_eval_data_measures_accuracy_after_training(tiny_model_dir, world, tmp_path):
    from finger_reward.evaluation.heldout import evaluate_instruct

    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("\n".join(world.instruct_path.read_text().splitlines()[:12:10]) + "\n")  # one clip, 2 questions
    recipe = _recipe(tiny_model_dir, world.instruct_path, tmp_path / "out", eval_data=str(heldout), max_steps=1,
                     num_generations=2, max_completion_length=8)
    trainer = train(recipe)
    result = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert result["mode"] == "reason" and result["dimensions"]["overall"]["questions"] == 2
    direct = evaluate_instruct(trainer.model, heldout, processor=trainer.processor, mode="reason", max_new_tokens=8,
                               max_frames=4, progress=False)
    assert result["dimensions"] == direct["dimensions"]
    last = trainer.log_history[-1]
    assert last["step"] == 1 and last["eval_acc/overall"] == result["dimensions"]["overall"]["acc"]
    assert 0 <= last["eval_acc_prob/overall"] <= 1
    assert json.loads((tmp_path / "out" / "log.jsonl").read_text().splitlines()[-1]) == last
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**json.loads(heldout.read_text().splitlines()[0]), "answer": "Maybe"}) + "\n")
    with pytest.raises(Exception, match=r"bad.jsonl, line 1.*'Yes' or 'No'"):  # fails before training, naming the line
        VideoGRPOTrainer(_recipe(tiny_model_dir, world.instruct_path, tmp_path, eval_data=str(bad)))


def test_ratio_is_exactly_one_at_mu_1_with_lora_dropout(tiny_model_dir, world, records, tmp_path):
    """Dropout is off in every pass (LoRA's too), so the loss's log-probabilities equal the old policy's."""
    recipe = _recipe(tiny_model_dir, world.instruct_path, tmp_path, lora=True, lora_dropout=0.5, max_steps=1)
    trainer = VideoGRPOTrainer(recipe, records=records, reward_funcs=[_lengths])
    with torch.no_grad():  # a trained adapter (a fresh one has B = 0, so its dropout would change nothing)
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.2)
    batch = trainer.rollout(records[0])
    trainer.model.train()
    _, metrics = trainer.compute_loss(batch)
    assert metrics["ratio/max_abs_dev"] == 0.0 and metrics["ratio/mean_abs_dev"] == 0.0
    # With LoRA's dropout back on, the same pass is off by more than float noise: the check can fail.
    dropouts = [m for m in trainer.model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts
    for module in dropouts:
        module.p = 0.5
    _, noisy = trainer.compute_loss(batch)
    assert noisy["ratio/max_abs_dev"] > 1e-3


def test_grpo_step_on_slowfast_clips(tiny_model_dir, world, records, tmp_path):
    """SlowFast prompts carry two video blocks per row; batches split by rows keep each row's own blocks."""
    # threshold 0.5: on these clips half the frames go to the fast pathway
    recipe = _recipe(tiny_model_dir, world.instruct_path, tmp_path, slowfast=0.5, max_frames=8, forward_batch_size=1,
                     num_generations=3, max_steps=1)
    trainer = VideoGRPOTrainer(recipe, records=records, reward_funcs=[_lengths])
    batch = trainer.rollout(records[0])
    rows = batch["input_ids"].shape[0]
    assert batch["video_grid_thw"].shape[0] == 2 * rows  # a slow and a fast pathway per row
    with torch.no_grad():
        whole = trainer._logps(trainer.model, trainer._forward_inputs(batch), batch["prompt_length"])
        split = trainer.per_token_logps(trainer.model, batch)  # forward_batch_size=1: one row at a time
    torch.testing.assert_close(split, whole, atol=1e-5, rtol=0)
    trainer.train()
    assert trainer.global_step == 1
