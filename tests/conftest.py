"""Shared fixtures: a tiny real Qwen2.5-VL checkpoint and real .mp4 files, built once per session."""

from __future__ import annotations

import numpy as np
import pytest

from finger_reward.synthetic import write_video
from finger_reward.tiny import make_tiny_model


# transformers' own Qwen-VL position code, which no project forward may reach (finger_reward.rope).
TRANSFORMERS_ROPE = [
    ("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VLModel", "get_rope_index"),
    ("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VLModel", "compute_3d_position_ids"),
    ("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration",
     "_prepare_position_ids_for_generation"),
    ("transformers.models.qwen3_vl.modeling_qwen3_vl", "Qwen3VLModel", "get_rope_index"),
    ("transformers.models.qwen3_vl.modeling_qwen3_vl", "Qwen3VLModel", "compute_3d_position_ids"),
    ("transformers.models.qwen3_vl.modeling_qwen3_vl", "Qwen3VLForConditionalGeneration",
     "_prepare_position_ids_for_generation"),
]


class TransformersRopeUsed(AssertionError):
    """A Qwen-VL forward or generate computed its own positions instead of taking finger_reward.rope's."""


def _refuse(name):
    def refuse(*args, **kwargs):
        raise TransformersRopeUsed(f"{name} was called: every Qwen-VL forward in finger_reward must pass "
                                   "position_ids from finger_reward.rope")
    return refuse


@pytest.fixture(scope="session", autouse=True)
def no_transformers_rope():
    """Every test runs with transformers' Qwen-VL position code made to raise (DESIGN.md, The engine)."""
    import importlib

    with pytest.MonkeyPatch.context() as patch:
        for module, cls, method in TRANSFORMERS_ROPE:
            patch.setattr(getattr(importlib.import_module(module), cls), method, _refuse(f"{cls}.{method}"))
        yield


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
