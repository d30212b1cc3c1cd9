"""Shared fixtures: a tiny real Qwen2.5-VL checkpoint and real .mp4 files, built once per session."""

from __future__ import annotations

import numpy as np
import pytest

from finger_reward.synthetic import write_video
from finger_reward.tiny import make_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random-weight Qwen2.5-VL checkpoint directory, as `finger-reward make-tiny-model` writes it."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_model_and_processor(tiny_model_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return AutoModelForImageTextToText.from_pretrained(tiny_model_dir).eval(), AutoProcessor.from_pretrained(tiny_model_dir)


def random_frames(seed: int, num_frames: int = 16, height: int = 64, width: int = 96) -> np.ndarray:
    """Smooth random uint8 frames (T, H, W, 3): blocky so that H.264 keeps them recognisable."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(num_frames, height // 16, width // 16, 3), dtype=np.uint8)
    return blocks.repeat(16, axis=1).repeat(16, axis=2)


@pytest.fixture(scope="session")
def mp4_paths(tmp_path_factory):
    """Three real H.264 .mp4 files of different lengths and sizes, 8 fps."""
    root = tmp_path_factory.mktemp("videos")
    shapes = [(16, 64, 96), (9, 48, 64), (24, 64, 64)]
    return [write_video(random_frames(i, *shape), root / f"clip{i}.mp4", fps=8) for i, shape in enumerate(shapes)]
