"""A ``Trainer`` whose checkpoints are whole or absent and whose run stops on a non-finite loss: the
base of :class:`~student_trainer.train.trainer.DynamicKDTrainer` and of ``finetune``'s trainer.

A checkpoint is written into ``.tmp-checkpoint-<step>/``, its ``checksums.sha256`` last
(:mod:`~student_trainer.train.checksums`), then renamed ``checkpoint-<step>/``; only then are older
checkpoints rotated out (``save_total_limit``). A file-system error while writing it (a full disk) on
any process removes the partial folder and stops every process with :class:`CheckpointWriteError`;
what a killed run left is removed when the next one starts. A NaN or infinite loss stops the run with
:class:`NonFiniteLoss` before the optimizer step, so that the newest checkpoint stays the last good one.
A resume from a checkpoint of the run's last step trains no step more.
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
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput, rotate_checkpoints

from student_trainer.train.checkpoint import (
    STAGING,
    list_checkpoints,
    main_says,
    remove_stale_writes,
    resolve_checkpoint,
)
from student_trainer.train.checksums import write_checksums
from student_trainer.train.distributed import Processes, any_rank
from student_trainer.train.errors import CheckpointWriteError, NonFiniteLoss

RESUME_HINT = "continue with --resume_from_checkpoint latest, or train(resume_from_checkpoint=True)"
FULL_BELOW = 2**20  # bytes free under which a write failure without its errno reads as a full disk


class GuardedTrainer(Trainer):
    """``Trainer`` with whole checkpoints (checksums written last) and a stop on a non-finite loss."""

    resume_hint = RESUME_HINT  # what a stopped run's message says to do next
    train_runtime_s = 0.0  # seconds in Trainer.train, summed over this object's calls

    def processes(self) -> Processes:
        return Processes(self.args.process_index, self.args.world_size, self.args.device)

    def train(
        self,
        resume_from_checkpoint: str | bool | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
    ) -> TrainOutput:
        """``Trainer.train``. ``resume_from_checkpoint``: a ``checkpoint-N`` folder, whose files must
        match their checksums; ``True`` or ``"latest"`` for the newest in ``output_dir`` whose files do
        (each newer one skipped is said on stderr); ``"auto"`` the same, or a fresh start when there is
        no checkpoint. A checkpoint of the run's last step (a job restarted after it ended) gives its
        weights and state, no step more: the ``Trainer`` would train one more batch."""
        if self.args.should_save:  # no process of this run writes a checkpoint before its first step
            for name in remove_stale_writes(self.args.output_dir):
                print(
                    f"removed {name}: a checkpoint that a stopped run did not finish writing", file=sys.stderr
                )
        spec = "latest" if resume_from_checkpoint is True else resume_from_checkpoint
        checkpoint = resolve_checkpoint(spec, self.args.output_dir, main_says(self.args)) if spec else None
        if checkpoint is not None:
            self._load_resume_state(checkpoint)
            finished = self._finished_run(checkpoint)
            if finished is not None:
                return finished
        output = super().train(str(checkpoint) if checkpoint else None, trial, ignore_keys_for_eval)
        self.train_runtime_s += output.metrics["train_runtime"]
        return output

    def _load_resume_state(self, checkpoint: Path) -> None:
        """What a subclass keeps in a checkpoint besides the ``Trainer``'s state (nothing here)."""

    def _finished_run(self, checkpoint: Path) -> TrainOutput | None:
        saved = TrainerState.load_from_json(str(checkpoint / TRAINER_STATE_NAME))
        wanted = self.args.max_steps if self.args.max_steps > 0 else saved.max_steps  # epochs: as it was
        if saved.global_step < wanted:
            return None
        self.state = saved
        self._load_from_checkpoint(str(checkpoint), self.model)
        return TrainOutput(saved.global_step, 0.0, {"train_runtime": 0.0})  # no step trained: no loss, rate

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


def train_results(trainer: GuardedTrainer, output: TrainOutput) -> dict[str, Any]:
    """The training fields that ``distill``'s ``results.json`` and ``finetune``'s ``eval_results.json``
    both hold (loss and rate of this call; ``None`` when it resumed a finished run)."""
    return {
        "global_step": trainer.state.global_step,
        "epoch": trainer.state.epoch,
        "train_loss": output.metrics.get("train_loss"),
        "train_runtime_s": trainer.train_runtime_s,
        "train_samples_per_second": output.metrics.get("train_samples_per_second"),
    }


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
