"""Pydantic models of the service's HTTP API: what `/openapi.json` and `/docs` describe, and what requests must hold.

Shapes are checked here; contents (base64, .npy arrays, clips, allowed paths) are decoded by `ScoreAPI`,
which names the video whose content is bad.
"""

from __future__ import annotations

from typing import Any, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Rate = Union[float, None]


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, description="a label for errors (e.g. the client's file name)")
    video_fps: float | None = Field(None, description="frame rate of in-memory frames; wins over the request's")
    fps: float | None = Field(None, description="alias of video_fps", json_schema_extra={"deprecated": True})


class DataVideo(_Entry):
    """An encoded video file (mp4, webm, ...) as base64; it carries its own frame rate."""

    data: str = Field(description="base64 of the file's bytes")


class NpyVideo(_Entry):
    """Frames as base64 of a uint8 .npy array (T, H, W, C); give its frame rate in video_fps."""

    npy: str = Field(description="base64 of a .npy file holding uint8 (T, H, W, C)")


class PathVideo(_Entry):
    """A file inside the directory the server was started with (--allow-path DIR); 403 otherwise."""

    path: str = Field(description="relative to the allowed directory, or absolute inside it")


class ClipVideo(_Entry):
    """Frames the client already sampled and resized with the server's /v1/health "sampling" (see serve.wire)."""

    clip: dict[str, Any] = Field(description='{"frames": {"codec", "shape", "data"}, "fps", "sampling", "pathways"?}')


Video = Union[str, DataVideo, NpyVideo, PathVideo, ClipVideo]


class ScoreRequest(BaseModel):
    """POST /v1/score: videos and their prompts (one for all, or one per video)."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"prompts": "a red circle moves", "videos": ["AAAAIGZ0eXBpc29t..."]},
        {"prompts": ["a red circle moves"], "videos": [{"path": "clips/a.mp4"}]},
        {"prompts": ["a red circle moves"], "videos": [{"npy": "k05VTVBZAQB2AHsnZGVzY3In...", "video_fps": 16}]},
    ]})

    videos: list[Video] = Field(description="a base64 string (an encoded file) or an object with one of "
                                            '"data", "npy", "path", "clip"')
    prompts: str | list[str] = Field(description="one prompt for every video, or one per video")
    video_fps: Rate | list[Rate] = Field(None, description="frame rate of in-memory frames: one, or one per video")

    @field_validator("videos")
    @classmethod
    def _not_empty(cls, videos: list) -> list:
        if not videos:
            raise ValueError('"videos" must be a non-empty list')
        return videos

    @model_validator(mode="after")
    def _one_prompt_per_video(self) -> "ScoreRequest":
        if isinstance(self.prompts, list) and len(self.prompts) != len(self.videos):
            raise ValueError(f'"prompts" must be one string or a list of {len(self.videos)} strings (one per video)')
        return self


class QuestionResult(BaseModel):
    """One question's answer: P(Yes), P(No), its score (Eq. 2) and the hard answer."""

    model_config = ConfigDict(extra="allow")

    dimension: str
    entity: str
    question: str
    positive: bool
    p_yes: float | None
    p_no: float | None
    score: float | None
    answer: str
    reason: str | None = None


class VideoResult(BaseModel):
    """One video's scores, or its error (overall null) while the request's other videos are scored."""

    model_config = ConfigDict(extra="allow")

    video: str
    prompt: str
    overall: float | None = Field(description="weighted sum of the dimension scores (Eq. 4); null on error")
    dimensions: dict[str, float | None] = {}
    questions: list[QuestionResult] = []
    hard_overall: float | None = None
    hard_dimensions: dict[str, float | None] = {}
    error: str | None = None
    sampled: dict[str, Any] | None = Field(None, description="frames, fps and size the model saw")


class ErrorBody(BaseModel):
    message: str
    status: int
    failures: dict[str, str] | None = Field(None, description="video index -> its error (score requests)")


class ErrorResponse(BaseModel):
    error: ErrorBody


class ScoreResponse(BaseModel):
    """One result per video, in order; "error" is set (with status 400/500) when some videos failed."""

    results: list[VideoResult]
    error: ErrorBody | None = None


class Sampling(BaseModel):
    fps: float
    max_frames: int
    max_pixels: int
    patch_factor: int
    slowfast: dict[str, Any] | None = None


class HealthResponse(BaseModel):
    """The server's sampling settings (clients sample in-memory frames with them) and payload limit."""

    status: str = "ok"
    sampling: Sampling | None
    max_payload_bytes: int
