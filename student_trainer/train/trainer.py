"""Dynamic KD as a Hugging Face ``Trainer``: :meth:`DynamicKDTrainer.compute_loss` is one step of it.

The ``Trainer`` owns the loop, optimizer and schedule, gradient accumulation, mixed precision,
checkpoints, resume, logging (every ``report_to`` integration) and evaluation. This subclass adds
what dynamic KD needs and nothing else: the teachers (started once, asked on one asyncio event
loop of its own), the student's projections to the teachers' widths, and per batch the student's
forward, the rows and teachers its uncertainty picks, the teachers' answers, the objective
(:mod:`student_trainer.kd.objective`) and the FLOPs ledger (:mod:`student_trainer.kd.ledger`).

State that a resume needs besides the ``Trainer``'s own is written into every ``checkpoint-N/``
as ``kd_state.pt`` (``kd_state_<rank>.pt`` per process under ``torchrun``) beside the ``Trainer``'s
RNG state: the FLOPs ledger (summed over the processes, the same
on each), and the row selector's RNG, exact-budget carry and teacher-budget counters. The
:class:`KDState` callback keeps it in step with the loop (budget restarts at an epoch, the state
before each step, so that a teacher that stays down leaves a checkpoint of the last whole step).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput

from shared.errors import UserError
from student_trainer.data.tokenized import collate_batch
from student_trainer.kd import ledger as flops
from student_trainer.kd.alignment import LayerAlignment
from student_trainer.kd.budget import budget_counts
from student_trainer.kd.config import LADDER_METHODS, TEACHER_ROLES, KDConfig
from student_trainer.kd.ledger import FlopsLedger
from student_trainer.kd.objective import distillation_loss
from student_trainer.teachers.client import TeacherCallError, TeacherClient, make_teacher_client
from student_trainer.train.checkpoint import (
    capture_rng_state,
    checkpoint_problem,
    list_checkpoints,
    restore_rng_state,
)
from student_trainer.train.distributed import any_rank
from student_trainer.train.errors import Interrupted, TeacherUnavailable
from student_trainer.train.guarded import GuardedTrainer, first_line
from student_trainer.train.setup import (
    RowSelector,
    Teachers,
    check_budget_vocabulary,
    close_teachers,
    ladder_order,
    start_teachers,
)
from student_trainer.train.signals import StopOnSignal
from student_trainer.train.step import ask_teachers_after, step_counts
from student_trainer.train.student import (
    DistillStudent,
    check_label_counts,
    teacher_label_order,
    teacher_projections,
    text_teachers,
)

PROJECTIONS_FILE = "projections.safetensors"
BATCH_COLUMNS = ["input_ids", "attention_mask", "token_type_ids", "labels", "label", "label_ids", "index"]


class DynamicKDTrainer(GuardedTrainer):
    """A ``Trainer`` whose loss is dynamic KD from teachers behind a service (or loaded in-process).

    ``teachers`` maps a name to a spec (``local:PATH``, ``URL[,URL...][#MODEL]``) or to a
    :class:`~student_trainer.teachers.client.TeacherClient`; ``kd`` says which of them supervise
    which rows and how (its ``ladder`` is replaced by the teachers given, smallest first). The
    student is a sequence classifier; ``processing_class`` its tokenizer (which decides whether a
    teacher is sent token ids or text). Every other argument is the ``Trainer``'s.
    """

    loss_is_scaled_for_ga = False  # the objective is a batch mean: the Trainer divides it by accumulation

    def __init__(
        self,
        model: PreTrainedModel,
        args: TrainingArguments,
        *,
        kd: KDConfig,
        teachers: Mapping[str, str | TeacherClient],
        processing_class: Any = None,
        data_collator: Any = None,
        callbacks: list[TrainerCallback] | None = None,
        teacher_timeout: float = 60.0,
        teacher_ready_timeout: float = 120.0,
        api_key: str | None = None,
        api_key_env: str | None = None,
        teacher_specs: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        check_teacher_selection(kd.teacher_selection, tuple(teachers))
        kd = replace(kd, ladder=tuple(teachers)) if teachers else kd
        if kd.teacher_roles and processing_class is None:
            raise UserError("dynamic KD needs the student's tokenizer (processing_class)")
        device = "cpu" if args.device.type == "cpu" else str(args.device)  # torchrun on CPU says cpu:0
        options = {"timeout_s": teacher_timeout, "api_key": api_key, "device": device}
        clients = {
            role: make_teacher_client(spec, name=role, **options) if isinstance(spec, str) else spec
            for role, spec in teachers.items()
            if role in kd.teacher_roles
        }
        self.teachers = Teachers(clients, asyncio.new_event_loop(), teacher_ready_timeout)
        specs = {role: str(spec) for role, spec in teachers.items()} | dict(teacher_specs or {})
        start_teachers(self.teachers, specs, api_key_env)  # api_key_env: named when a key is refused
        try:  # a teacher refused here leaves no open connection behind
            infos = self.teachers.infos
            label_names = [str(model.config.id2label[i]) for i in range(model.config.num_labels)]
            check_label_counts(infos, len(label_names))
            self.teachers.label_orders = {
                role: teacher_label_order(role, info, label_names) for role, info in infos.items()
            }
            self.text_roles = (
                text_teachers(
                    infos,
                    processing_class,
                    int(model.config.vocab_size),
                    all_token_features=kd.uses_hidden_states and kd.pt_features == "all-tokens",
                )
                if infos
                else frozenset()
            )
            self.kd = replace(kd, ladder=ladder_order(infos)) if infos else kd
            check_budget_vocabulary(self.kd, self.text_roles, infos)
        except BaseException:
            close_teachers(self.teachers)
            self.teachers.loop.close()
            raise
        num_layers = int(model.config.num_hidden_layers)
        self.alignments = {r: LayerAlignment.between(num_layers, i.num_layers) for r, i in infos.items()}
        self.ledger = FlopsLedger(roles=tuple(dict.fromkeys((*TEACHER_ROLES, *infos))))
        self.selector = RowSelector.build(self.kd, args.seed, world_size=args.world_size)
        self.kd_state = KDState(self)
        self.stop = StopOnSignal()
        self._window: list[dict[str, float]] = []  # what each batch since the last log said
        self.teacher_time_s = 0.0  # waiting for the teachers, over resumed runs too (in kd_state)
        set_seed(args.seed)  # the projections are drawn the same whatever ran before
        projections = teacher_projections(model, infos) if self.kd.uses_hidden_states else {}
        if data_collator is None and processing_class is not None:
            data_collator = functools.partial(collate_batch, pad_token_id=processing_class.pad_token_id or 0)
        super().__init__(
            model=DistillStudent(model, projections),
            args=args,
            data_collator=data_collator,
            processing_class=processing_class,
            callbacks=[*(callbacks or []), self.kd_state, self.stop],
            **kwargs,
        )
        self.label_names = ["labels"]
        train_dataset = kwargs.get("train_dataset")
        if self.text_roles and not hasattr(train_dataset, "texts"):
            raise UserError(
                f"teacher {sorted(self.text_roles)[0]} has its own vocabulary and reads the rows' text: the "
                "train_dataset must be a student_trainer TokenizedDataset (items with their `index`)"
            )

    def running_s(self) -> float:
        """Seconds since this ``train()`` began (0 outside it)."""
        return time.perf_counter() - self.kd_state.started if self.kd_state.started else 0.0

    @property
    def student(self) -> PreTrainedModel:
        """The sequence classifier being trained (without the projections)."""
        return self.model.model

    def row_texts(self, rows: list[int]) -> tuple[list[str], list[str] | None]:
        return self.train_dataset.texts(rows)

    # -- the loss --------------------------------------------------------------------------------

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training: one batch of dynamic KD. Evaluation: the student's cross-entropy (no teacher)."""
        if not model.training:
            logits, _ = model(inputs)
            loss = F.cross_entropy(logits.float(), inputs["labels"])
            return (loss, {"logits": logits}) if return_outputs else loss
        if "token_type_ids" not in inputs:
            inputs = {**inputs, "token_type_ids": torch.zeros_like(inputs["input_ids"])}
        hidden = self.kd.uses_hidden_states
        loss, asked, parts = model(inputs, output_hidden_states=hidden, then=self._kd_loss(inputs))
        counts = step_counts(self, self.student.config, self.teachers, inputs, asked)
        self.ledger.add(counts)
        self.teacher_time_s += asked.seconds
        self._window.append({**parts, "teacher_seconds": asked.seconds, **counts})
        return (loss, {"logits": asked.logits}) if return_outputs else loss

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """The student's forward and backward on this padded batch, as the FLOPs ledger counts them
        (the ``Trainer``'s ``total_flos``; the teachers' FLOPs are the ledger's)."""
        counts = flops.student_counts(self.student.config, *inputs["input_ids"].shape)
        return counts["student_forward_flops"] + counts["student_backward_flops"]

    def _kd_loss(self, inputs: dict[str, torch.Tensor]) -> Any:
        """What the student's ``forward`` ends with: choose rows and teachers, ask them, the objective."""

        def then(student: DistillStudent, logits: torch.Tensor, hidden_states: Any) -> tuple:
            asked = ask_teachers_after(self, self.teachers, inputs, logits, hidden_states)
            if any_rank(asked.failure is not None, self.processes()):
                raise asked.failure or TeacherCallError("a teacher", RuntimeError("down on another process"))
            loss, parts = distillation_loss(
                self.kd, student, logits, hidden_states, inputs, asked.plan, asked.answers, self.alignments
            )
            return loss, asked, parts

        return then

    # -- logs: the KD metrics beside the loss, for every report_to --------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._window:  # a training log
            logs = {**logs, **self.kd_metrics()}
        super().log(logs, start_time)

    def kd_metrics(self) -> dict[str, float]:
        """The loss parts and teacher wait (means since the last log, over the processes), the share
        of rows the teachers saw, this window's ledger entries (summed: rows selected, sent, FLOPs) and
        the ledger's running totals."""
        window, self._window = self._window, []
        names = ("ce", "kd", "pt", "w_kl", "teacher_seconds")
        sums = torch.tensor([sum(w[k] for w in window) for k in names], device=self.args.device)
        means = self.accelerator.reduce(sums / len(window), reduction="mean")
        metrics: dict[str, float] = dict(zip(names, means.tolist(), strict=True))
        counts = {k: sum(int(w[k]) for w in window) for k in self.ledger.keys}
        metrics.update(counts)
        metrics["selection_share"] = counts["selected_instances"] / max(1, counts["instances"])
        ledger = self.ledger
        metrics.update(
            teacher_flops_spent=ledger.teacher_flops,
            teacher_flops_requested=ledger.requested_flops,
            teacher_flops_vanilla=ledger.vanilla_flops,
        )
        metrics.update({key: value for key, value in self.budget_so_far().items() if value is not None})
        return metrics

    def budget_so_far(self) -> dict[str, Any]:
        """The teacher budget's bound at this step beside its spend (nothing without a budget)."""
        if self.kd.budget is None:
            return {}
        spent, vanilla = self.ledger.budget_spend(self.kd.budget.unit)
        state = self.state
        return budget_counts(self.kd.budget, state.global_step, state.max_steps, vanilla=vanilla, spent=spent)

    # -- training, checkpoints and resume ---------------------------------------------------------

    def train(
        self,
        resume_from_checkpoint: str | bool | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
    ) -> TrainOutput:
        """:meth:`GuardedTrainer.train`; a teacher that stays down stops it with
        :class:`TeacherUnavailable` after a checkpoint of the last whole step; SIGINT/SIGTERM with
        :class:`Interrupted` after a checkpoint of the step in progress (a second signal at once)."""
        try:
            output = super().train(resume_from_checkpoint, trial, ignore_keys_for_eval)
            self.kd_state.started = None
        except TeacherCallError as failure:
            path = self.kd_state.checkpoint_last_step()
            raise TeacherUnavailable(
                f"{failure}; stopped at step {self.state.global_step} with a resumable checkpoint at {path} "
                f"({self.resume_hint})"
            ) from failure
        finally:
            self.stop.signals.uninstall()
        if self.stop.signals.received is not None:
            raise Interrupted(
                f"interrupted at step {self.state.global_step}, after a checkpoint in {self.args.output_dir} "
                f"({self.resume_hint})"
            )
        return output

    def _load_resume_state(self, checkpoint: Path) -> None:
        self.kd_state.load(checkpoint)

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        self.kd_state.save(Path(output_dir))  # every process's, as the RNG's

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The student as ``save_pretrained`` writes it (a model ``teacher-server`` or ``from_pretrained``
        loads), its projections beside it, the tokenizer and the arguments."""
        folder = Path(output_dir or self.args.output_dir)
        if not self.args.should_save:
            return
        student = self.accelerator.unwrap_model(self.model)
        folder.mkdir(parents=True, exist_ok=True)
        student.model.save_pretrained(folder)
        projections = {k: v.detach().cpu().contiguous() for k, v in student.projections.state_dict().items()}
        if projections:
            save_file(projections, str(folder / PROJECTIONS_FILE))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(folder)
        torch.save(self.args, folder / "training_args.bin")

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        load_student_weights(model or self.model, Path(resume_from_checkpoint))

    def _load_best_model(self) -> None:
        load_student_weights(self.model, Path(self.state.best_model_checkpoint))

    def _set_signature_columns_if_needed(self) -> None:
        self._signature_columns = self._signature_columns or BATCH_COLUMNS  # the student reads a batch dict

    def end(self) -> None:
        """Close the teachers' connections, then the ``Trainer``'s trackers and process group, once
        every rank is here: a rank that tore the group down while rank 0 still saved the model was
        seen to abort at exit under torchrun."""
        close_teachers(self.teachers)
        self.teachers.loop.close()
        self.accelerator.wait_for_everyone()
        super().end()


def check_teacher_selection(selection: str | None, names: tuple[str, ...]) -> None:
    if selection in LADDER_METHODS and len(names) < 2:
        raise UserError(f"teacher_selection {selection!r} needs two or more teachers, got {list(names)}")
    if selection not in (None, *LADDER_METHODS, *names):
        raise UserError(f"teacher_selection {selection!r} is none of the teachers given {list(names)}")


def load_student_weights(student: DistillStudent, folder: Path) -> None:
    """A checkpoint's student weights and projections, strictly: another model's do not fit."""
    try:
        student.model.load_state_dict(load_file(str(folder / "model.safetensors")))
        if (folder / PROJECTIONS_FILE).exists() or len(student.projections.state_dict()):
            student.projections.load_state_dict(load_file(str(folder / PROJECTIONS_FILE)))
    except (OSError, RuntimeError) as err:  # missing file, shape or key mismatch
        reason = first_line(err)
        raise UserError(f"{folder} does not fit this student (other model or KD options?): {reason}") from err


class KDState(TrainerCallback):
    """Dynamic KD's state through the ``Trainer``'s loop: saved with each checkpoint, restored on
    resume (see the module docstring)."""

    def __init__(self, trainer: DynamicKDTrainer) -> None:
        self.trainer = trainer
        self.before_step: dict[str, Any] | None = None
        self.started: float | None = None  # perf_counter at train begin

    def state_dict(self) -> dict[str, Any]:
        trainer = self.trainer
        return {
            "ledger": trainer.ledger.state_dict(),
            "selector": trainer.selector.state_dict(),
            "seconds": torch.tensor([trainer.teacher_time_s, trainer.train_runtime_s + trainer.running_s()]),
        }

    def file(self, folder: Path) -> Path:
        args = self.trainer.args
        return folder / ("kd_state.pt" if args.world_size <= 1 else f"kd_state_{args.process_index}.pt")

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(self.state_dict(), self.file(folder))

    def load(self, folder: Path) -> None:
        file = self.file(folder)
        if not file.is_file():
            raise UserError(f"{folder} has no {file.name}: not a dynamic KD checkpoint, or an incomplete one")
        state = torch.load(file, map_location="cpu", weights_only=True)
        self.trainer.ledger.load_state_dict(state["ledger"])
        self.trainer.selector.load_state_dict(state["selector"])
        self.trainer.teacher_time_s, self.trainer.train_runtime_s = state["seconds"].tolist()

    def on_train_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        self.started = time.perf_counter()
        pacer = self.trainer.selector.pacer
        if pacer is not None:  # the budget is paced over every batch the run will see
            pacer.total_steps = state.max_steps * args.gradient_accumulation_steps

    def on_epoch_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        budget = self.trainer.selector.budget
        if budget is not None and float(state.epoch or 0).is_integer():  # not a resumed epoch's middle
            budget.reset()

    def on_step_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        self.before_step = {"rng": capture_rng_state(), **self.state_dict()}

    def checkpoint_last_step(self) -> Path:
        """Put back the state before the step that failed and checkpoint it (every process together);
        a whole checkpoint of that step (saved or resumed from just before) is kept, not rewritten."""
        trainer = self.trainer
        path = Path(trainer.args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}"
        if path in list_checkpoints(path.parent) and checkpoint_problem(path) is None:
            return path
        if self.before_step is not None:
            restore_rng_state(self.before_step["rng"])
            trainer.ledger.load_state_dict(self.before_step["ledger"])
            trainer.selector.load_state_dict(self.before_step["selector"])
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer._save_checkpoint(trainer.model_wrapped, trial=None)
        return path
