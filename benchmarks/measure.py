"""Peak memory and device names, shared by the benchmark scripts (imported as `measure` beside them)."""

from __future__ import annotations

import platform
from pathlib import Path

import torch


def peak_reset(device) -> None:
    """Start a new peak: CUDA's allocator statistics, or on Linux the process's peak RSS."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    elif Path("/proc/self/clear_refs").exists():
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak RSS (VmHWM) to the current RSS


def peak_mb(device) -> float:
    """MiB: CUDA max_memory_allocated since `peak_reset`, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # never reset: the process's peak


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
