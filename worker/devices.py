"""What a worker's device can do: the dtype to compute in, the cores it may use."""

from __future__ import annotations

import os

import torch


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    """The requested dtype, or for "auto" the fastest one that keeps results sound on the device.

    CUDA: bfloat16 where the GPU has it (Ampere and later), else float16. CPU: bfloat16 where the cores
    have AMX tiles (Sapphire Rapids and later), on which oneDNN runs it about twice as fast as float32 with
    embeddings as good; elsewhere bfloat16 is emulated and slower, so float32.
    """
    if requested and requested != "auto":
        return getattr(torch, requested)
    if device.type == "cuda":
        # Emulated bfloat16 (pre-Ampere) counts as supported by default, and is slow: ask for the real thing.
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return torch.bfloat16 if cpu_has_amx() else torch.float32


def usable_cpus() -> int:
    """The cores this process may run on: its affinity mask (taskset, a Slurm or Kubernetes cpuset), not the
    host's count, which would oversubscribe the cores it has."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def cpu_has_amx() -> bool:
    is_supported = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private, so not in every torch
    return bool(is_supported and is_supported())
