"""An experiment grid as a YAML file: tasks × methods × seeds of ordinary ``distill`` runs.

The file names the tasks (each a data folder; ``generate`` writes the synthetic one there), the
teachers to fine-tune once per task, the student, the ``distill`` flags every run shares, and the
methods (each a set of extra ``distill`` flags; ``sweep`` expands one method over every combination
of values). ``profiles`` holds named overrides merged over the file (``cpu`` for this kind of
machine, ``paper`` for the paper's settings), and ``tables`` and ``plots`` say how the report groups
the runs. ``--data [TASK=]DIR`` runs the grid on other data than the file's. Mistakes are one line
naming the key.

``server`` says what serves the teachers: ``teacher-server`` (the default; the other keys are its
teachers' settings, such as ``batch_invariant``) or, with ``engine: vllm``, vLLM's
OpenAI-compatible server, one per prompted teacher, which the runs ask the teacher's prompt
(``max_model_len``: the tokens it reads, default the teacher's ``max_seq_length``; ``options``:
more of vLLM's flags).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.config_file import read_yaml_mapping
from shared.errors import UserError
from shared.prompting import LabelPrompt
from student_trainer.data.synthetic import write_synthetic_task
from student_trainer.data.tasks import get_task_spec
from student_trainer.kd.config import LADDER_METHODS, TEACHER_NAME

PROMPT_KEYS = ("prompt", "label_words", "chat")
PLOT_KINDS = ("ratio_curve", "kl_weight", "accuracy_vs_flops", "budget_vs_ratio")
# Flags the runner sets itself for every run: a method may not set them.
RUNNER_FLAGS = frozenset(
    {"output_dir", "teacher", "teacher_prompt", "task", "data_dir", "seed", "resume_from_checkpoint"}
)
# A task's ``generate``: the tasks whose data code writes (the writer of each), and the numbers it takes.
GENERATORS: dict[str, Callable[..., Path]] = {"synthetic": write_synthetic_task}
GENERATE_KEYS = ("num_train", "num_dev", "seed")
ENGINES = ("teacher-server", "vllm")
VLLM_KEYS = frozenset({"engine", "max_model_len", "options"})


@dataclass(frozen=True)
class ModelSpec:
    """A checkpoint (path, hub id or alias such as ``minilm``) and how many layers to keep."""

    model: str
    num_layers: int | None = None


@dataclass(frozen=True)
class TeacherSpec(ModelSpec):
    """A teacher and its fine-tuning recipe (``finetune`` flags), done once per task; or, with
    ``prompted`` (``prompt``, ``label_words``, ``chat``: :mod:`shared.prompting`), a causal LM asked
    zero-shot as it is, read up to ``max_seq_length`` tokens of prompt and text."""

    finetune: dict[str, Any] = field(default_factory=dict)
    prompted: dict[str, Any] | None = None
    max_seq_length: int = 256


@dataclass(frozen=True)
class Method:
    """One row of a table: a name and the ``distill`` flags that make it."""

    name: str
    args: dict[str, Any]
    tasks: tuple[str, ...] | None = None  # None: every task of the grid

    def teacher_roles(self, teachers: tuple[str, ...]) -> tuple[str, ...]:
        """The teachers this method asks of the config's ``teachers``: none without KD, the one it
        names, or every one for a ladder method (hard, soft, ...)."""
        if self.args.get("no_kd"):
            return ()
        default = teachers[0] if len(teachers) == 1 else "large"  # as distill: the only teacher
        selection = self.args.get("teacher_selection", default)
        return teachers if selection in LADDER_METHODS else (selection,)


@dataclass(frozen=True)
class TableSpec:
    title: str
    methods: tuple[str, ...]
    baselines: tuple[str, ...] = ()
    tasks: tuple[str, ...] | None = None


@dataclass(frozen=True)
class PlotSpec:
    kind: str
    title: str
    task: str | None = None
    methods: tuple[str, ...] = ()
    baseline: str | None = None


@dataclass(frozen=True)
class ExperimentConfig:
    name: str
    tasks: dict[str, dict[str, Any]]  # task -> {data_dir, ...}
    seeds: tuple[int, ...]
    teachers: dict[str, TeacherSpec]
    student: ModelSpec
    distill: dict[str, Any]
    server: dict[str, Any]  # the engine's settings, ``engine`` left out
    methods: tuple[Method, ...]
    tables: tuple[TableSpec, ...] = ()
    plots: tuple[PlotSpec, ...] = ()
    description: str = ""
    profile: str | None = None
    engine: str = ENGINES[0]

    def method(self, name: str) -> Method:
        for method in self.methods:
            if method.name == name:
                return method
        raise UserError(f"experiment {self.name!r}: no method {name!r}")

    def task_flags(self, task: str) -> dict[str, Any]:
        """The task's ``distill`` data flags: its mapping but ``generate``, which says how to make it."""
        return {key: value for key, value in self.tasks[task].items() if key != "generate"}

    def runs(self) -> list[tuple[str, Method, int]]:
        """Every (task, method, seed) of the grid, in the order they run: task by task, then method
        by method in the file's order with all its seeds, so a partial grid holds whole rows."""
        return [
            (task, method, seed)
            for task in self.tasks
            for method in self.methods
            if method.tasks is None or task in method.tasks
            for seed in self.seeds
        ]


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` over ``base``, recursively for nested mappings (a profile over the file)."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def expand_methods(entries: list[dict[str, Any]]) -> tuple[Method, ...]:
    """Methods as written, each ``sweep`` expanded over the product of its values.

    ``{name: "{data_selection}-r{selection_ratio}", sweep: {data_selection: [entropy, lc],
    selection_ratio: [0.5, 0.1]}}`` gives four methods whose args hold those two flags.
    """
    methods: list[Method] = []
    for entry in entries:
        if not isinstance(entry, dict) or "name" not in entry:
            raise UserError(f"methods: each entry needs a name, got {entry!r}")
        unknown = set(entry) - {"name", "args", "sweep", "tasks"}
        if unknown:
            raise UserError(f"methods: {entry['name']!r} has unknown keys {sorted(unknown)}")
        args = dict(entry.get("args") or {})
        clash = RUNNER_FLAGS & set(args)
        if clash:
            raise UserError(f"methods: {entry['name']!r} sets {sorted(clash)}, which the runner sets per run")
        tasks = tuple(entry["tasks"]) if entry.get("tasks") else None
        sweep = entry.get("sweep") or {}
        keys = list(sweep)
        for values in itertools.product(*(sweep[k] for k in keys)):
            combo = dict(zip(keys, values, strict=True))
            name = str(entry["name"]).format(**combo)
            methods.append(Method(name=name, args={**args, **combo}, tasks=tasks))
    names = [m.name for m in methods]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise UserError(f"methods: names {duplicated} appear twice (a sweep's name must use its keys)")
    return tuple(methods)


def _model_spec(raw: Any, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict) or not raw.get("model"):
        raise UserError(f"{where}: needs 'model' (a path, hub id or alias such as minilm)")
    return raw


def with_data(tasks: dict[str, Any], entries: Sequence[str]) -> dict[str, Any]:
    """The tasks of ``--data [TASK=]DIR`` entries, instead of the file's: a folder alone names its task
    (``glue/SST-2`` -> ``sst2``); a task the file has keeps its other keys, but not ``generate``."""
    chosen: dict[str, Any] = {}
    for entry in entries:
        name, _, folder = entry.partition("=") if "=" in entry else ("", "", entry)
        path = Path(folder).expanduser()
        if not path.is_dir():
            raise UserError(f"--data {entry}: {folder!r} is not a directory")
        name = get_task_spec(name or path.name.lower().replace("-", "")).name  # or the known tasks
        kept = {key: value for key, value in (tasks.get(name) or {}).items() if key != "generate"}
        chosen[name] = {**kept, "data_dir": str(path)}
    return chosen


def _check_generate(task: str, spec: Any) -> None:
    """A task's ``generate``: only a task that code writes, with positive sizes."""
    where = f"tasks.{task}.generate"
    if task not in GENERATORS:
        raise UserError(f"{where}: only {', '.join(GENERATORS)} is generated; {task} needs its data_dir")
    if not isinstance(spec, dict) or set(spec) - set(GENERATE_KEYS):
        raise UserError(f"{where}: a mapping of {', '.join(GENERATE_KEYS)}, got {spec!r}")
    for key in ("num_train", "num_dev"):
        if not isinstance(spec.get(key), int) or spec[key] < 1:
            raise UserError(f"{where}.{key}: a positive number of rows, got {spec.get(key)!r}")


def parse_config(
    raw: dict[str, Any], *, profile: str | None = None, data: Sequence[str] = ()
) -> ExperimentConfig:
    """Validate a loaded YAML mapping (with ``profile``'s overrides merged in, and ``data``'s tasks
    instead of the file's: :func:`with_data`)."""
    profiles = raw.pop("profiles", None) or {}
    if profile is None and profiles:  # the file's first profile is its default (``cpu`` in ours)
        profile = next(iter(profiles))
    if profile is not None:
        if profile not in profiles:
            raise UserError(f"unknown profile {profile!r}; this file has: {', '.join(profiles) or 'none'}")
        raw = deep_merge(raw, profiles[profile])
    if data:
        raw["tasks"] = with_data(raw.get("tasks") or {}, data)
    for key in ("name", "tasks", "seeds", "methods", "student"):
        if not raw.get(key):
            raise UserError(f"experiment config: '{key}' is required")
    unknown = set(raw) - {
        "name", "description", "tasks", "seeds", "teachers", "student", "distill", "server", "methods",
        "tables", "plots",
    }  # fmt: skip
    if unknown:
        raise UserError(f"experiment config: unknown keys {sorted(unknown)}")
    tasks = raw["tasks"]
    if not isinstance(tasks, dict) or any(
        not isinstance(v, dict) or "data_dir" not in v for v in tasks.values()
    ):
        raise UserError("tasks: a mapping of task name -> {data_dir: ..., other distill data flags}")
    for task, options in tasks.items():
        if "generate" in options:
            _check_generate(str(task), options["generate"])
    teachers = {}
    for role, spec in (raw.get("teachers") or {}).items():
        if not TEACHER_NAME.match(str(role)) or role in LADDER_METHODS:
            raise UserError(f"teachers: {role!r} is not a teacher name (letters, digits, '_' or '-')")
        teachers[role] = _teacher_spec(_model_spec(spec, f"teachers.{role}"), f"teachers.{role}")
    student = _model_spec(raw["student"], "student")
    methods = expand_methods(raw["methods"])
    missing = sorted({r for m in methods for r in m.teacher_roles(tuple(teachers))} - set(teachers))
    if missing:
        raise UserError(f"teachers: methods use {missing} but the config defines only {sorted(teachers)}")
    engine, server = _server(raw.get("server") or {}, teachers)
    config = ExperimentConfig(
        name=str(raw["name"]),
        description=str(raw.get("description", "")),
        tasks={str(k): dict(v) for k, v in tasks.items()},
        seeds=tuple(int(s) for s in raw["seeds"]),
        teachers=teachers,
        student=ModelSpec(student["model"], student.get("num_layers")),
        distill=dict(raw.get("distill") or {}),
        server=server,
        engine=engine,
        methods=methods,
        tables=tuple(_table(t) for t in raw.get("tables") or ()),
        plots=tuple(_plot(p) for p in raw.get("plots") or ()),
        profile=profile,
    )
    for table in config.tables:
        for name in (*table.methods, *table.baselines):
            config.method(name)
    return config


def _teacher_spec(raw: dict[str, Any], where: str) -> TeacherSpec:
    """A fine-tuned teacher (the rest of ``raw`` is its recipe) or, with a ``prompt``, a prompted one."""
    spec = dict(raw)
    model, num_layers = spec.pop("model"), spec.pop("num_layers", None)
    if "prompt" not in spec:
        return TeacherSpec(model, num_layers, finetune=spec)
    prompted = {key: spec.pop(key) for key in PROMPT_KEYS if key in spec}
    LabelPrompt.from_mapping(prompted, where)
    max_len = int(spec.pop("max_seq_length", TeacherSpec.max_seq_length))
    if spec:
        raise UserError(f"{where}: a prompted teacher is not fine-tuned; unknown keys {sorted(spec)}")
    return TeacherSpec(model, num_layers, prompted=prompted, max_seq_length=max_len)


def _server(raw: Any, teachers: dict[str, TeacherSpec]) -> tuple[str, dict[str, Any]]:
    """The engine that serves the teachers and its settings (see the module docstring)."""
    if not isinstance(raw, dict):
        raise UserError(f"server: a mapping of settings, got {raw!r}")
    settings = dict(raw)
    engine = settings.pop("engine", ENGINES[0])
    if engine not in ENGINES:
        raise UserError(f"server.engine: {engine!r} is not one of {', '.join(ENGINES)}")
    if engine == "vllm":
        unknown = sorted(set(raw) - VLLM_KEYS)
        if unknown:
            raise UserError(f"server: engine vllm takes {sorted(VLLM_KEYS - {'engine'})}, not {unknown}")
        options = settings.get("options", [])
        if not isinstance(options, list) or not all(isinstance(option, str) for option in options):
            raise UserError(f"server.options: a list of vLLM's flags as strings, got {options!r}")
        fine_tuned = sorted(role for role, spec in teachers.items() if spec.prompted is None)
        if fine_tuned:
            raise UserError(
                f"server: engine vllm serves prompted teachers (a causal LM, a prompt, label words); "
                f"{fine_tuned} are fine-tuned: serve them with teacher-server"
            )
    return engine, settings


def _table(raw: dict[str, Any]) -> TableSpec:
    return TableSpec(
        title=str(raw["title"]),
        methods=tuple(raw["methods"]),
        baselines=tuple(raw.get("baselines") or ()),
        tasks=tuple(raw["tasks"]) if raw.get("tasks") else None,
    )


def _plot(raw: dict[str, Any]) -> PlotSpec:
    if raw.get("kind") not in PLOT_KINDS:
        raise UserError(f"plots: kind {raw.get('kind')!r} is not one of {', '.join(PLOT_KINDS)}")
    return PlotSpec(
        kind=raw["kind"],
        title=str(raw.get("title", raw["kind"])),
        task=raw.get("task"),
        methods=tuple(raw.get("methods") or ()),
        baseline=raw.get("baseline"),
    )


def load_experiment(
    path: str | Path, *, profile: str | None = None, data: Sequence[str] = ()
) -> ExperimentConfig:
    path = Path(path)
    raw = read_yaml_mapping(path, "of experiment keys (name, tasks, seeds, methods, ...)")
    try:
        return parse_config(raw, profile=profile, data=data)
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"{path}: {err}") from None
