"""Checkpoints: ``checkpoint-<step>/`` folders that appear whole or not at all.

A checkpoint is written into a hidden temporary folder beside its final place, flushed to
disk, then renamed (one atomic ``rename`` on POSIX), so a crash or ``kill -9`` mid-write
leaves either the previous checkpoints or the new one, never half of one. Layout (Hugging
Face ``Trainer`` names where they exist, so the folder is also a loadable model):

* ``config.json``, ``model.safetensors``, tokenizer files: the student (``from_pretrained`` works);
* ``projections.safetensors``: the student→teacher width maps (when there are any);
* ``optimizer.pt``, ``scheduler.pt``: their ``state_dict``;
* ``rng_state.pth``: one entry per DDP rank: python / numpy / torch (+ cuda) RNG states, the
  random-selection generator, the exact-budget carry, the teacher budget's counters (steps, spend,
  vanilla FLOPs seen: :mod:`student_trainer.kd.budget`);
* ``trainer_state.json``: step, epoch, batch position, data seed, world size, FLOPs ledger;
* ``training_args.json``: the arguments of the run that wrote it.

Everything loads with ``torch.load(weights_only=True)``: no pickled code.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from shared.errors import UserError

PREFIX = "checkpoint-"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")
TRAINER_STATE = "trainer_state.json"


# -- RNG state ----------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """This process's python, numpy and torch RNG states, as weights_only-loadable values."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
            "has_gauss": np_state["has_gauss"],
            "gauss": np_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- finding checkpoints ------------------------------------------------------------------------


def checkpoint_step(path: Path) -> int | None:
    match = _NAME.match(path.name)
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest (lowest step) first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if checkpoint_step(p) is not None and (p / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: checkpoint_step(p) or 0)


def resolve_checkpoint(spec: str, output_dir: str | Path) -> Path | None:
    """``latest`` -> the newest checkpoint in ``output_dir``; ``auto`` -> the same, or ``None``
    (start afresh) when there is none, so a restarted job resumes; otherwise the folder given."""
    if spec in ("latest", "auto"):
        found = list_checkpoints(output_dir)
        if not found and spec == "latest":
            raise UserError(f"--resume_from_checkpoint latest: no checkpoint-<step> folder in {output_dir}")
        return found[-1] if found else None
    path = Path(spec)
    if not (path / TRAINER_STATE).is_file():
        raise UserError(f"--resume_from_checkpoint {spec}: not a checkpoint folder (no {TRAINER_STATE})")
    return path


# -- writing ------------------------------------------------------------------------------------


def _fsync_tree(root: Path) -> None:
    for path in [*root.rglob("*"), root]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    *,
    student: torch.nn.Module,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rank_states: list[dict[str, Any]],
    trainer_state: dict[str, Any],
    args: dict[str, Any],
) -> Path:
    """Write ``checkpoint-<step>`` atomically (replacing one of the same step) and return it."""
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step}"
    tmp = root / f".tmp-{PREFIX}{step}-{uuid.uuid4().hex[:8]}"
    try:
        student.model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        projections = {k: v.detach().cpu().contiguous() for k, v in student.projections.state_dict().items()}
        if projections:
            save_file(projections, str(tmp / "projections.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rank_states, tmp / "rng_state.pth")
        (tmp / "training_args.json").write_text(json.dumps(args, indent=2, sort_keys=True))
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2, sort_keys=True))
        _fsync_tree(tmp)
        if final.exists():  # the same step again (a failure right after a save): swap, then drop
            old = root / f".old-{PREFIX}{step}-{uuid.uuid4().hex[:8]}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def rotate_checkpoints(output_dir: str | Path, keep: int | None) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints (``None`` or 0: keep all); return what was deleted."""
    if not keep:
        return []
    found = list_checkpoints(output_dir)
    doomed = found[: max(0, len(found) - keep)]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


# -- reading ------------------------------------------------------------------------------------


def _read(path: Path, name: str, reader: Callable[[Path], Any]) -> Any:
    """One file of a checkpoint; a missing or damaged one is the user's to fix (another checkpoint)."""
    file = path / name
    if not file.is_file():
        raise UserError(f"{path} has no {name}: an incomplete checkpoint; resume from another one")
    try:
        return reader(file)
    except (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError, SafetensorError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"{file} is damaged ({first}); resume from another checkpoint") from err


def load_checkpoint(path: Path, *, student: torch.nn.Module, map_location: torch.device) -> dict[str, Any]:
    """Load the weights into ``student``; return the rest for the trainer to restore.

    Every file is read before anything is applied, so a broken checkpoint leaves the student as it was.
    """
    projections_file = path / "projections.safetensors"
    if len(student.projections.state_dict()) and not projections_file.exists():
        raise UserError(f"{path} has no projections.safetensors but this run needs projections")

    def _tensors(file: Path) -> dict[str, torch.Tensor]:
        return load_file(str(file), device=str(map_location))

    def _torch(file: Path) -> Any:
        return torch.load(file, map_location="cpu", weights_only=True)

    weights = _read(path, "model.safetensors", _tensors)
    projections = _read(path, projections_file.name, _tensors) if projections_file.exists() else None
    saved = {
        "optimizer": _read(path, "optimizer.pt", _torch),
        "scheduler": _read(path, "scheduler.pt", _torch),
        "rank_states": _read(path, "rng_state.pth", _torch),
        "trainer_state": _read(path, TRAINER_STATE, lambda file: json.loads(file.read_text())),
    }
    try:
        student.model.load_state_dict(weights)
        if projections is not None:
            student.projections.load_state_dict(projections)
    except RuntimeError as err:  # shape or key mismatch: a checkpoint of another configuration
        first = str(err).strip().splitlines()[0]
        raise UserError(f"{path} does not fit this student (other model or KD options?): {first}") from err
    return saved
