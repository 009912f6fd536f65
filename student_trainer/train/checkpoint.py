"""Checkpoints are ``checkpoint-<step>/`` folders as the Hugging Face ``Trainer`` writes them (model,
optimizer, scheduler, RNG, ``trainer_state.json``) plus dynamic KD's ``kd_state.pt``
(:class:`~student_trainer.train.trainer.KDState`) and, written last, ``checksums.sha256``
(:mod:`~student_trainer.train.checksums`; :class:`~student_trainer.train.guarded.GuardedTrainer`
writes them). This module finds them (``latest``, ``auto``: the newest whose files match their
checksums), refuses to mix a new run with another run's, removes what a run killed mid-write left,
and captures the RNG state that a step which could not finish is rolled back to.
"""

from __future__ import annotations

import functools
import random
import re
import shutil
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME

from shared.errors import UserError
from student_trainer.train.checksums import CHECKSUMS, checksum_mismatch

PREFIX = "checkpoint-"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")
STAGING = ".tmp-"  # .tmp-checkpoint-<step>: a checkpoint being written
_STAGED = re.compile(rf"^{re.escape(STAGING)}{PREFIX}\d+$")


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
    """``checkpoint-<step>`` folders of ``output_dir`` with their ``trainer_state.json``, oldest (lowest
    step) first; not one still being written (a link to its ``.tmp-`` folder, see
    :class:`~student_trainer.train.guarded.StagedCheckpoint`)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if checkpoint_step(p) is not None and not p.is_symlink() and (p / TRAINER_STATE_NAME).is_file()
    ]
    return sorted(found, key=lambda p: checkpoint_step(p) or 0)


def remove_stale_writes(output_dir: str | Path) -> list[str]:
    """Remove what a run killed while writing a checkpoint left: its ``.tmp-checkpoint-<step>``
    folder and the ``checkpoint-<step>`` link to it. Only at the start of a run, by the process that
    writes checkpoints: no process of the run is writing one then. Returns the folders removed."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir() if _STAGED.match(p.name)]
    links = [p for p in root.iterdir() if checkpoint_step(p) is not None and p.is_symlink()]
    for path in links:
        path.unlink()
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return sorted(p.name for p in stale)


def resolve_checkpoint(
    spec: str, output_dir: str | Path, say: Callable[[str], None] | None = None
) -> Path | None:
    """``latest`` -> the newest checkpoint in ``output_dir`` that :func:`checkpoint_problem` passes,
    each newer one skipped said (``say``) with its reason; ``auto`` -> the same, or ``None`` (start
    afresh) when there is no checkpoint at all, so a restarted job resumes; otherwise the folder given,
    which must pass."""
    if spec not in ("latest", "auto"):
        path = Path(spec)
        if not (path / TRAINER_STATE_NAME).is_file():
            raise UserError(
                f"--resume_from_checkpoint {spec}: not a checkpoint folder (no {TRAINER_STATE_NAME})"
            )
        problem = checkpoint_problem(path)
        if problem is not None:
            raise UserError(f"--resume_from_checkpoint {spec}: {problem}; resume from another checkpoint")
        return path
    found = list_checkpoints(output_dir)
    if not found and spec == "latest":
        raise UserError(f"--resume_from_checkpoint latest: no checkpoint-<step> folder in {output_dir}")
    problems: dict[Path, str | None] = {}
    for path in reversed(found):
        problems[path] = checkpoint_problem(path)
        if problems[path] is None:
            return path
        if say is not None:
            say(f"skipping {path}: {problems[path]}")
    if found:
        raise UserError(
            f"--resume_from_checkpoint {spec}: no checkpoint in {output_dir} can be resumed from "
            f"(newest, {found[-1].name}: {problems[found[-1]]}); start afresh with --overwrite_output_dir "
            "and no --resume_from_checkpoint"
        )
    return None


def checkpoint_problem(path: Path) -> str | None:
    """Why resuming from ``path`` would fail or mislead, in words naming the file; ``None`` when it
    would not: the files resuming reads are there and every file matches ``checksums.sha256``. A
    folder without one was not written whole (or by a version before checksums: run
    ``sha256sum * > checksums.sha256`` in it to vouch for its files)."""
    for name in ("model.safetensors", "optimizer.pt", "scheduler.pt"):
        if not (path / name).is_file():
            return f"it has no {name} (an incomplete checkpoint)"
    if not any(path.glob("rng_state*.pth")):
        return "it has no rng_state.pth (an incomplete checkpoint)"
    if not (path / CHECKSUMS).is_file():
        return (
            f"it has no {CHECKSUMS}: not written whole, or by a version before checkpoints carried "
            f"checksums (to vouch for its files: cd {path} && sha256sum * > {CHECKSUMS})"
        )
    return checksum_mismatch(path)


def main_says(args: TrainingArguments) -> Callable[[str], None] | None:
    """Print to stderr, on the first process only (every process resolves the same checkpoint)."""
    return functools.partial(print, file=sys.stderr) if args.process_index == 0 else None


def prepare_output_dir(args: TrainingArguments) -> Path | None:
    """The checkpoint to resume from (``--resume_from_checkpoint``), if any, said on stderr; a new run
    is refused an ``--output_dir`` holding another run's checkpoints unless told to delete them."""
    output_dir, spec, say = Path(args.output_dir), args.resume_from_checkpoint, main_says(args)
    checkpoint = resolve_checkpoint(spec, output_dir, say) if spec else None
    if checkpoint is not None and say is not None:
        say(f"Resuming from {checkpoint} (step {checkpoint.name.split('-')[-1]})")
    stale = [] if checkpoint is not None or spec == "auto" else list_checkpoints(output_dir)
    if stale and not getattr(args, "overwrite_output_dir", False):
        raise UserError(
            f"{output_dir} already holds {stale[-1].name}: continue it with --resume_from_checkpoint latest, "
            "or start afresh with --overwrite_output_dir"
        )
    if args.process_index == 0:
        for path in stale:
            shutil.rmtree(path)
        output_dir.mkdir(parents=True, exist_ok=True)
    return checkpoint
