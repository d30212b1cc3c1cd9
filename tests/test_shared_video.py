"""A GRPO forward encodes its rows' shared clip once (trainers/shared_video.py): the same log-probabilities and
gradients as encoding it per row, at one vision-tower pass per forward."""

from __future__ import annotations

import pytest
import torch

from finger_reward.instruct import load_instruct
from finger_reward.synthetic import make_world
from finger_reward.trainers.grpo import GRPORecipe, VideoGRPOTrainer
from finger_reward.trainers.shared_video import encode_once, one_row_of_video


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("shared_world"), num_scenes=1)


def _lengths(completions, **kwargs):  # differs within a random model's group, so the loss has a gradient
    return [len(c) / 10 for c in completions]


def _trainer(tiny_model_dir, world, tmp_path, **overrides) -> VideoGRPOTrainer:
    options = dict(model=str(tiny_model_dir), data=str(world.instruct_path), output_dir=str(tmp_path), num_generations=4,
                   max_completion_length=8, max_steps=1, learning_rate=1e-3, seed=0, **{"max_frames": 4, **overrides})
    return VideoGRPOTrainer(GRPORecipe(**options), reward_funcs=[_lengths])


def _loss_and_grads(trainer, batch) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    trainer.model.zero_grad(set_to_none=True)
    logps = trainer.per_token_logps(trainer.model, batch)
    loss, _ = trainer.compute_loss(batch)
    loss.backward()
    return logps.detach(), loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("slowfast", [None, 0.5])  # one video block per row, or a slow and a fast pathway
def test_one_encoding_equals_one_per_row(tiny_model_dir, world, tmp_path, slowfast):
    per_row = _trainer(tiny_model_dir, world, tmp_path / "a", share_video=False, slowfast=slowfast, max_frames=8)
    shared = _trainer(tiny_model_dir, world, tmp_path / "b", slowfast=slowfast, max_frames=8)
    record = per_row.records[0]
    torch.manual_seed(3)
    batch = per_row.rollout(record)
    blocks = batch["video_grid_thw"].shape[0] // batch["input_ids"].shape[0]
    assert blocks == (2 if slowfast else 1)

    encoded = []  # patches per run of the vision tower
    hook = shared.model.model.visual.register_forward_pre_hook(lambda module, args: encoded.append(args[0].shape[0]))
    try:
        ours = _loss_and_grads(shared, batch)
    finally:
        hook.remove()
    theirs = _loss_and_grads(per_row, batch)
    patches = int(batch["video_grid_thw"][:blocks].prod(-1).sum())
    assert encoded == [patches, patches]  # the log-probabilities, then the loss: one row's clip each time
    torch.testing.assert_close(ours[0], theirs[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(ours[1], theirs[1], atol=1e-6, rtol=0)
    assert ours[2].keys() == theirs[2].keys() and any(n.startswith("model.visual") for n in ours[2])
    for name, grad in theirs[2].items():
        torch.testing.assert_close(ours[2][name], grad, atol=1e-6, rtol=1e-4, msg=name)
    # The old-policy log-probabilities the rollout stored were taken the shared way too, and agree.
    torch.testing.assert_close(shared.per_token_logps(shared.model, batch), batch["old_per_token_logps"], atol=1e-5, rtol=0)


def test_rows_must_split_the_video_blocks_evenly(tiny_model_dir, world, tmp_path):
    trainer = _trainer(tiny_model_dir, world, tmp_path)
    batch = trainer.rollout(load_instruct(world.instruct_path)[0])
    inputs = {k: batch[k] for k in ("input_ids", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")}
    with pytest.raises(ValueError, match="do not split evenly over 3 rows"):
        one_row_of_video(inputs, 3)
    with encode_once(trainer.model, 4):  # the override is this block's only
        assert "get_video_features" in vars(trainer.model.model)
    assert "get_video_features" not in vars(trainer.model.model)
