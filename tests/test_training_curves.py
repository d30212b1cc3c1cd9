"""Training curves: the logs every trainer writes (a real Diffusion-DPO run's metrics.jsonl, GRPO's log.jsonl,
HF Trainer's trainer_state.json) become one PNG with a panel per metric; bad requests name what is logged."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from finger_reward.cli import main
from finger_reward.errors import FingerError
from finger_reward.synthetic import write_video
from finger_reward.tiny_wan import build_tiny_wan_pipeline
from finger_reward.training_curves import (
    curve_keys, find_log, panel_lines, plot_training, read_training_log, training_figure, training_partner,
)
from finger_reward.trainers.diffusion_dpo import DPORecipe, train


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    """Three Diffusion-DPO steps on the tiny Wan pipeline: output_dir/metrics.jsonl as the trainer writes it."""
    root = tmp_path_factory.mktemp("curves")
    rng = np.random.default_rng(0)
    lines = []
    for i in range(2):
        write_video(rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8), root / f"w{i}.mp4")
        write_video(rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8), root / f"l{i}.mp4")
        lines.append(json.dumps({"prompt": "a red square moves", "chosen": f"w{i}.mp4", "rejected": f"l{i}.mp4"}))
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    recipe = DPORecipe(pairs_file=str(root / "pairs.jsonl"), output_dir=str(root / "out"), num_frames=5, height=32,
                       width=32, max_sequence_length=16, lora_rank=4, lora_alpha=4, max_steps=3, save_steps=0)
    history = train(recipe, pipe=build_tiny_wan_pipeline(seed=0))["history"]
    return root / "out", history


def test_dpo_metrics_file_holds_every_step_and_plots(dpo_run, tmp_path):
    out, history = dpo_run
    rows = read_training_log(out)
    assert [row["step"] for row in rows] == [1, 2, 3] and rows[0]["loss"] == pytest.approx(history[0]["loss"])
    names = plot_training(out, tmp_path / "curves.png")
    assert names[:2] == ["loss", "implicit_accuracy"]  # what tells whether training works comes first
    assert "rewards/margin" in names and "lr" not in names and not any(n.startswith("time/") for n in names)
    image = Image.open(tmp_path / "curves.png")
    assert image.format == "PNG" and image.width > image.height > 100
    few = plot_training(out, tmp_path / "two.png", keys=["loss", "time/step_s"])
    assert few == ["loss", "time/step_s"] and Image.open(tmp_path / "two.png").width < image.width


def test_grpo_log_and_trainer_state_are_read_alike(tmp_path):
    grpo = tmp_path / "grpo"
    grpo.mkdir()
    rows = [{"step": s, "loss": 0.1 * s, "reward": 1 - 0.1 * s, "kl": 0.01 * s, "rewards/accuracy_reward/mean": 0.5}
            for s in (1, 2, 3)]
    text = "".join(json.dumps(row) + "\n" for row in rows)
    (grpo / "log.jsonl").write_text(text + '{"step": 4, "lo')  # a run still writing: torn last line
    assert [row["step"] for row in read_training_log(grpo)] == [1, 2, 3]
    assert curve_keys(read_training_log(grpo)) == ["reward", "loss", "kl", "rewards/accuracy_reward/mean"]

    sft = tmp_path / "sft"
    (sft / "checkpoint-10").mkdir(parents=True)
    (sft / "checkpoint-20").mkdir()
    history = [{"step": s, "epoch": s / 10, "loss": 2.0 / s, "grad_norm": 1.0, "learning_rate": 1e-5} for s in (5, 10, 15, 20)]
    (sft / "checkpoint-10" / "trainer_state.json").write_text(json.dumps({"log_history": history[:2]}))
    (sft / "checkpoint-20" / "trainer_state.json").write_text(json.dumps({"log_history": history + [{"train_runtime": 3.0}]}))
    assert find_log(sft) == sft / "checkpoint-20" / "trainer_state.json"  # the newest checkpoint, by number
    assert curve_keys(read_training_log(sft)) == ["loss", "grad_norm"]


def test_errors_name_the_problem(dpo_run, tmp_path):
    out, _ = dpo_run
    with pytest.raises(FingerError, match="not logged: reward_mean; logged metrics: .*implicit_accuracy"):
        plot_training(out, tmp_path / "x.png", keys=["reward_mean"])
    with pytest.raises(FileNotFoundError, match="holds none of metrics.jsonl"):
        find_log(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(FingerError, match="has no logged steps yet"):
        read_training_log(tmp_path)


def test_cli_writes_the_png(dpo_run, tmp_path, capsys):
    out, _ = dpo_run
    assert main(["plot-training", str(out), "--out", str(tmp_path / "c.png"), "--keys", "loss,rewards/margin"]) == 0
    assert "2 curve(s): loss, rewards/margin" in capsys.readouterr().out
    assert Image.open(tmp_path / "c.png").format == "PNG"
    assert main(["plot-training", str(tmp_path / "nothing"), "--out", str(tmp_path / "d.png")]) != 0


def test_held_out_curves_are_drawn_beside_the_training_reward(tmp_path):
    """Flow-GRPO's metrics.jsonl: a step-0 row with only eval/*, training rows, eval/* again every 2 steps. The
    held-out metrics join the panels of reward_mean and reward/<dim>; one with no training partner keeps its own."""
    rows = [{"step": 0, "eval/reward_mean": 0.40, "eval/text_alignment": 0.5, "eval/failed": 0, "eval/extra": 1.0}]
    for step in (1, 2, 3, 4):
        row = {"step": step, "reward_mean": 0.3 + 0.05 * step, "reward/text_alignment": 0.6, "failed": 0, "kl": 0.01}
        if step % 2 == 0:
            row.update({"eval/reward_mean": 0.4 + 0.02 * step, "eval/text_alignment": 0.55, "eval/failed": 0,
                        "eval/extra": 2.0})
        rows.append(row)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    logged = read_training_log(tmp_path)
    names = curve_keys(logged)
    assert names[0] == "reward_mean" and "reward/text_alignment" in names and "eval/extra" in names
    assert not {"eval/reward_mean", "eval/text_alignment", "eval/failed"} & set(names)  # drawn with their partners
    assert training_partner("eval/reward_mean", names) == "reward_mean"
    assert training_partner("eval/text_alignment", names) == "reward/text_alignment"
    assert training_partner("reward_mean", names) is None and training_partner("eval/extra", names) is None

    lines = dict(zip(names, panel_lines(logged, names)))
    (train, train_x, train_y), (held, held_x, held_y) = lines["reward_mean"]
    assert (train, train_x, held, held_x) == ("training", [1, 2, 3, 4], "held-out", [0, 2, 4])
    assert train_y == pytest.approx([0.35, 0.4, 0.45, 0.5]) and held_y == pytest.approx([0.4, 0.44, 0.48])
    assert [label for label, _, _ in lines["reward/text_alignment"]] == ["training", "held-out"]
    assert lines["kl"] == [("kl", [1, 2, 3, 4], [0.01] * 4)] and lines["eval/extra"] == [("eval/extra", [0, 2, 4], [1.0, 2.0, 2.0])]
    assert plot_training(tmp_path, tmp_path / "c.png") == names
    assert Image.open(tmp_path / "c.png").format == "PNG"


def test_steps_on_the_x_axis_are_whole_numbers(tmp_path):
    """Three logged steps: matplotlib's default locator would put ticks at 1.5 and 2.5; a step is never a fraction."""
    rows = [{"step": step, "loss": 1.0 / step, "reward_mean": 0.1 * step} for step in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    fig, names = training_figure(tmp_path)
    assert set(names) == {"loss", "reward_mean"}
    for ax in fig.axes:
        if ax.get_visible():
            ticks = [t for t in ax.get_xticks() if 1 <= t <= 3]
            assert ticks and all(float(t).is_integer() for t in ticks), ticks
