"""A procedural video world: short clips of coloured shapes with one controlled defect each.

Random weights say nothing about quality; these clips do. Each clip follows a prompt
("a red circle moves from left to right"), optionally broken in one FingER dimension, so the
answer to every question about it is known from how it was made. The world is written as
real .mp4 files, a question bank and FingER-Instruct JSONL (question fields + video, answer,
reason) for tests and training.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_video(frames: np.ndarray, path: str | Path, fps: float = 8.0) -> Path:
    """Encode uint8 frames (T, H, W, 3) as an H.264 .mp4 with PyAV (even H and W required)."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = np.asarray(frames, dtype=np.uint8)
    height, width = frames.shape[1:3]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=round(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "18", "preset": "ultrafast"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path
