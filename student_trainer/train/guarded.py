"""A ``Trainer`` whose checkpoints are whole or absent and whose run stops on a non-finite loss: the
base of :class:`~student_trainer.train.trainer.DynamicKDTrainer` and of ``finetune``'s trainer.

A checkpoint is written into ``.tmp-checkpoint-<step>/``, its ``checksums.sha256`` last
(:mod:`~student_trainer.train.checksums`), then renamed ``checkpoint-<step>/``; only then are older
checkpoints rotated out (``save_total_limit``). A file-system error while writing it (a full disk) on
any process removes the partial folder and stops every process with :class:`CheckpointWriteError`;
what a killed run left is removed when the next one starts. A NaN or infinite loss stops the run with
:class:`NonFiniteLoss` before the optimizer step, so that the newest checkpoint stays the last good one.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from student_trainer.train.checkpoint import STAGING, list_checkpoints, remove_stale_writes
from student_trainer.train.checksums import write_checksums
from student_trainer.train.distributed import Processes, any_rank
from student_trainer.train.errors import CheckpointWriteError, NonFiniteLoss

RESUME_HINT = "continue with --resume_from_checkpoint latest, or train(resume_from_checkpoint=True)"
FULL_BELOW = 2**20  # bytes free under which a write failure without its errno reads as a full disk


class GuardedTrainer(Trainer):
    """``Trainer`` with whole checkpoints (checksums written last) and a stop on a non-finite loss."""

    resume_hint = RESUME_HINT  # what a stopped run's message says to do next

    def processes(self) -> Processes:
        return Processes(self.args.process_index, self.args.world_size, self.args.device)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        if self.args.should_save:  # no process of this run writes a checkpoint before its first step
            for name in remove_stale_writes(self.args.output_dir):
                print(
                    f"removed {name}: a checkpoint that a stopped run did not finish writing", file=sys.stderr
                )
        return super().train(*args, **kwargs)

    def training_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> Any:
        loss = super().training_step(model, inputs, num_items_in_batch)
        finite = bool(torch.isfinite(loss))  # the Trainer reads this value on the host next anyway
        if any_rank(not finite, self.processes()):  # every process stops at the same step
            value = "finite here but not on another process" if finite else str(loss.item())
            raise NonFiniteLoss(
                f"the training loss is {value} at step {self.state.global_step + 1}: stopped before the "
                f"optimizer step, {last_checkpoint(Path(self.args.output_dir))} (lower the learning rate, "
                "or check the data)"
            )
        return loss

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        staged = StagedCheckpoint(
            Path(self._get_output_dir(trial)), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        )
        writes = self.args.should_save
        limit, self.args.save_total_limit = self.args.save_total_limit, None  # rotated once this one is whole
        try:
            self._write_part(staged, staged.open if writes else None)
            self._write_part(staged, lambda: super(GuardedTrainer, self)._save_checkpoint(model, trial))
            self._write_part(staged, staged.publish if writes else None)
        except BaseException:
            if writes:
                staged.discard()
            raise
        finally:
            self.args.save_total_limit = limit
        if writes:
            rotate_checkpoints(str(staged.run_dir), limit, self.state.best_model_checkpoint, use_mtime=True)

    def _write_part(self, staged: StagedCheckpoint, part: Callable[[], None] | None) -> None:
        """This process's part of writing a checkpoint; an error on any process stops all (each hears of
        it before raising: one that raised alone would leave the others waiting in the next collective)."""
        failure: str | None = None
        error: Exception | None = None  # not the file system's: raised as it is once every process knows
        try:
            if part is not None:
                part()
        except (OSError, RuntimeError, SafetensorError) as err:
            existing = next(p for p in (staged.run_dir, *staged.run_dir.parents) if p.exists())
            reason = write_failure(err, shutil.disk_usage(existing).free)
            if reason is None:
                error = err
            else:
                failure = f"{reason} while writing {staged.name}: {first_line(err)}"
        except Exception as err:
            error = err
        if any_rank(failure is not None or error is not None, self.processes()):
            if error is not None:
                raise error
            failure = failure or f"writing {staged.name} failed on another process"
            left = last_checkpoint(staged.run_dir)
            raise CheckpointWriteError(f"{failure}; {staged.name} was removed, {left} ({self.resume_hint})")


@dataclass(frozen=True)
class StagedCheckpoint:
    """``checkpoint-<step>`` written as ``.tmp-checkpoint-<step>/`` and renamed once whole. Meanwhile
    ``checkpoint-<step>`` is a link to it, so that the ``Trainer``, which knows nothing of staging,
    writes, records its best checkpoint and pushes to the Hub under the final name."""

    run_dir: Path
    name: str

    @property
    def final(self) -> Path:
        return self.run_dir / self.name

    @property
    def staging(self) -> Path:
        return self.run_dir / f"{STAGING}{self.name}"

    def open(self) -> None:
        """A folder of the same step (a run resumed from an earlier one reached it again) is replaced."""
        self.discard()
        if self.final.exists():
            shutil.rmtree(self.final)
        self.staging.mkdir(parents=True)
        self.final.symlink_to(self.staging.name, target_is_directory=True)

    def publish(self) -> None:
        write_checksums(self.staging)
        self.final.unlink()
        self.staging.rename(self.final)

    def discard(self) -> None:
        if self.final.is_symlink():
            self.final.unlink()
        shutil.rmtree(self.staging, ignore_errors=True)


def write_failure(err: BaseException, free_bytes: int) -> str | None:
    """What the file system said when a checkpoint could not be written ("no space left on device"),
    or ``None`` for an error that is not the file system's. ``torch.save`` drops the errno ("unexpected
    pos"): with under 1 MiB free that is a full disk."""
    if isinstance(err, OSError) and err.errno:
        return os.strerror(err.errno).lower()
    code = re.search(r"os error (\d+)", str(err))  # safetensors: "I/O error: ... (os error 28)"
    if code:
        return os.strerror(int(code.group(1))).lower()
    if isinstance(err, RuntimeError) and "inline_container" in str(err):
        return os.strerror(errno.ENOSPC).lower() if free_bytes < FULL_BELOW else "a write failed"
    return None


def last_checkpoint(run_dir: Path) -> str:
    """Where a stopped run left its newest whole checkpoint, in words."""
    found = list_checkpoints(run_dir)
    return f"{found[-1]} is the last good checkpoint" if found else "no checkpoint was written before it"


def first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
