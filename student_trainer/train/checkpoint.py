"""Checkpoints are ``checkpoint-<step>/`` folders as the Hugging Face ``Trainer`` writes them (model,
optimizer, scheduler, RNG, ``trainer_state.json`` written last) plus dynamic KD's ``kd_state.pt``
(:class:`~student_trainer.train.trainer.KDState`). This module finds them (``latest``, ``auto``),
refuses to mix a new run with another run's, and captures the RNG state that a step which could not
finish is rolled back to.
"""

from __future__ import annotations

import random
import re
import shutil
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from transformers import TrainingArguments

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
        if found:
            check_files(found[-1])
        return found[-1] if found else None
    path = Path(spec)
    if not (path / TRAINER_STATE).is_file():
        raise UserError(f"--resume_from_checkpoint {spec}: not a checkpoint folder (no {TRAINER_STATE})")
    check_files(path)
    return path


def check_files(path: Path) -> None:
    """Refuse, in one line naming the file, a checkpoint missing what resuming reads or holding a file
    cut short (a full disk): the ``Trainer`` would fail deep inside torch."""
    wanted = ["model.safetensors", "optimizer.pt", "scheduler.pt"]
    for name in wanted:
        if not (path / name).is_file():
            raise UserError(f"{path} has no {name}: an incomplete checkpoint; resume from another one")
    rng_files = sorted(path.glob("rng_state*.pth"))
    if not rng_files:
        raise UserError(f"{path} has no rng_state.pth: an incomplete checkpoint; resume from another one")
    for file in [path / "model.safetensors", *(path / n for n in wanted[1:]), *rng_files]:
        try:
            if file.suffix == ".safetensors":
                with safe_open(str(file), framework="pt") as tensors:
                    for key in tensors.keys():  # noqa: SIM118 (safe_open has no __iter__)
                        tensors.get_slice(key)
            else:  # torch.save's zip archive: every member's CRC, without unpickling anything
                with zipfile.ZipFile(file) as archive:
                    bad = archive.testzip()
                if bad is not None:
                    raise ValueError(f"bad CRC in {bad}")
        except (OSError, RuntimeError, EOFError, ValueError, SafetensorError, zipfile.BadZipFile) as err:
            raise UserError(
                f"{file} is damaged ({type(err).__name__}): resume from another checkpoint"
            ) from err


def prepare_output_dir(args: TrainingArguments) -> Path | None:
    """The checkpoint to resume from (``--resume_from_checkpoint``), if any; a new run is refused an
    ``--output_dir`` holding another run's checkpoints unless told to delete them."""
    output_dir, spec = Path(args.output_dir), args.resume_from_checkpoint
    checkpoint = resolve_checkpoint(spec, output_dir) if spec else None
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
