"""Where this process runs: its device, and its place in a ``torchrun`` job with the few collectives
the loop needs (each a no-op on one process).

Not ``DistributedDataParallel``: dynamic KD uses different parameters on different steps and
ranks (a projection only when its teacher answered rows), which DDP's reducer cannot track; one
explicit all-reduce of every gradient after backward is exact and simple.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

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

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_processes(device_name: str) -> Processes:
    """Join the ``torchrun`` process group when there is one (gloo on CPU, nccl on GPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Processes(0, 1, resolve_device(device_name))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Processes(dist.get_rank(), world_size, device)


def average_gradients(parameters: list[torch.nn.Parameter], world_size: int) -> None:
    """Average every gradient over the ranks, as one process on the whole batch would see it.

    A rank that did not use a parameter this step adds zeros; a parameter no rank used (a
    projection on a step that selected no rows) keeps ``grad = None``, so AdamW skips it —
    weight decay and momentum included — exactly as a single process does.
    """
    used = torch.tensor(
        [p.grad is not None for p in parameters], dtype=torch.float32, device=parameters[0].device
    )
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([*(g.reshape(-1) for g in grads), used])
    dist.all_reduce(flat)
    flat /= world_size
    sizes = [g.numel() for g in grads]
    *averaged, used_anywhere = flat.split([*sizes, len(parameters)])
    for p, g, anywhere in zip(parameters, averaged, used_anywhere.tolist(), strict=True):
        p.grad = g.view_as(p) if anywhere > 0 else None


def any_rank(flag: bool, procs: Processes) -> bool:
    """True on every rank if ``flag`` is true on any rank (so all ranks take the same branch)."""
    if procs.world_size == 1:
        return flag
    tensor = torch.tensor([int(flag)], device=procs.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def mean_over_ranks(values: dict[str, float], procs: Processes) -> dict[str, float]:
    """Average scalar metrics over the ranks, so logs describe the whole job."""
    if procs.world_size == 1:
        return values
    tensor = torch.tensor(list(values.values()), dtype=torch.float64, device=procs.device)
    dist.all_reduce(tensor)
    return dict(zip(values, (tensor / procs.world_size).tolist(), strict=True))


def gather_to_main(obj: Any, procs: Processes) -> list[Any]:
    """Every rank's ``obj`` on rank 0 (a list indexed by rank); empty on other ranks."""
    if procs.world_size == 1:
        return [obj]
    gathered: list[Any] | None = [None] * procs.world_size if procs.is_main else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered or []


def barrier(procs: Processes) -> None:
    """Wait for every rank (rank 0 evaluates and writes while the others wait)."""
    if procs.world_size > 1:
        dist.barrier()
