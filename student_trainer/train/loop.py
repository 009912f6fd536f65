"""`student-trainer distill`: the training loop of dynamic knowledge distillation.

Read :func:`train` top to bottom: set up (processes, teachers, data, student, optimizer,
resume — :mod:`student_trainer.train.setup`), then :func:`run_loop`, one loop over batches whose
body is a short series of phases (:mod:`student_trainer.train.step`): student forward and the
teachers' answers, loss and update, FLOPs ledger and logs, evaluation and checkpoint when due;
then the final evaluation, ``results.json`` and a summary.

Teachers are asked on one asyncio event loop owned by the trainer, both teachers' requests
in flight at once. A teacher that stays down (its client gave up retrying) stops the run
with a one-line error, after a checkpoint of the last completed step: nothing is lost, and
``--resume_from_checkpoint latest`` continues exactly where it stopped. SIGINT (Ctrl-C) or
SIGTERM likewise: the current step finishes, a checkpoint is written, the run stops
(:class:`Interrupted`); a second signal stops at once.

Data parallel under ``torchrun``: every rank trains on its :class:`DistributedSampler` shard
and asks its own teachers; gradients are averaged with one all-reduce after backward (see
:mod:`student_trainer.train.distributed`). FLOPs ledgers are summed across ranks; only rank 0
writes logs and checkpoints.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch.distributed as dist
from transformers.utils import logging as hf_logging

from shared.provenance import made_with
from student_trainer.args.distill import DistillArguments
from student_trainer.kd.budget import budget_counts
from student_trainer.teachers.client import TeacherCallError
from student_trainer.train.distributed import any_rank, barrier, init_processes, mean_over_ranks
from student_trainer.train.errors import Interrupted, TeacherUnavailable
from student_trainer.train.evaluate import evaluate, majority_baseline
from student_trainer.train.logs import MetricsLog, Reporter, summary_paragraph
from student_trainer.train.metrics import BASELINE_MARGIN, above_majority_baseline
from student_trainer.train.setup import (
    DistillRun,
    Teachers,
    build_run,
    close_teachers,
    make_clients,
    prepare_output_dir,
    rank_state,
    resume,
    start_teachers,
    write_checkpoint,
)
from student_trainer.train.signals import StopSignals
from student_trainer.train.step import ask_teachers_about, load_batch, step_counts, update


def train(args: DistillArguments) -> dict[str, Any]:
    """Run a whole distillation; returns what ``results.json`` holds."""
    hf_logging.disable_progress_bar()
    procs = init_processes(args.device)
    teachers = Teachers({}, asyncio.new_event_loop(), args.teacher_ready_timeout)
    stop = StopSignals()
    stop.install()
    try:
        output_dir = prepare_output_dir(args, procs)
        teachers.clients = make_clients(args, procs.device)
        start_teachers(teachers, args.teachers, args.api_key_env)
        run = build_run(args, procs, output_dir, teachers)
        resume(run)
        return run_loop(run, teachers, stop)
    finally:
        stop.uninstall()
        close_teachers(teachers)
        teachers.loop.close()
        if procs.world_size > 1:
            dist.destroy_process_group()


@dataclass
class Milestones:
    """The last evaluation and checkpoint: each runs at most once per step."""

    eval_step: int = -1
    save_step: int = -1
    last_eval: dict[str, float] = field(default_factory=dict)


def due(strategy: str, every: int | None, step: int, *, epoch_end: bool) -> bool:
    """Whether an eval/save ``strategy`` ("no", "steps", "epoch") asks for one now."""
    if epoch_end:
        return strategy == "epoch"
    return strategy == "steps" and every is not None and step % every == 0


def run_loop(run: DistillRun, teachers: Teachers, stop: StopSignals | None = None) -> dict[str, Any]:
    """The training loop (see the module docstring); returns the results."""
    args, state = run.args, run.state
    marks = Milestones()
    reporter = Reporter(
        MetricsLog(run.output_dir, run.resume_step, enabled=run.procs.is_main),
        run.total_steps,
        state.global_step,
        args.logging_steps,
        disable=args.disable_tqdm or not run.procs.is_main,
    )
    started = time.perf_counter() - state.train_runtime_s
    run.student.train()
    while state.global_step < run.total_steps:
        order = epoch_batches(run)
        for batch_index in range(state.batch_in_epoch, len(order)):
            if state.global_step >= run.total_steps:
                break
            before_step = rank_state(run)  # what a checkpoint holds if this step cannot finish
            batch = load_batch(run, order[batch_index])

            # student forward; its own uncertainty picks rows and teachers; ask them
            asked = ask_teachers_about(run, run.student, teachers, batch)
            if any_rank(asked.failure is not None, run.procs):
                stop_for_failed_teacher(run, before_step, asked.failure)

            # loss, backward, step
            losses = update(run, batch, asked)
            state.global_step += 1
            state.batch_in_epoch = batch_index + 1

            # FLOPs ledger (summed over ranks) and logs
            counts = step_counts(run, run.student.model.config, teachers, batch, asked)
            run.ledger.add(counts)
            parts = mean_over_ranks({**losses, "teacher_seconds": asked.seconds}, run.procs)
            state.teacher_time_s += parts["teacher_seconds"]
            state.train_runtime_s = time.perf_counter() - started
            record = train_record(run, state.epoch + state.batch_in_epoch / len(order), parts, counts)
            reporter.train_step(record, parts, run.scheduler.get_last_lr()[0], run.ledger)

            # evaluation and checkpoint, when due
            if due(args.eval_strategy, args.eval_steps, state.global_step, epoch_end=False):
                evaluate_once(run, marks, reporter)
            if due(args.save_strategy, args.save_steps, state.global_step, epoch_end=False):
                save_once(run, marks)

            # SIGINT/SIGTERM: checkpoint this completed step and stop
            if any_rank(stop is not None and stop.received is not None, run.procs):
                stop_for_signal(run, marks)
        else:  # the epoch ran to its end
            state.epoch += 1
            state.batch_in_epoch = 0
            if due(args.eval_strategy, args.eval_steps, state.global_step, epoch_end=True):
                evaluate_once(run, marks, reporter)
            if due(args.save_strategy, args.save_steps, state.global_step, epoch_end=True):
                save_once(run, marks)
    reporter.progress.close()
    return finish(run, teachers, marks, reporter)


def epoch_batches(run: DistillRun) -> list[list[int]]:
    """This rank's batches of the current epoch, in order; the exact budget restarts with an epoch."""
    run.sampler.set_epoch(run.state.epoch)
    indices, size = list(run.sampler), run.args.per_device_train_batch_size
    if run.state.batch_in_epoch == 0 and run.selector.budget:
        run.selector.budget.reset()
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def stop_for_failed_teacher(
    run: DistillRun, before_step: dict[str, Any], failure: TeacherCallError | None
) -> None:
    """Checkpoint the last completed step on every rank, then stop with a one-line error."""
    path = write_checkpoint(run, before_step)
    reason = failure or "a teacher failed on another rank"
    raise TeacherUnavailable(
        f"{reason}; stopped at step {run.state.global_step} with a resumable checkpoint"
        f"{f' at {path}' if path else ''} (continue with --resume_from_checkpoint latest)"
    )


def stop_for_signal(run: DistillRun, marks: Milestones) -> None:
    """Checkpoint the step just completed (unless already saved), then stop with :class:`Interrupted`."""
    save_once(run, marks)
    raise Interrupted(
        f"interrupted at step {run.state.global_step}, after a checkpoint in {run.output_dir} "
        "(continue with --resume_from_checkpoint latest)"
    )


def train_record(run: DistillRun, epoch: float, parts: dict[str, float], counts: dict[str, int]) -> dict:
    """One ``metrics.jsonl`` line of a training step."""
    return {
        "event": "train",
        "step": run.state.global_step,
        "epoch": epoch,
        "learning_rate": run.scheduler.get_last_lr()[0],
        **parts,
        **counts,
        "teacher_flops_spent_total": run.ledger.teacher_flops,
        "teacher_flops_vanilla_total": run.ledger.vanilla_flops,
        **budget_state(run),
    }


def budget_state(run: DistillRun) -> dict[str, Any]:
    """The teacher budget's bound so far beside the spend it is compared with (nothing without one)."""
    budget = run.kd.budget
    if budget is None:
        return {}
    spent, vanilla = run.ledger.budget_spend(budget.unit)
    return budget_counts(budget, run.state.global_step, run.total_steps, vanilla=vanilla, spent=spent)


def evaluate_once(run: DistillRun, marks: Milestones, reporter: Reporter) -> None:
    """Evaluate on rank 0 unless this step was already evaluated; the other ranks wait."""
    step = run.state.global_step
    if run.eval_set is not None and run.procs.is_main and marks.eval_step != step:
        assert run.eval_data is not None
        metric, batch_size = run.eval_data.metric, run.args.per_device_eval_batch_size
        marks.last_eval = evaluate(run.student.model, run.eval_set, metric, run.pad_id, batch_size)
        marks.eval_step = step
        reporter.evaluation(step, marks.last_eval)
    barrier(run.procs)


def save_once(run: DistillRun, marks: Milestones) -> None:
    """A checkpoint of this step unless one was already written."""
    if marks.save_step != run.state.global_step:
        write_checkpoint(run, rank_state(run))
        marks.save_step = run.state.global_step


def finish(run: DistillRun, teachers: Teachers, marks: Milestones, reporter: Reporter) -> dict[str, Any]:
    """Final evaluation and checkpoint; rank 0 saves the student, ``results.json`` and the summary
    paragraph (printed and in ``summary.txt``)."""
    evaluate_once(run, marks, reporter)
    if run.args.save_strategy != "no":
        save_once(run, marks)
    results = {**run_results(run, teachers, marks.last_eval), **baseline_check(run, marks.last_eval)}
    if run.procs.is_main:
        run.student.model.save_pretrained(run.output_dir)
        run.tokenizer.save_pretrained(run.output_dir)
        (run.output_dir / "results.json").write_text(json.dumps(results, indent=2))
        summary = summary_paragraph(run.args, results)
        (run.output_dir / "summary.txt").write_text(summary + "\n")
        print(summary)
        if results["above_majority_baseline"] is False:
            print(baseline_warning(results), file=sys.stderr)
    reporter.close()
    return results


def run_results(run: DistillRun, teachers: Teachers, last_eval: dict[str, float]) -> dict[str, Any]:
    """What ``results.json`` holds."""
    state, args = run.state, run.args
    return {
        "task": run.train_data.name,
        "student_layers": run.student.num_layers,
        "global_step": state.global_step,
        "epoch": state.epoch + state.batch_in_epoch / run.steps_per_epoch,
        "world_size": run.procs.world_size,
        "train_runtime_s": state.train_runtime_s,
        "teacher_time_s": state.teacher_time_s,
        "eval": last_eval,
        "flops": {**run.ledger.summary(), **budget_state(run)},
        "teacher_ladder": list(run.kd.teacher_roles),
        "teachers": {
            role: {"spec": args.teachers[role], **asdict(info)} for role, info in teachers.infos.items()
        },
        "args": args.to_dict(),
        "made_with": made_with(),
    }


def baseline_check(run: DistillRun, last_eval: dict[str, float]) -> dict[str, Any]:
    """The majority-class baseline of the evaluation set and whether the student beat it on the task's
    metric (:func:`above_majority_baseline`; None, None without an evaluation)."""
    if not last_eval or run.eval_data is None:
        return {"majority_baseline": None, "above_majority_baseline": None}
    metric = run.eval_data.metric
    baseline = majority_baseline(
        [e.label for e in run.train_data.examples],
        [e.label for e in run.eval_data.examples],
        metric,
        run.train_data.label_names,
    )
    above = above_majority_baseline(last_eval, baseline)
    return {"majority_baseline": baseline, "above_majority_baseline": above}


def baseline_warning(results: dict[str, Any]) -> str:
    baseline = results["majority_baseline"]
    key = f"eval_{baseline['metric']}"
    return (
        f"WARNING: the student's {baseline['metric']} {results['eval'][key]:.4f} is not above the "
        f"majority-class baseline {baseline[key]:.4f} by more than {BASELINE_MARGIN} "
        f"(always predicting {baseline['label']!r}): it has not "
        "learned the task (more steps, a higher learning rate, or check the data)"
    )
