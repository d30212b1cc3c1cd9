"""Data parallelism for the evaluator's own GRPO loop: one process per GPU under `torchrun` or `accelerate launch`.

Every process samples and scores its own questions; after the backward passes the trainable
gradients are averaged over processes, so every process takes the same optimizer step and the
weights stay equal. Metrics are averaged and rollouts gathered so that the main process logs the
whole step. Alone (no WORLD_SIZE > 1 in the environment) every method is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class DataParallel:
    """This process's place in the group: rank `rank` of `world_size`, computing on `device`."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @classmethod
    def from_env(cls) -> "DataParallel":
        """Join the process group that torchrun / accelerate launch describe (NCCL on CUDA, else gloo)."""
        cuda = torch.cuda.is_available()
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        world_size = int(os.environ.get("WORLD_SIZE", 1))
        if world_size == 1:
            return cls(device=device)
        import torch.distributed as dist

        if cuda:
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if cuda else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def broadcast_parameters(self, model: torch.nn.Module) -> None:
        """Give every process the main process's trainable weights (as DDP does when it wraps a model)."""
        if self.world_size == 1:
            return
        import torch.distributed as dist

        for param in model.parameters():
            if param.requires_grad:
                dist.broadcast(param.data, src=0)

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Replace each gradient by its mean over processes (a parameter without one counts as zeros)."""
        if self.world_size == 1:
            return
        import torch.distributed as dist

        for param in params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
            param.grad.div_(self.world_size)

    def gather(self, items: list) -> list:
        """Every process's `items`, concatenated in rank order, on every process."""
        if self.world_size == 1:
            return items
        import torch.distributed as dist

        parts: list[Any] = [None] * self.world_size
        dist.all_gather_object(parts, items)
        return [item for part in parts for item in part]

    def average_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Each metric averaged over the processes that report it."""
        if self.world_size == 1:
            return metrics
        values: dict[str, list[float]] = {}
        for part in self.gather([metrics]):
            for key, value in part.items():
                values.setdefault(key, []).append(value)
        return {key: sum(v) / len(v) for key, v in values.items()}

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()
