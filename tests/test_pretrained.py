"""Checkpoint scoring settings (finger_reward.json) and the "tiny" name."""

from __future__ import annotations

import json
import shutil

import pytest

from finger_reward import FingerReward, pretrained
from finger_reward.errors import FingerError


@pytest.fixture
def checkpoint(tiny_model_dir, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(tiny_model_dir, path)
    return path


def test_from_pretrained_asks_the_way_the_checkpoint_was_trained(checkpoint):
    assert FingerReward.from_pretrained(checkpoint).engine.mode == "answer"  # no file: library defaults
    pretrained.write_scoring_defaults(checkpoint, mode="reason", fps=4.0, max_pixels=56 * 84)
    reward = FingerReward.from_pretrained(checkpoint)
    assert reward.engine.mode == "reason"
    assert reward.video_options["fps"] == 4.0 and reward.video_options["max_pixels"] == 56 * 84
    explicit = FingerReward.from_pretrained(checkpoint, mode="answer", fps=1.0)
    assert explicit.engine.mode == "answer" and explicit.video_options["fps"] == 1.0
    assert explicit.video_options["max_pixels"] == 56 * 84


def test_bad_settings_files_are_named(checkpoint):
    (checkpoint / pretrained.SCORING_FILE).write_text("{not json")
    with pytest.raises(FingerError, match="finger_reward.json: not valid JSON"):
        FingerReward.from_pretrained(checkpoint)
    (checkpoint / pretrained.SCORING_FILE).write_text(json.dumps({"mode": "reason", "temperature": 0.7}))
    with pytest.raises(FingerError, match="temperature"):
        FingerReward.from_pretrained(checkpoint)
    with pytest.raises(ValueError, match="unknown scoring settings"):
        pretrained.write_scoring_defaults(checkpoint, batch=3)


def test_tiny_names_the_shipped_evaluator_even_beside_a_local_folder_called_tiny(tmp_path, monkeypatch):
    assert pretrained.resolve("tiny") == str(pretrained.TINY_EVALUATOR)
    assert pretrained.scoring_defaults(pretrained.resolve("tiny"))["mode"] == "reason"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()
    assert pretrained.resolve("tiny") == str(pretrained.TINY_EVALUATOR)
    assert pretrained.resolve("./tiny") == "./tiny"
    assert pretrained.resolve("org/model") == "org/model"


def test_a_settings_file_that_is_not_an_object_is_named(checkpoint):
    (checkpoint / pretrained.SCORING_FILE).write_text("[1, 2]")
    with pytest.raises(FingerError, match="expected an object.*got list"):
        FingerReward.from_pretrained(checkpoint)
