"""Where this process runs: its device, and its place in a ``torchrun`` job (the ``Trainer`` owns the
process group and gradient averaging); :func:`any_rank` lets every process take the same branch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from shared.errors import UserError


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` → CUDA when present; a bare ``cuda`` means this process's own GPU under torchrun."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UserError(f"--device {name!r} is not a device (cpu, cuda, cuda:N, auto)") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available here")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


@dataclass(frozen=True)
class Processes:
    """Where this process sits in a ``torchrun`` job (rank 0 of 1 without one)."""

    rank: int
    world_size: int
    device: torch.device


def any_rank(flag: bool, procs: Processes) -> bool:
    """True on every rank if ``flag`` is true on any rank (so all ranks take the same branch)."""
    if procs.world_size == 1:
        return flag
    tensor = torch.tensor([int(flag)], device=procs.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())
