"""Sharded full fine-tuning for the evaluator's GRPO loop: PyTorch FSDP2 (`fully_shard`) under torchrun.

FingER fine-tunes all of a 7B Qwen2.5-VL. Plain data parallelism keeps fp32 weights, gradients and AdamW
states, plus the reference model, whole in every process (about 165 GB for 7B); sharding splits all of
them over the N processes. Each decoder layer and vision block is its own FSDP unit (the model's
`_no_split_modules`, as accelerate wraps them), so only one layer is gathered at a time in a forward or
backward pass. Weights and optimizer states stay fp32 (a 5e-7 step is lost in bf16 weights); compute
runs in `compute_dtype`; gradients are reduced in fp32 and averaged over processes, as DDP does.

Sampling is the exception: decoding a completion runs hundreds of forwards of one token, so `gathered`
holds the whole policy unsharded (in the compute dtype) for the rollout rather than gathering every
layer at every token. Checkpoints are torch.distributed.checkpoint folders: each process writes its own
shards, and a run resumes on the same number of processes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

SHARDED_DIR = "sharded"  # a checkpoint's DCP folder: the model's and the optimizer's shards


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules FSDP shards one by one: those whose class the model names as never to be split
    (Qwen2.5-VL: its decoder layers and vision blocks)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"{type(model).__name__} names no `_no_split_modules`: FSDP has no layers to shard one by one")
    return blocks


def shard(model: torch.nn.Module, *, compute_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Shard `model` in place over the default process group: each transformer block, then the rest.
    `compute_dtype` (e.g. bfloat16) is what forwards run in; the sharded weights keep their own dtype."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32 if compute_dtype else None)
    for block in transformer_blocks(model):
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _fsdp_modules(model: torch.nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextmanager
def gathered(model: torch.nn.Module) -> Iterator[None]:
    """Hold every shard of `model` gathered inside the block, so forwards in it need no communication
    (sampling, held-out evaluation on one process). Entering and leaving are collective: every process
    enters together. A model that is not sharded passes through."""
    if not is_sharded(model):
        yield
        return
    units = _fsdp_modules(model)
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            # The root keeps its parameters between forward and backward (FSDP2's own default for it).
            unit.set_reshard_after_forward(unit is not model, recurse=False)


def grad_norm_value(norm) -> float:
    """`clip_grad_norm_`'s result as a float: over sharded parameters it is a DTensor."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on the CPU of process 0 (empty elsewhere). Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded(folder: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every process writes its shards of the weights and AdamW states to `folder/sharded`. Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    weights, optim = get_state_dict(model, optimizer)
    dcp.save({"model": weights, "optimizer": optim}, checkpoint_id=str(Path(folder) / SHARDED_DIR))


def load_sharded(folder: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Restore what `save_sharded` wrote into the sharded model and optimizer. Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    weights, optim = get_state_dict(model, optimizer)
    state = {"model": weights, "optimizer": optim}
    dcp.load(state, checkpoint_id=str(Path(folder) / SHARDED_DIR))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
