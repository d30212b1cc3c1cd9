"""Sampled clips on the wire: the client samples and resizes as the server would, the server uses them as they are.

A clip entry of a `/v1/score` request (`{"clip": clip_payload(...)}`) holds the frames the model
will be given, losslessly compressed (RGB H.264 at crf 0, `video.encode_frames`, or raw bytes when that is smaller, as for
noise), the exact rate they were sampled at, the server settings they were sampled with, and the
SlowFast pathways when the server uses them. Decoding gives back the same `Clip` bit for bit, so
scores through the service equal in-process scores of the same arrays.
"""

from __future__ import annotations

import base64
import binascii
import math

import numpy as np
import torch

from finger_reward.errors import FingerError
from finger_reward.video import Clip, Pathway, decode_lossless, encode_frames

CODECS = ("h264rgb", "raw")


class WireError(FingerError):
    """A clip entry that cannot be turned back into a `Clip`."""


def pack_frames(frames: torch.Tensor) -> dict:
    """uint8 (T, C, H, W) as {"codec", "shape", "data"}: lossless H.264, or raw bytes if those are smaller."""
    raw = frames.contiguous().numpy().tobytes()
    encoded = encode_frames(frames)
    codec, data = ("h264rgb", encoded) if len(encoded) < len(raw) else ("raw", raw)
    return {"codec": codec, "shape": list(frames.shape), "data": base64.b64encode(data).decode()}


def unpack_frames(packed, what: str, name: str) -> torch.Tensor:
    """The frames `pack_frames` packed, checked against their declared shape."""
    if not isinstance(packed, dict) or packed.get("codec") not in CODECS:
        raise WireError(f"{what}: expected {{\"codec\": one of {CODECS}, \"shape\": [T, C, H, W], \"data\": base64}}")
    shape = packed.get("shape")
    if not (isinstance(shape, list) and len(shape) == 4 and all(isinstance(n, int) and n > 0 for n in shape)
            and shape[1] == 3):
        raise WireError(f"{what}: shape {shape!r} is not [T, 3, H, W] with positive sizes")
    try:
        data = base64.b64decode(packed.get("data") or "", validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise WireError(f"{what}: data is not valid base64") from None
    if packed["codec"] == "raw":
        if len(data) != math.prod(shape):
            raise WireError(f"{what}: {len(data)} raw bytes do not hold uint8 frames of shape {shape}")
        return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy().reshape(shape))
    try:
        frames = decode_lossless(data, name)
    except FingerError as err:
        raise WireError(f"{what}: {err}") from None
    if list(frames.shape) != shape:
        raise WireError(f"{what}: decoded to shape {list(frames.shape)}, declared {shape}")
    return frames


def clip_payload(clip: Clip, sampling: dict) -> dict:
    """The request entry's "clip" object for a `Clip` sampled with the server's `sampling` (its /v1/health)."""
    payload = {"frames": pack_frames(clip.frames), "fps": clip.fps, "sampling": sampling}
    if clip.pathways:
        payload["pathways"] = [
            {"kind": p.kind, "indices": list(p.indices),
             **({} if torch.equal(p.frames, clip.frames[list(p.indices)]) else {"frames": pack_frames(p.frames)})}
            for p in clip.pathways
        ]
    return payload


def clip_from_payload(payload: dict, name: str) -> Clip:
    """The `Clip` a "clip" object describes; its frames must fit its `sampling` (frame count, pixels, patch)."""
    sampling = payload.get("sampling") or {}
    frames = unpack_frames(payload.get("frames"), "frames", name)
    fps = payload.get("fps")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps < math.inf:
        raise WireError(f"fps={fps!r} is not a positive frame rate")
    t, _, h, w = frames.shape
    factor = sampling.get("patch_factor") or 1
    if t > sampling.get("max_frames", t) or h * w > sampling.get("max_pixels", h * w) or h % factor or w % factor:
        raise WireError(f"{t} frames of {w}x{h} do not fit the sampling they claim ({sampling})")
    pathways = []
    for k, entry in enumerate(payload.get("pathways") or []):
        indices = entry.get("indices") if isinstance(entry, dict) else None
        if not (isinstance(indices, list) and indices and all(isinstance(i, int) and 0 <= i < t for i in indices)):
            raise WireError(f"pathway {k}: indices must be a non-empty list of frame indices below {t}")
        own = entry.get("frames")
        path_frames = unpack_frames(own, f"pathway {k} frames", name) if own is not None else frames[indices]
        if path_frames.shape[0] != len(indices):
            raise WireError(f"pathway {k}: {path_frames.shape[0]} frames for {len(indices)} indices")
        pathways.append(Pathway(str(entry.get("kind")), path_frames, tuple(indices)))
    return Clip(frames=frames, fps=float(fps), name=name, pathways=tuple(pathways))
