"""`student-trainer distill`: the training loop of dynamic knowledge distillation.

Read :func:`train` top to bottom: set up (processes, data, teachers, student, optimizer,
resume), then one loop over batches — student forward, choose rows and teachers from the
student's own uncertainty, ask the teachers, loss, backward, step, count FLOPs, log,
evaluate, checkpoint — then the final evaluation, ``results.json`` and a summary.

Teachers are asked on one asyncio event loop owned by the trainer, both teachers' requests
in flight at once. A teacher that stays down (its client gave up retrying) stops the run
with a one-line error, after a checkpoint of the last completed step: nothing is lost, and
``--resume_from_checkpoint latest`` continues exactly where it stopped.

Data parallel under ``torchrun``: every rank trains on its :class:`DistributedSampler` shard
and asks its own teachers; gradients are averaged with one all-reduce after backward. (Not
``DistributedDataParallel``: dynamic KD uses different parameters on different steps and
ranks — a projection only when its teacher answered rows — which DDP's reducer cannot
track; one explicit all-reduce of every gradient is exact and simple.) FLOPs ledgers are
summed across ranks; only rank 0 writes logs and checkpoints.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DistributedSampler
from tqdm.auto import tqdm
from transformers import get_scheduler
from transformers.utils import logging as hf_logging

from shared.api_key import clean_api_key
from shared.errors import UserError
from student_trainer.args.distill import DistillArguments
from student_trainer.data.loading import load_train_and_eval_from
from student_trainer.data.tokenized import TokenizedDataset, collate_batch
from student_trainer.kd import ledger as flops
from student_trainer.kd.alignment import LayerAlignment
from student_trainer.kd.selection import ExactBudgetSelector, select_instances
from student_trainer.kd.step import (
    TeacherCallError,
    ask_teachers,
    distillation_loss,
    in_data_label_order,
    plan_batch,
)
from student_trainer.teachers.client import TeacherClient, TeacherInfo, make_teacher_client
from student_trainer.train.checkpoint import (
    capture_rng_state,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    restore_rng_state,
    rotate_checkpoints,
    save_checkpoint,
)
from student_trainer.train.metrics import compute_metrics
from student_trainer.train.optim import adamw_with_decay_groups, resolve_device
from student_trainer.train.student import DistillStudent, build_student, teacher_label_order

# -- processes ------------------------------------------------------------------------------------


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


# -- data -----------------------------------------------------------------------------------------


def batches(indices: list[int], batch_size: int) -> list[list[int]]:
    return [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


@torch.no_grad()
def evaluate(
    student: DistillStudent,
    dataset: TokenizedDataset,
    metric: str,
    pad_id: int,
    batch_size: int,
    device: torch.device,
) -> dict[str, float]:
    """Loss and the task metric on the evaluation set (consumes no RNG, so resume stays exact)."""
    student.eval()
    predictions, labels, loss_sum = [], [], 0.0
    for chunk in batches(list(range(len(dataset))), batch_size):
        batch = to_device(collate_batch([dataset[i] for i in chunk], pad_id), device)
        logits, _ = student(batch)
        loss_sum += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
        predictions.append(logits.argmax(dim=-1).cpu())
        labels.append(batch["labels"].cpu())
    student.train()
    scores = compute_metrics(metric, torch.cat(predictions), torch.cat(labels))
    return {"eval_loss": loss_sum / len(dataset), **{f"eval_{k}": float(v) for k, v in scores.items()}}


def make_optimizer(
    student: DistillStudent, args: DistillArguments, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """BERT's AdamW (no decay on biases and LayerNorm weights) and the HF learning-rate schedule."""
    optimizer = adamw_with_decay_groups(
        student.parameters(),
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
    )
    warmup = args.warmup_steps if args.warmup_steps > 0 else math.ceil(args.warmup_ratio * total_steps)
    return optimizer, get_scheduler(args.lr_scheduler_type, optimizer, warmup, total_steps)


def make_clients(args: DistillArguments, device: torch.device) -> dict[str, TeacherClient]:
    """One client per teacher the method uses (nothing is contacted yet)."""
    api_key = None
    if args.api_key_env:
        api_key = clean_api_key(os.environ.get(args.api_key_env), f"--api_key_env {args.api_key_env}")
    # each backend ignores the other's options (local: device; HTTP: timeout, API key)
    options = {"timeout_s": args.teacher_timeout, "api_key": api_key, "device": str(device)}
    return {
        role: make_teacher_client(args.teachers[role], name=role, **options) for role in args.teacher_roles
    }


def start_teachers(
    clients: dict[str, TeacherClient], args: DistillArguments, loop: asyncio.AbstractEventLoop
) -> dict[str, TeacherInfo]:
    """Wait (bounded) until every teacher is ready; their metadata, by role."""

    async def start(role: str) -> TeacherInfo:
        try:
            return await clients[role].start(args.teacher_ready_timeout)
        except Exception as err:
            raise UserError(
                f"teacher {role} ({args.teachers[role]}) is not ready after "
                f"{args.teacher_ready_timeout:g} s: {type(err).__name__}: {err}"
            ) from err

    async def start_all() -> list[TeacherInfo]:
        return await asyncio.gather(*(start(role) for role in clients))

    return dict(zip(clients, loop.run_until_complete(start_all()), strict=True))


def close_teachers(clients: dict[str, TeacherClient], loop: asyncio.AbstractEventLoop) -> None:
    async def close_all() -> None:
        await asyncio.gather(*(client.aclose() for client in clients.values()), return_exceptions=True)

    loop.run_until_complete(close_all())


# -- state and logs -------------------------------------------------------------------------------


@dataclass
class TrainingState:
    """Where training stands; with the RNG states this is the whole data position."""

    global_step: int = 0
    epoch: int = 0  # epochs completed
    batch_in_epoch: int = 0  # next batch of the current epoch's order
    data_seed: int = 0
    world_size: int = 1
    train_runtime_s: float = 0.0  # the training loop's wall time, summed over resumed runs
    teacher_time_s: float = 0.0  # of which waiting for teachers (rank mean)


class MetricsLog:
    """``metrics.jsonl`` (one line per step and per evaluation) + TensorBoard when installed."""

    def __init__(self, output_dir: Path, resume_step: int | None, enabled: bool):
        self.path = output_dir / "metrics.jsonl"
        self.enabled = enabled
        self.tensorboard = None
        if not enabled:
            return
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():  # drop what a killed run logged past its last checkpoint
            self.path.write_text("".join(line + "\n" for line in self._lines_up_to(resume_step)))
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return
        self.tensorboard = SummaryWriter(str(output_dir / "runs"))

    def _lines_up_to(self, step: int) -> list[str]:
        """The log's records up to ``step``; a kill mid-write leaves a torn last line, dropped too."""
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break
            if record["step"] <= step:
                kept.append(line)
        return kept

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if isinstance(value, int | float) and key != "step":
                    self.tensorboard.add_scalar(f"{record['event']}/{key}", value, record["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def gflops(value: float) -> str:
    return f"{value / 1e9:,.2f} GFLOPs"


def progress_line(mean: dict[str, float], learning_rate: float, ledger: flops.FlopsLedger) -> str:
    saved = ledger.saved_fraction
    return (
        f"loss {mean['loss']:.4f} (ce {mean['ce']:.4f} kd {mean['kd']:.4f} pt {mean['pt']:.4f}) | "
        f"lr {learning_rate:.2e} | teacher wait {mean['teacher_seconds']:.3f} s/step | "
        f"teachers {gflops(ledger.teacher_flops)}"
        + (f" ({100 * saved:.1f}% saved vs vanilla KD)" if saved is not None else "")
    )


def summary_paragraph(args: DistillArguments, results: dict[str, Any]) -> str:
    """The one paragraph a human reads at the end of a run."""
    ledger = results["flops"]
    method = (
        "cross-entropy only (no KD)"
        if args.no_kd
        else f"teacher selection '{args.teacher_selection}', data selection '{args.data_selection}'"
        f" (r = {args.selection_ratio:g}{', exact budget' if args.exact_budget else ''}),"
        f" supervision '{args.supervision}' ({args.kd_loss} loss)"
    )
    evaluation = results.get("eval") or {}
    scores = ", ".join(
        f"{k.removeprefix('eval_')} {v:.4f}" for k, v in evaluation.items() if k != "eval_loss"
    )
    text = (
        f"Distilled a {results['student_layers']}-layer student from {args.model_name_or_path} on "
        f"{results['task']} for {results['global_step']} steps ({results['epoch']:.2f} epochs, "
        f"{results['world_size']} process(es)) in {results['train_runtime_s']:.1f} s with {method}. "
    )
    text += f"Evaluation: {scores}. " if scores else "No evaluation data. "
    if ledger["teacher_flops_saved_fraction"] is None:
        text += "No teacher was queried. "
    else:
        text += (
            f"Teachers spent {gflops(ledger['teacher_flops_spent'])} where vanilla KD on the same batches "
            f"would have spent {gflops(ledger['teacher_flops_vanilla'])} "
            f"({gflops(ledger['teacher_flops_vanilla_unpadded'])} without padding): "
            f"{100 * ledger['teacher_flops_saved_fraction']:.1f}% saved. Dynamic KD's choices alone save "
            f"{100 * ledger['teacher_flops_saved_fraction_selection']:.1f}% (the rows sent would cost "
            f"{gflops(ledger['teacher_flops_requested'])} at their real lengths); the rest is the service's "
            f"padding removal and its cache ({ledger['teacher_cache_hits']:,} rows answered from it). "
        )
    text += f"Student training cost {gflops(ledger['student_flops'])}."
    return text


# -- the loop -------------------------------------------------------------------------------------


def prepare_output_dir(args: DistillArguments, procs: Processes) -> Path:
    """Refuse to mix a new run with an old run's checkpoints (unless told to delete them)."""
    output_dir = Path(args.output_dir)
    stale = [] if args.resume_from_checkpoint else list_checkpoints(output_dir)
    if stale and not args.overwrite_output_dir:
        raise UserError(
            f"{output_dir} already holds {stale[-1].name}: continue it with --resume_from_checkpoint latest, "
            "or start afresh with --overwrite_output_dir"
        )
    if procs.is_main:
        for path in stale:
            shutil.rmtree(path)
        output_dir.mkdir(parents=True, exist_ok=True)
    return output_dir


def train(args: DistillArguments) -> dict[str, Any]:
    """Run a whole distillation; returns what ``results.json`` holds."""
    hf_logging.disable_progress_bar()
    procs = init_processes(args.device)
    loop = asyncio.new_event_loop()
    clients: dict[str, TeacherClient] = {}
    try:
        output_dir = prepare_output_dir(args, procs)
        clients = make_clients(args, procs.device)
        infos = start_teachers(clients, args, loop)
        return _train(args, procs, output_dir, loop, clients, infos)
    finally:
        close_teachers(clients, loop)
        loop.close()
        if procs.world_size > 1:
            dist.destroy_process_group()


def _train(
    args: DistillArguments,
    procs: Processes,
    output_dir: Path,
    loop: asyncio.AbstractEventLoop,
    clients: dict[str, TeacherClient],
    infos: dict[str, TeacherInfo],
) -> dict[str, Any]:
    # data and student ----------------------------------------------------------------------------
    train_data, eval_data = load_train_and_eval_from(args)
    student, tokenizer = build_student(
        args.model_name_or_path,
        label_names=train_data.label_names,
        num_layers=args.student_num_layers,
        teachers=infos,
        with_projections=args.uses_hidden_states,
        device=procs.device,
        seed=args.seed,
    )
    label_orders = {
        role: teacher_label_order(role, info, train_data.label_names) for role, info in infos.items()
    }
    max_len = min(
        [args.max_seq_length, student.model.config.max_position_embeddings]
        + [info.max_seq_length for info in infos.values()]
    )
    train_set = TokenizedDataset(train_data, tokenizer, max_len)
    eval_set = (
        TokenizedDataset(eval_data, tokenizer, max_len) if eval_data and eval_data.is_labelled else None
    )
    pad_id = tokenizer.pad_token_id or 0
    sampler = DistributedSampler(
        train_set, num_replicas=procs.world_size, rank=procs.rank, shuffle=True, seed=args.seed
    )
    steps_per_epoch = math.ceil(len(sampler) / args.per_device_train_batch_size)
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    alignments = {
        role: LayerAlignment.between(student.num_layers, info.num_layers) for role, info in infos.items()
    }

    # optimizer, schedule, selection --------------------------------------------------------------
    optimizer, scheduler = make_optimizer(student, args, total_steps)
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    generator = torch.Generator().manual_seed(args.seed)  # the `random` selection strategy's own RNG
    select = partial(
        select_instances, strategy=args.data_selection, ratio=args.selection_ratio, generator=generator
    )
    budget = None
    if args.exact_budget:
        budget = ExactBudgetSelector(args.data_selection, args.selection_ratio, generator)
        select = budget.select
    ledger = flops.FlopsLedger()
    state = TrainingState(data_seed=args.seed, world_size=procs.world_size)

    def rank_state() -> dict[str, Any]:
        return {
            "rng": capture_rng_state(),
            "generator": generator.get_state(),
            "budget": budget.state_dict() if budget else None,
        }

    # resume ---------------------------------------------------------------------------------------
    resume_step = None
    spec = args.resume_from_checkpoint
    path = resolve_checkpoint(spec, output_dir) if spec else None
    if path is not None:
        saved = load_checkpoint(path, student=student, map_location=procs.device)
        state = TrainingState(**saved["trainer_state"]["state"])
        if state.world_size != procs.world_size:
            raise UserError(
                f"{path} was written by {state.world_size} process(es); this run has {procs.world_size}"
            )
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        ledger.load_state_dict(saved["trainer_state"]["ledger"])
        mine = saved["rank_states"][procs.rank]
        restore_rng_state(mine["rng"])
        generator.set_state(mine["generator"])
        if budget:
            budget.load_state_dict(mine["budget"])
        sampler.seed = state.data_seed
        resume_step = state.global_step
        if procs.is_main:
            print(f"Resuming from {path} (step {state.global_step}, epoch {state.epoch})", file=sys.stderr)
    if procs.world_size > 1:  # every rank starts from rank 0's weights, as DDP does
        for p in student.parameters():
            dist.broadcast(p.data, src=0)

    def checkpoint(states_of_ranks: dict[str, Any]) -> Path | None:
        """Write ``checkpoint-<global_step>`` from rank 0; every rank must call this together."""
        gathered = gather_to_main(states_of_ranks, procs)
        path = None
        if procs.is_main:
            path = save_checkpoint(
                output_dir,
                state.global_step,
                student=student,
                tokenizer=tokenizer,
                optimizer=optimizer,
                scheduler=scheduler,
                rank_states=gathered,
                trainer_state={"state": asdict(state), "ledger": ledger.state_dict()},
                args=args.to_dict(),
            )
            rotate_checkpoints(output_dir, args.save_total_limit)
        if procs.world_size > 1:
            dist.barrier()
        return path

    log = MetricsLog(output_dir, resume_step, enabled=procs.is_main)
    progress = tqdm(
        total=total_steps,
        initial=state.global_step,
        desc="distill",
        disable=args.disable_tqdm or not procs.is_main,
    )
    last_eval: dict[str, float] = {}
    last_eval_step = last_save_step = -1
    started = time.perf_counter() - state.train_runtime_s
    window: list[dict[str, float]] = []

    def run_eval() -> None:
        nonlocal last_eval, last_eval_step
        if eval_set is not None and procs.is_main and last_eval_step != state.global_step:
            last_eval = evaluate(
                student, eval_set, eval_data.metric, pad_id, args.per_device_eval_batch_size, procs.device
            )
            last_eval_step = state.global_step
            log.write({"event": "eval", "step": state.global_step, **last_eval})
            progress.write(
                f"step {state.global_step}: " + ", ".join(f"{k} {v:.4f}" for k, v in last_eval.items())
            )
        if procs.world_size > 1:
            dist.barrier()

    def run_save() -> None:
        nonlocal last_save_step
        if last_save_step != state.global_step:
            checkpoint(rank_state())
            last_save_step = state.global_step

    # training -------------------------------------------------------------------------------------
    student.train()
    while state.global_step < total_steps:
        sampler.set_epoch(state.epoch)
        order = batches(list(sampler), args.per_device_train_batch_size)
        if state.batch_in_epoch == 0 and budget:
            budget.reset()
        for batch_index in range(state.batch_in_epoch, len(order)):
            if state.global_step >= total_steps:
                break
            before_step = rank_state()  # what a checkpoint holds if this step cannot finish
            batch = to_device(collate_batch([train_set[i] for i in order[batch_index]], pad_id), procs.device)

            # student forward; its own uncertainty picks rows and teachers
            logits, hidden_states = student(batch, output_hidden_states=args.uses_hidden_states)
            plan = plan_batch(args, logits, batch, select, alignments)
            failure: TeacherCallError | None = None
            asked = time.perf_counter()
            try:
                answers = loop.run_until_complete(
                    ask_teachers(clients, plan.queries, args.teacher_ready_timeout)
                )
            except TeacherCallError as err:
                answers, failure = {}, err
            answers = {role: in_data_label_order(a, label_orders[role]) for role, a in answers.items()}
            teacher_seconds = time.perf_counter() - asked
            if any_rank(failure is not None, procs):
                path = checkpoint(before_step)
                reason = failure or "a teacher failed on another rank"
                raise UserError(
                    f"{reason}; stopped at step {state.global_step} with a resumable checkpoint"
                    f"{f' at {path}' if path else ''} (continue with --resume_from_checkpoint latest)"
                )

            # loss, backward, step
            loss, parts = distillation_loss(
                args, student, logits, hidden_states, batch, plan, answers, alignments
            )
            loss.backward()
            if procs.world_size > 1:
                average_gradients(parameters, procs.world_size)
            if args.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(parameters, args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.global_step += 1
            state.batch_in_epoch = batch_index + 1

            # FLOPs ledger (summed over ranks) and logs
            batch_size, seq_len = batch["input_ids"].shape
            real_lengths = batch["attention_mask"].sum(dim=1).tolist()
            counts = flops.all_reduce_counts(
                {
                    **flops.teacher_counts(answers, plan.rows_sent),
                    **flops.requested_counts(infos, plan.queries),
                    **flops.vanilla_counts(infos, real_lengths, seq_len),
                    **flops.student_counts(student.model.config, batch_size, seq_len),
                    "selected_instances": len(plan.selected),
                }
            )
            ledger.add(counts)
            parts = mean_over_ranks({"loss": loss.item(), **parts, "teacher_seconds": teacher_seconds}, procs)
            state.teacher_time_s += parts["teacher_seconds"]
            state.train_runtime_s = time.perf_counter() - started
            epoch_float = state.epoch + state.batch_in_epoch / len(order)
            log.write(
                {
                    "event": "train",
                    "step": state.global_step,
                    "epoch": epoch_float,
                    "learning_rate": scheduler.get_last_lr()[0],
                    **parts,
                    **counts,
                    "teacher_flops_spent_total": ledger.teacher_flops,
                    "teacher_flops_vanilla_total": ledger.vanilla_flops,
                }
            )
            progress.update(1)
            if procs.is_main:  # only rank 0 prints, so only rank 0 keeps the window
                window.append(parts)
            if state.global_step % args.logging_steps == 0 and procs.is_main:
                mean = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
                window.clear()
                progress.write(
                    f"step {state.global_step}/{total_steps} epoch {epoch_float:.2f} | "
                    + progress_line(mean, scheduler.get_last_lr()[0], ledger)
                )
            if args.eval_strategy == "steps" and state.global_step % args.eval_steps == 0:
                run_eval()
            if args.save_strategy == "steps" and state.global_step % args.save_steps == 0:
                run_save()
        else:  # the epoch ran to its end
            state.epoch += 1
            state.batch_in_epoch = 0
            if args.eval_strategy == "epoch":
                run_eval()
            if args.save_strategy == "epoch":
                run_save()
    progress.close()

    # the end -------------------------------------------------------------------------------------
    run_eval()
    if args.save_strategy != "no":
        run_save()
    results = {
        "task": train_data.name,
        "student_layers": student.num_layers,
        "global_step": state.global_step,
        "epoch": state.epoch + state.batch_in_epoch / steps_per_epoch,
        "world_size": procs.world_size,
        "train_runtime_s": state.train_runtime_s,
        "teacher_time_s": state.teacher_time_s,
        "eval": last_eval,
        "flops": ledger.summary(),
        "teachers": {role: {"spec": args.teachers[role], **asdict(info)} for role, info in infos.items()},
        "args": args.to_dict(),
    }
    if procs.is_main:
        student.model.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
        (output_dir / "results.json").write_text(json.dumps(results, indent=2))
        print(summary_paragraph(args, results))
    log.close()
    return results
