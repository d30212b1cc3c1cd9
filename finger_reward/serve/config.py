"""Service settings as one dataclass, loadable from YAML (`configs/serve.yaml`) like HF argument dataclasses."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


@dataclass
class ServeConfig:
    """Every field of `finger-reward serve`; a YAML file sets any of them, command-line flags win."""

    model: str | None = field(default=None, metadata={"help": "checkpoint directory or hub id"})
    questions: str | None = field(default=None, metadata={"help": "question bank JSONL (default: template questions)"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind; loopback unless told otherwise"})
    port: int = 8000
    token: str | None = field(default=None, metadata={"help": "require 'Authorization: Bearer <token>'"})
    allow_path: str | None = field(default=None, metadata={"help": "accept video paths inside this directory"})
    max_payload_mb: float = 64.0
    max_batch_size: int = 16
    max_batch_tokens: int | None = None
    max_wait_ms: float = 10.0
    max_queue: int = 256
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

    @classmethod
    def from_yaml(cls, path: str | Path | None = None, **overrides) -> "ServeConfig":
        """Fields from a YAML file (unknown keys are an error naming the valid ones), then `overrides`."""
        import yaml

        values = {}
        if path is not None:
            values = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(values) - known)
            if unknown:
                raise ValueError(f"{path}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def reward_options(self) -> dict:
        """Keyword arguments for `FingerReward.from_pretrained`."""
        keys = ("mode", "max_new_tokens", "fps", "max_frames", "max_pixels", "aggregate", "weights", "device", "dtype")
        options = {k: getattr(self, k) for k in keys}
        trained = ("mode", "fps", "max_frames", "max_pixels")  # left unset: as the checkpoint was trained
        return {"questions": self.questions, **{k: v for k, v in options.items() if v is not None or k not in trained}}

    def batcher_options(self) -> dict:
        keys = ("max_batch_size", "max_batch_tokens", "max_wait_ms", "max_queue", "prepare_workers")
        return {k: getattr(self, k) for k in keys}

    def to_dict(self) -> dict:
        return asdict(self)
