"""The tiny evaluator: the shipped one judges clips it never saw, and its recipe learns from chance."""

from __future__ import annotations

import json

import pytest

from finger_reward import FingerReward, pretrained, synthetic
from finger_reward.evaluation.heldout import evaluate_instruct
from finger_reward.trainers import tiny_evaluator


@pytest.fixture(scope="module")
def fresh_world(tmp_path_factory):
    """Clips drawn with a seed neither the training nor the held-out world of the recipe used."""
    return synthetic.make_world(tmp_path_factory.mktemp("fresh"), num_scenes=6, seed=2024, **tiny_evaluator.CLIP)


@pytest.fixture(scope="module")
def tiny_reward(fresh_world):
    return FingerReward.from_pretrained("tiny", questions=fresh_world.bank_path)


def test_shipped_evaluator_answers_unseen_clips(tiny_reward, fresh_world):
    result = evaluate_instruct(tiny_reward, fresh_world.instruct_path, progress=False)
    overall = result["dimensions"]["overall"]
    assert result["mode"] == "reason" and not result["failed_videos"]
    assert overall["questions"] == len(fresh_world.clips) * 10
    assert overall["acc"] >= 0.85 and overall["acc_prob"] >= 0.85, overall
    # Most questions about these clips are answered "fine"; the bar is on the balanced figure, which a
    # constant answer holds at 0.5, and the plain accuracy must beat answering "fine" to everything.
    assert overall["balanced_acc"] >= 0.9 and overall["acc_broken"] >= 0.85, overall
    assert overall["acc"] > overall["always_fine_acc"], overall


def test_shipped_evaluator_ranks_clean_clips_above_defective_ones(tiny_reward, fresh_world):
    clips = fresh_world.clips
    results = tiny_reward.score([c.path for c in clips], [c.prompt for c in clips])
    by_scene: dict = {}
    for clip, result in zip(clips, results):
        by_scene.setdefault(clip.scene, {})[clip.defect] = result
    wins = total = 0
    for scene, results_of in by_scene.items():
        clean = results_of.pop(None)
        for defect, result in results_of.items():
            dimension = next(d for d, x in synthetic.DEFECTS.items() if x == defect)
            total += 1
            wins += clean.overall > result.overall
            # The defect shows where it belongs: that dimension scores below the clean clip's.
            assert result.dimensions[dimension] < clean.dimensions[dimension], (scene, defect)
    assert wins / total >= 0.9, f"clean above defective in {wins} of {total} pairs"


def test_shipped_evaluator_writes_well_formed_completions(fresh_world):
    free = tiny_evaluator.free_completion_rewards(pretrained.TINY_EVALUATOR, fresh_world.instruct_path, limit=60)
    assert free["format"] >= 0.95 and free["acc"] >= 0.85, free


def test_shipped_figures_are_the_recipes():
    summary = json.loads((pretrained.TINY_EVALUATOR / "training_summary.json").read_text())
    assert summary["base"]["overall"]["acc"] < 0.7  # a random model is near chance
    grpo = summary["grpo"]["overall"]
    assert grpo["acc"] >= 0.85 and grpo["balanced_acc"] >= 0.9 and grpo["acc"] > grpo["always_fine_acc"], grpo
    assert summary["base"]["overall"]["balanced_acc"] < 0.7  # near a constant answer's 0.5
    assert summary["grpo"]["free_completions"]["format"] >= 0.95
    card = (pretrained.TINY_EVALUATOR / "README.md").read_text()
    # The model card quotes the measured figures, the balanced one and the trivial baseline beside them.
    for figure in ("acc", "balanced_acc", "acc_fine", "acc_broken", "always_fine_acc"):
        assert f"{grpo[figure]:.3f}" in card, figure
    assert "finger_reward.rope" in card


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The shipped recipe, run from random weights (one torch thread: a tiny model gains nothing from two)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("tiny-recipe")
        return out, tiny_evaluator.train_tiny_evaluator(out)
    finally:
        torch.set_num_threads(threads)


def test_recipe_learns_from_chance_to_the_papers_bar(trained):
    out, summary = trained
    base, sft, grpo = (summary[stage]["overall"]["acc"] for stage in ("base", "sft", "grpo"))
    assert base < 0.7, summary["base"]  # random weights: about chance
    assert sft >= base + 0.15, summary["sft"]
    assert grpo >= 0.85 and summary["grpo"]["overall"]["acc_prob"] >= 0.85, summary["grpo"]
    assert summary["grpo"]["overall"]["balanced_acc"] >= 0.9, summary["grpo"]  # a constant answer gets 0.5
    assert summary["grpo"]["free_completions"]["format"] >= 0.95, summary["grpo"]["free_completions"]
    log = [json.loads(line) for line in (out / "grpo" / "log.jsonl").read_text().splitlines()]
    assert [row for row in log if "rewards/format_reward/mean" in row], "GRPO logged no rewards"
    assert json.loads((out / "grpo" / "finger_reward.json").read_text())["mode"] == "reason"
