"""Service settings as one dataclass, loadable from YAML (`configs/serve.yaml`) like HF argument dataclasses."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from finger_reward.pretrained import SLOWFAST_THRESHOLD, as_slowfast, slowfast_threshold
from finger_reward.recipes import from_yaml


@dataclass
class ServeConfig:
    """Every field of `finger-reward serve`; a YAML file sets any of them, command-line flags win."""

    model: str | None = field(default=None, metadata={"help": "checkpoint directory or hub id"})
    questions: str | None = field(default=None, metadata={"help": "question bank JSONL (default: template questions)"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind; loopback unless told otherwise"})
    port: int = 8000
    token: str | None = field(default=None, metadata={"help": "require 'Authorization: Bearer <token>'"})
    allow_path: str | None = field(default=None, metadata={"help": "accept video paths inside this directory"})
    max_payload_mb: float = field(default=256.0, metadata={
        "help": "request size limit; 16 Wan clips sampled by the client at the default settings fit"})
    max_batch_size: int = 16
    max_batch_tokens: int | None = None
    max_wait_ms: float = 10.0
    max_queue: int = 256
    drain_timeout_s: float = field(default=60.0, metadata={
        "help": "on SIGTERM/SIGINT, how long requests already received may take to be answered before exit"})
    result_ttl_s: float = field(default=300.0, metadata={
        "help": "how long an answer is kept for a retry with the same Idempotency-Key header"})
    prepare_workers: int | None = field(default=None, metadata={"help": "decoding threads (default: 1 beside a CPU model, more beside a GPU)"})
    replicas: int | None = field(default=None, metadata={"help": "Ray Serve replicas; None runs one process without Ray"})
    num_gpus_per_replica: float | None = field(default=None, metadata={"help": "default: 1 when CUDA is present, else 0"})
    num_cpus_per_replica: float = 1.0
    # None: the checkpoint's finger_reward.json, else answer mode, 2 fps, 48 frames, 448x448.
    mode: str | None = None
    max_new_tokens: int = 256
    fps: float | None = None
    max_frames: int | None = None
    max_pixels: int | None = None
    slowfast: float | bool | None = field(
        default=None,
        metadata={"help": "Q-Save SlowFast frames with this patch similarity threshold in (0, 1] (true: 0.9); "
                          "false: plain frames; None: as the checkpoint was trained, else plain"},
    )
    video_fps: float | None = field(default=None, metadata={
        "help": "frame rate of in-memory frames sent without one (a request's video_fps wins)"})
    aggregate: str = "mean"
    weights: dict[str, float] | None = None
    device: str | None = None
    dtype: str | None = None

    def __post_init__(self):
        if self.max_batch_size < 1 or self.max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be at least 1")
        if self.replicas is not None and self.replicas < 1:
            raise ValueError(f"replicas must be at least 1, got {self.replicas}")
        if self.allow_path is not None and not Path(self.allow_path).is_dir():
            raise ValueError(f"allow_path {self.allow_path!r} is not a directory")
        if self.slowfast is True:
            self.slowfast = SLOWFAST_THRESHOLD  # as the bare --slowfast flag
        elif self.slowfast is not False:
            slowfast_threshold(self.slowfast)

    @classmethod
    def from_yaml(cls, path: str | Path | None = None, **overrides) -> "ServeConfig":
        """Fields from a YAML file (unknown keys are an error naming the valid ones), then the overrides that
        are not None (command-line flags left unset)."""
        return from_yaml(cls, path, **{k: v for k, v in overrides.items() if v is not None})

    def reward_options(self) -> dict:
        """Keyword arguments for `FingerReward.from_pretrained`."""
        keys = ("mode", "max_new_tokens", "fps", "max_frames", "max_pixels", "video_fps", "aggregate", "weights",
                "device", "dtype")
        options = {k: getattr(self, k) for k in keys}
        trained = ("mode", "fps", "max_frames", "max_pixels")  # left unset: as the checkpoint was trained
        options = {"questions": self.questions, **{k: v for k, v in options.items() if v is not None or k not in trained}}
        if self.slowfast is not None:  # false: plain frames, whatever the checkpoint was trained on
            options["slowfast"] = as_slowfast(self.slowfast or None)
        return options

    def build_reward(self):
        """The `FingerReward` this config serves; the one-process server and every Ray replica load it so."""
        from finger_reward.reward import FingerReward

        return FingerReward.from_pretrained(self.model, **self.reward_options())

    def batcher_options(self) -> dict:
        keys = ("max_batch_size", "max_batch_tokens", "max_wait_ms", "max_queue", "prepare_workers")
        return {k: getattr(self, k) for k in keys}

    def to_dict(self) -> dict:
        return asdict(self)
