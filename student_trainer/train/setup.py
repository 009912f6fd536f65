"""What a dynamic KD run sets up before its first batch: the teachers (clients behind the answer
store, started and ordered by FLOPs per token) and the row selector with its own RNG and budget."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from shared.api_key import clean_api_key
from shared.errors import UserError
from shared.flops import flops_per_token
from student_trainer.args.distill import DistillArguments
from student_trainer.kd.budget import BatchCosts, BudgetPacer
from student_trainer.kd.config import KDConfig
from student_trainer.kd.ledger import is_uncounted, teacher_flops_config
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


def make_clients(args: DistillArguments, device: torch.device) -> dict[str, TeacherClient]:
    """One client per teacher the method uses, behind the answer store where it applies (nothing is
    contacted yet)."""
    api_key = None
    if args.api_key_env:
        api_key = clean_api_key(os.environ.get(args.api_key_env), f"--api_key_env {args.api_key_env}")
    # each backend ignores the other's options (local: device; HTTP: timeout, API key)
    where = "cpu" if device.type == "cpu" else str(device)  # torchrun on CPU says cpu:0
    options = {"timeout_s": args.teacher_timeout, "api_key": api_key, "device": where}
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
