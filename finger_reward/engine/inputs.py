"""What the model is given for one text and one clip: the single processor call that scoring and training share."""

from __future__ import annotations

from finger_reward.video import Clip


def patch_factor(processor) -> int:
    """Frame sides must be multiples of this: the vision patch size times the spatial merge (28 or 32)."""
    video = processor.video_processor
    return video.patch_size * video.merge_size


def processor_inputs(processor, text: str, clip: Clip):
    """One text with one clip through the processor.

    Frames are already resized by `load_video` (`do_resize=False`), and the clip's real frame rate
    goes in as `video_metadata`, so mrope's temporal positions follow real time.
    """
    return processor(
        text=[text], videos=[clip.frames], video_metadata=[clip.metadata],
        do_resize=False, return_tensors="pt",
    )
