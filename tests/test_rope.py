"""finger_reward.rope: Qwen-VL positions as the original code computes them, derived here by hand."""

from __future__ import annotations

import pytest
import torch

from finger_reward.rope import RopeLayout, rope_positions

T, IMG, VID = 9, 5, 6  # a text token, the image and video placeholders
QWEN25 = RopeLayout("qwen2_5_vl", image_token_id=IMG, video_token_id=VID, spatial_merge_size=2, tokens_per_second=4)


def grid(*thw):
    return torch.tensor([list(thw)])


def ids(*parts):
    """[(token, count), ...] as one row of input_ids."""
    return torch.tensor([[token for token, count in parts for _ in range(count)]])


def positions(layout, input_ids, mask=None, **grids):
    pos, delta = rope_positions(layout, input_ids, mask, **grids)
    return pos.tolist(), delta.flatten().tolist()


def test_video_then_text_resumes_one_past_the_video_maximum():
    # 3 text tokens, a video of 4x4x6 patches (4 temporal slices of 2x3 merged patches), 2 text tokens;
    # tokens_per_second 4 and 1 s per temporal patch: slices at time 0, 4, 8, 12 after the text.
    (t, h, w), delta = positions(QWEN25, ids((T, 3), (VID, 24), (T, 2)), video_grid_thw=grid(4, 4, 6),
                                 second_per_grid_ts=torch.tensor([1.0]))
    video_t = [3 + 4 * i for i in range(4) for _ in range(6)]
    video_h = [3 + r for _ in range(4) for r in range(2) for _ in range(3)]
    video_w = [3 + c for _ in range(4) for _ in range(2) for c in range(3)]
    assert t[0] == [0, 1, 2] + video_t + [16, 17]  # transformers 5.10.4 starts this text at 6
    assert h[0] == [0, 1, 2] + video_h + [16, 17]
    assert w[0] == [0, 1, 2] + video_w + [16, 17]
    assert delta == [18 - 29]


@pytest.mark.parametrize("spg, times", [
    (0.5, [0, 1, 2, 3]),      # 2 tokens per second: i * 0.5 * 2
    (1.0, [0, 2, 4, 6]),
    (1.68, [0, 3, 6, 10]),    # 3.36, 6.72, 10.08 truncated after scaling (transformers 5.x: int(1.68) = 1 first)
    (2.0, [0, 4, 8, 12]),
])
def test_seconds_per_grid_scale_as_a_float_then_truncate(spg, times):
    layout = RopeLayout("qwen2_5_vl", IMG, VID, spatial_merge_size=2, tokens_per_second=2)
    (t, _, _), _ = positions(layout, ids((T, 1), (VID, 4), (T, 1)), video_grid_thw=grid(4, 2, 2),
                             second_per_grid_ts=torch.tensor([spg]))
    assert t[0] == [0] + [1 + x for x in times] + [1 + times[-1] + 1]


def test_two_videos_each_after_the_previous_maximum():
    # SlowFast layout: marker text, video A (2 slices of 1x1), text, video B (1 slice of 2x2), question.
    (t, h, w), _ = positions(QWEN25, ids((T, 2), (VID, 2), (T, 1), (VID, 4), (T, 1)),
                             video_grid_thw=torch.tensor([[2, 2, 2], [1, 4, 4]]),
                             second_per_grid_ts=torch.tensor([0.5, 1.0]))
    # A: times 0, 2 at offset 2 -> t 2, 4; h = w = 2. Text at 5. B at offset 6: t 6, h 6-7, w 6-7. Text at 8.
    assert t[0] == [0, 1, 2, 4, 5, 6, 6, 6, 6, 8]
    assert h[0] == [0, 1, 2, 2, 5, 6, 6, 7, 7, 8]
    assert w[0] == [0, 1, 2, 2, 5, 6, 7, 6, 7, 8]


def test_image_has_no_time_axis():
    (t, h, w), _ = positions(QWEN25, ids((T, 1), (IMG, 6), (T, 1)), image_grid_thw=grid(1, 4, 6))
    assert t[0] == [0, 1, 1, 1, 1, 1, 1, 4]
    assert h[0] == [0, 1, 1, 1, 2, 2, 2, 4]
    assert w[0] == [0, 1, 2, 3, 1, 2, 3, 4]


def test_padding_on_either_side_leaves_positions_unchanged():
    row = ids((T, 2), (VID, 2), (T, 2))[0].tolist()
    pad = 0
    batch = torch.tensor([[pad, pad] + row, row + [pad, pad]])
    mask = torch.tensor([[0, 0] + [1] * 6, [1] * 6 + [0, 0]])
    spg = torch.tensor([1.0, 1.0])
    (t, h, w), delta = positions(QWEN25, batch, mask, video_grid_thw=torch.tensor([[2, 2, 2], [2, 2, 2]]),
                                 second_per_grid_ts=spg)
    alone = [0, 1, 2, 6, 7, 8]  # video slices at 2 and 2 + 4
    assert t == [[1, 1] + alone, alone + [1, 1]]  # padded slots hold 1, as in the original
    assert delta == [9 - 8, 9 - 8]


def test_qwen3_vl_every_frame_is_its_own_block_after_its_timestamp():
    layout = RopeLayout("qwen3_vl", IMG, VID, spatial_merge_size=2)
    # "<0.5 seconds>" frame "<1.5 seconds>" frame: each temporal patch of 2x2 merged patches is a block of t=1.
    (t, h, w), _ = positions(layout, ids((T, 2), (VID, 4), (T, 2), (VID, 4), (T, 1)), video_grid_thw=grid(2, 4, 4))
    assert t[0] == [0, 1, 2, 2, 2, 2, 4, 5, 6, 6, 6, 6, 8]
    assert h[0] == [0, 1, 2, 2, 3, 3, 4, 5, 6, 6, 7, 7, 8]
    assert w[0] == [0, 1, 2, 3, 2, 3, 4, 5, 6, 7, 6, 7, 8]


def test_grids_that_do_not_match_the_tokens_are_refused():
    with pytest.raises(ValueError, match="consecutive video tokens"):
        rope_positions(QWEN25, ids((T, 1), (VID, 3), (T, 1)), video_grid_thw=grid(1, 4, 4))
    with pytest.raises(ValueError, match="more video grids"):
        rope_positions(QWEN25, ids((T, 1), (VID, 4)), video_grid_thw=torch.tensor([[1, 4, 4], [1, 4, 4]]))
    with pytest.raises(ValueError, match="more video blocks"):
        rope_positions(QWEN25, ids((VID, 4), (T, 1), (VID, 4)), video_grid_thw=grid(1, 4, 4))


def test_layout_from_a_real_config(tiny_model_and_processor):
    model, _ = tiny_model_and_processor
    layout = RopeLayout.from_config(model.config)
    assert (layout.arch, layout.video_token_id, layout.spatial_merge_size) == (
        "qwen2_5_vl", model.config.video_token_id, model.config.vision_config.spatial_merge_size)
    assert layout.tokens_per_second == model.config.vision_config.tokens_per_second
    with pytest.raises(ValueError, match="no rope positions for model_type 'llava'"):
        RopeLayout("llava", IMG, VID)


def test_a_forward_without_project_positions_is_caught(tiny_model_and_processor, mp4_paths):
    """The suite-wide guard (conftest.no_transformers_rope) fires on a forward that leaves positions to transformers."""
    from finger_reward.engine.inputs import processor_inputs
    from finger_reward.rope import with_rope_positions
    from finger_reward.video import load_video
    from tests.conftest import TransformersRopeUsed

    model, processor = tiny_model_and_processor
    inputs = processor_inputs(processor, "<|vision_start|><|video_pad|><|vision_end|>Is it red?", load_video(mp4_paths[0]))
    with pytest.raises(TransformersRopeUsed, match="compute_3d_position_ids"):
        model(**inputs)
    with pytest.raises(TransformersRopeUsed, match="_prepare_position_ids_for_generation"):
        model.generate(**inputs, max_new_tokens=1)
    model(**with_rope_positions(model.config, inputs))  # the project's way
    model.generate(**with_rope_positions(model.config, inputs), max_new_tokens=2, do_sample=False)


@pytest.mark.parametrize("frames, text_after", [(10, 21), (48, 47)])
def test_a_7b_config_at_real_size(frames, text_after):
    """Qwen2.5-VL-7B's released config (tokens_per_second 2, merge 2) and a Wan clip (81 frames at 16 fps,
    480x832) as the engine samples it: 2 fps, 336x588 under 448*448 pixels -> 24x42 patches per frame."""
    from transformers import Qwen2_5_VLConfig

    layout = RopeLayout.from_config(Qwen2_5_VLConfig(vision_config={"tokens_per_second": 2}))
    assert (layout.video_token_id, layout.spatial_merge_size, layout.tokens_per_second) == (151656, 2, 2)
    t = frames // 2
    video = torch.tensor([[t, 24, 42]])
    input_ids = torch.tensor([[1] * 20 + [151656] * (t * 12 * 21) + [1] * 5])
    pos, _ = rope_positions(layout, input_ids, video_grid_thw=video, second_per_grid_ts=torch.tensor([1.0]))
    # The video starts at 20; its largest position is 20 + max((t - 1) * 1 s * 2, 11, 20): width for 5 s of
    # video, time for 24 s (where transformers 5.x, resuming at 20 + 21 regardless, overlaps the video's times).
    assert pos[:, 0, -5].tolist() == [20 + text_after] * 3
    assert pos[0, 0, 20 + 12 * 21 * (t - 1)].item() == 20 + 2 * (t - 1)
