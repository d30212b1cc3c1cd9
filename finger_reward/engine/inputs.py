"""What the model is given for one text and one clip: the single processor call that scoring and training share."""

from __future__ import annotations

from collections.abc import Sequence

from finger_reward.prompts import expand_video
from finger_reward.video import Clip


def patch_factor(processor) -> int:
    """Frame sides must be multiples of this: the vision patch size times the spatial merge (28 or 32)."""
    video = processor.video_processor
    return video.patch_size * video.merge_size


def placeholder_token_ids(processor) -> list[int]:
    """The image and video placeholder tokens: never generated, since each must match a vision feature."""
    ids = (getattr(processor, "image_token_id", None), getattr(processor, "video_token_id", None))
    return [i for i in ids if i is not None]


def processor_inputs(processor, text: str, clip: Clip | Sequence[Clip]):
    """One text with one clip (or, for a two-video comparison prompt, its clips in order) through the processor.

    Frames are already sampled and resized by `load_video` (`do_sample_frames=False`: Qwen3-VL's
    processor would otherwise resample them at its own fps; `do_resize=False`), and the clip's real
    frame rate goes in as `video_metadata`, so mrope's temporal positions follow real time. A SlowFast clip
    is two videos (`prompts.video_blocks`): the text's one video placeholder becomes both, and
    `video_grid_thw` gets a row per pathway.
    """
    clips = [clip] if isinstance(clip, Clip) else list(clip)
    videos = [video for c in clips for video in c.videos]
    return processor(
        text=[expand_video(text, processor, clips)], videos=[frames for frames, _ in videos],
        video_metadata=[metadata for _, metadata in videos], do_sample_frames=False, do_resize=False,
        return_tensors="pt",
    )
