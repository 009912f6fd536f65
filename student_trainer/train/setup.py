"""Everything a distill run sets up before its loop: output folder, teachers, data, student,
optimizer, row selection, and the state it resumes from. :class:`DistillRun` holds the result;
the loop and the step functions read it instead of closing over local variables.
"""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler
from transformers import PreTrainedTokenizerBase

from shared.api_key import clean_api_key
from shared.errors import UserError
from shared.flops import flops_per_token
from student_trainer.args.distill import DistillArguments
from student_trainer.data.loading import load_train_and_eval_from
from student_trainer.data.tasks import TaskData
from student_trainer.data.tokenized import TokenizedDataset
from student_trainer.kd.alignment import LayerAlignment
from student_trainer.kd.budget import BatchCosts, BudgetPacer
from student_trainer.kd.config import TEACHER_ROLES, KDConfig
from student_trainer.kd.ledger import FlopsLedger, is_uncounted, teacher_flops_config
from student_trainer.kd.selection import ExactBudgetSelector, select_instances
from student_trainer.teachers.client import (
    TeacherClient,
    TeacherInfo,
    TeacherRequestError,
    make_teacher_client,
    remote_kind,
)
from student_trainer.teachers.store import AnswerStore, default_store_path
from student_trainer.teachers.stored_client import StoredTeacherClient
from student_trainer.train.checkpoint import (
    capture_rng_state,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    restore_rng_state,
    rotate_checkpoints,
    save_checkpoint,
)
from student_trainer.train.distributed import Processes, barrier, gather_to_main
from student_trainer.train.optim import make_optimizer
from student_trainer.train.student import DistillStudent, build_student, teacher_label_order, text_teachers


@dataclass
class TrainingState:
    """Where training stands (HF ``TrainerState``); with the RNG states this is the whole data position."""

    global_step: int = 0
    epoch: int = 0  # epochs completed
    batch_in_epoch: int = 0  # next batch of the current epoch's order
    data_seed: int = 0
    world_size: int = 1
    train_runtime_s: float = 0.0  # the training loop's wall time, summed over resumed runs
    teacher_time_s: float = 0.0  # of which waiting for teachers (rank mean)


@dataclass
class Teachers:
    """The teachers of a run: their clients, the event loop they are asked on, what they said they are."""

    clients: dict[str, TeacherClient]
    loop: asyncio.AbstractEventLoop
    ready_timeout_s: float
    infos: dict[str, TeacherInfo] = field(default_factory=dict)
    label_orders: dict[str, list[int] | None] = field(default_factory=dict)


@dataclass
class RowSelector:
    """The row selection of ``--data_selection`` with its own RNG, and the exact-budget carry or the
    teacher budget's pacer (whose counters are the budget's state)."""

    strategy: str
    ratio: float
    generator: torch.Generator
    budget: ExactBudgetSelector | None
    pacer: BudgetPacer | None = None

    @classmethod
    def build(cls, config: KDConfig, seed: int, total_steps: int = 1, world_size: int = 1) -> RowSelector:
        generator = torch.Generator().manual_seed(seed)  # the `random` strategy's own RNG
        budget = None
        if config.exact_budget:
            budget = ExactBudgetSelector(config.data_selection, config.selection_ratio, generator)
        teacher_budget = config.budget
        pacer = None if teacher_budget is None else BudgetPacer(teacher_budget, total_steps, world_size)
        return cls(config.data_selection, config.selection_ratio, generator, budget, pacer)

    def select(self, logits: torch.Tensor, costs: BatchCosts | None = None) -> torch.Tensor:
        """The rows of this batch that get teacher supervision, most uncertain (per FLOP) first."""
        if self.pacer:
            if costs is None:
                raise ValueError("a teacher budget needs the batch's row costs")
            return self.pacer.select(logits, costs, self.strategy, self.generator)
        if self.budget:
            return self.budget.select(logits)
        return select_instances(logits, strategy=self.strategy, ratio=self.ratio, generator=self.generator)

    def state_dict(self) -> dict[str, Any]:
        budget = self.budget.state_dict() if self.budget else None
        pacer = self.pacer.state_dict() if self.pacer else None
        return {"generator": self.generator.get_state(), "budget": budget, "teacher_budget": pacer}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        if self.budget:
            self.budget.load_state_dict(state["budget"])
        if self.pacer:
            if not state.get("teacher_budget"):
                raise UserError("the checkpoint was written without --teacher_budget: resume it without one")
            self.pacer.load_state_dict(state["teacher_budget"])


@dataclass
class DistillRun:
    """What the loop works with; built once by :func:`build_run`."""

    args: DistillArguments
    kd: KDConfig
    procs: Processes
    output_dir: Path
    train_data: TaskData
    eval_data: TaskData | None
    student: DistillStudent
    tokenizer: PreTrainedTokenizerBase
    train_set: TokenizedDataset
    eval_set: TokenizedDataset | None
    pad_id: int
    sampler: DistributedSampler
    steps_per_epoch: int
    total_steps: int
    alignments: dict[str, LayerAlignment]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    selector: RowSelector
    text_roles: frozenset[str] = frozenset()  # teachers with their own vocabulary: sent raw text
    ledger: FlopsLedger = field(default_factory=FlopsLedger)
    state: TrainingState = field(default_factory=TrainingState)
    resume_step: int | None = None

    @property
    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def row_texts(self, rows: list[int]) -> tuple[list[str], list[str] | None]:
        return self.train_set.texts(rows)


# -- before the run: output folder and teachers ------------------------------------------------------


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


def make_clients(args: DistillArguments, device: torch.device) -> dict[str, TeacherClient]:
    """One client per teacher the method uses (nothing is contacted yet)."""
    api_key = None
    if args.api_key_env:
        api_key = clean_api_key(os.environ.get(args.api_key_env), f"--api_key_env {args.api_key_env}")
    # each backend ignores the other's options (local: device; HTTP: timeout, API key)
    options = {"timeout_s": args.teacher_timeout, "api_key": api_key, "device": str(device)}
    prompts = args.teacher_prompts
    clients = {
        role: make_teacher_client(args.teachers[role], name=role, prompt=prompts.get(role), **options)
        for role in args.teacher_roles
    }
    stored = [
        role
        for role in clients
        if args.teacher_store != "none" and (args.teacher_store != "auto" or remote_kind(args.teachers[role]))
    ]
    if stored:
        path = default_store_path() if args.teacher_store == "auto" else Path(args.teacher_store)
        store = AnswerStore(path, max_bytes=args.teacher_store_max_mb * 1024**2)
        clients.update({role: StoredTeacherClient(clients[role], store) for role in stored})
    return clients


def key_hint(err: TeacherRequestError, api_key_env: str | None) -> str:
    """What to check when the service refused the API key (401/403), naming where it came from."""
    if err.status not in (401, 403):
        return ""
    if api_key_env:
        return f" (unauthorised: check the API key in ${api_key_env}, from --api_key_env)"
    return " (unauthorised: the service wants an API key; name its environment variable with --api_key_env)"


def start_teachers(teachers: Teachers, specs: Mapping[str, str], api_key_env: str | None = None) -> None:
    """Wait (bounded) until every teacher is ready and keep their metadata, by role; ``specs`` name
    them in errors."""
    timeout = teachers.ready_timeout_s

    async def start(role: str) -> TeacherInfo:
        try:
            return await teachers.clients[role].start(timeout)
        except Exception as err:
            where = f"teacher {role} ({specs[role]})"
            if type(err) is UserError:  # the checkpoint itself is refused (e.g. an unsupported model_type)
                raise UserError(f"{where}: {err}") from err
            if isinstance(err, TeacherRequestError):  # refused at once (a key, a model name): no waiting
                raise UserError(f"{where}: {err}{key_hint(err, api_key_env)}") from err
            raise UserError(f"{where} is not ready after {timeout:g} s: {type(err).__name__}: {err}") from err

    async def start_all() -> list[TeacherInfo]:
        return await asyncio.gather(*(start(role) for role in teachers.clients))

    infos = teachers.loop.run_until_complete(start_all())
    teachers.infos = dict(zip(teachers.clients, infos, strict=True))


def close_teachers(teachers: Teachers) -> None:
    async def close_all() -> None:
        await asyncio.gather(*(c.aclose() for c in teachers.clients.values()), return_exceptions=True)

    teachers.loop.run_until_complete(close_all())


def ladder_order(infos: dict[str, TeacherInfo]) -> tuple[str, ...]:
    """The teachers by FLOPs per token (from their metadata), smallest first: the ladder that
    ``hard`` and ``soft`` climb. Ties keep the command line's order."""
    return tuple(sorted(infos, key=lambda role: flops_per_token(teacher_flops_config(infos[role]))))


def check_budget_vocabulary(
    kd: KDConfig, text_roles: frozenset[str], infos: Mapping[str, TeacherInfo]
) -> None:
    """A budget in FLOPs prices each row before asking: only teachers reading the student's ids,
    whose FLOPs are counted."""
    if kd.budget is None or kd.budget.unit != "flops":
        return
    instead = " (a budget in calls or tokens works: 5000calls, 2Mtok)"
    if text_roles:
        raise UserError(
            f"--teacher_budget in FLOPs needs teachers that share the student's vocabulary: "
            f"{sorted(text_roles)[0]} reads text, so a row's FLOPs are known only after it answers" + instead
        )
    uncounted = sorted(role for role, info in infos.items() if is_uncounted(info))
    if uncounted:
        raise UserError(
            f"--teacher_budget in FLOPs needs teachers whose FLOPs are known: {uncounted[0]} is served "
            "without its architecture" + instead
        )


# -- the run itself ------------------------------------------------------------------------------------


def build_run(args: DistillArguments, procs: Processes, output_dir: Path, teachers: Teachers) -> DistillRun:
    """Data, student, optimizer and selection; the teachers learn the data's label order."""
    infos = teachers.infos
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
    teachers.label_orders = {
        role: teacher_label_order(role, info, train_data.label_names) for role, info in infos.items()
    }
    text_roles = text_teachers(
        infos,
        tokenizer,
        int(student.model.config.vocab_size),
        all_token_features=args.kd.uses_hidden_states and args.kd.pt_features == "all-tokens",
    )
    max_len = min(  # a teacher sent text cuts it to its own length limit
        [args.max_seq_length, student.model.config.max_position_embeddings]
        + [info.max_seq_length for role, info in infos.items() if role not in text_roles]
    )
    train_set = TokenizedDataset(train_data, tokenizer, max_len)
    eval_set = (
        TokenizedDataset(eval_data, tokenizer, max_len) if eval_data and eval_data.is_labelled else None
    )
    sampler = DistributedSampler(
        train_set, num_replicas=procs.world_size, rank=procs.rank, shuffle=True, seed=args.seed
    )
    steps_per_epoch = math.ceil(len(sampler) / args.per_device_train_batch_size)
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    optimizer, scheduler = make_optimizer(student, args, total_steps)
    kd = replace(args.kd, ladder=ladder_order(infos)) if infos else args.kd
    check_budget_vocabulary(kd, text_roles, infos)
    return DistillRun(
        args=args,
        kd=kd,
        procs=procs,
        output_dir=output_dir,
        train_data=train_data,
        eval_data=eval_data,
        student=student,
        tokenizer=tokenizer,
        train_set=train_set,
        eval_set=eval_set,
        pad_id=tokenizer.pad_token_id or 0,
        sampler=sampler,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        alignments={
            role: LayerAlignment.between(student.num_layers, info.num_layers) for role, info in infos.items()
        },
        optimizer=optimizer,
        scheduler=scheduler,
        selector=RowSelector.build(kd, args.seed, total_steps, procs.world_size),
        text_roles=text_roles,
        ledger=FlopsLedger(roles=tuple(dict.fromkeys((*TEACHER_ROLES, *infos)))),
        state=TrainingState(data_seed=args.seed, world_size=procs.world_size),
    )


def resume(run: DistillRun) -> None:
    """Continue from ``--resume_from_checkpoint`` when given; every rank then starts from rank 0's weights."""
    spec, procs = run.args.resume_from_checkpoint, run.procs
    path = resolve_checkpoint(spec, run.output_dir) if spec else None
    if path is not None:
        saved = load_checkpoint(path, student=run.student, map_location=procs.device)
        run.state = TrainingState(**saved["trainer_state"]["state"])
        if run.state.world_size != procs.world_size:
            raise UserError(
                f"{path} was written by {run.state.world_size} process(es); this run has {procs.world_size}"
            )
        run.optimizer.load_state_dict(saved["optimizer"])
        run.scheduler.load_state_dict(saved["scheduler"])
        run.ledger.load_state_dict(saved["trainer_state"]["ledger"])
        mine = saved["rank_states"][procs.rank]
        restore_rng_state(mine["rng"])
        run.selector.load_state_dict(mine)
        run.sampler.seed = run.state.data_seed
        run.resume_step = run.state.global_step
        if procs.is_main:
            print(
                f"Resuming from {path} (step {run.state.global_step}, epoch {run.state.epoch})",
                file=sys.stderr,
            )
    if procs.world_size > 1:  # every rank starts from rank 0's weights, as DDP does
        for p in run.student.parameters():
            dist.broadcast(p.data, src=0)


def rank_state(run: DistillRun) -> dict[str, Any]:
    """This rank's share of a checkpoint: its RNG states and the selector's."""
    return {"rng": capture_rng_state(), **run.selector.state_dict()}


def write_checkpoint(run: DistillRun, states_of_ranks: dict[str, Any]) -> Path | None:
    """Write ``checkpoint-<global_step>`` from rank 0; every rank must call this together."""
    gathered = gather_to_main(states_of_ranks, run.procs)
    path = None
    if run.procs.is_main:
        path = save_checkpoint(
            run.output_dir,
            run.state.global_step,
            student=run.student,
            tokenizer=run.tokenizer,
            optimizer=run.optimizer,
            scheduler=run.scheduler,
            rank_states=gathered,
            trainer_state={"state": asdict(run.state), "ledger": run.ledger.state_dict()},
            args=run.args.to_dict(),
        )
        rotate_checkpoints(run.output_dir, run.args.save_total_limit)
    barrier(run.procs)
    return path
