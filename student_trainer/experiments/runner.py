"""Run an experiment grid: teachers once per task, one long-lived service per task, then every
(method, seed) as an ordinary ``student-trainer distill`` process.

The service is ``teacher-server`` with every teacher of the task, or (``server: {engine: vllm}``)
one vLLM OpenAI-compatible server per prompted teacher, whose runs ask it the teacher's prompt and
share an answer store in the task's work folder (the counterpart of the service's cache).

Resumable from what is on disk: a run whose ``results.json`` is under the results folder is
skipped; an interrupted one resumes from its newest checkpoint (``--resume_from_checkpoint
auto``) in the work folder. Results are small files meant to be committed; checkpoints, models
and fine-tuned teachers stay in the (ignored) work folder.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from shared.errors import UserError
from shared.teacher_api import TextQuery
from student_trainer.experiments import signals
from student_trainer.experiments.config import ExperimentConfig, Method, TeacherSpec
from student_trainer.experiments.layout import Layout, locked, portable, run_id
from student_trainer.experiments.models import resolve_model
from student_trainer.experiments.tasks import task_record
from student_trainer.train.checksums import file_sha256

# What every subprocess gets beyond the commands' own OpenMP default (shared/openmp.py): no
# tokenizer thread pool of its own beside torch's threads.
SUBPROCESS_ENV = {"TOKENIZERS_PARALLELISM": "false"}
# A teacher's fine-tuning checkpoints this often, so a stopped one (killed, or its machine gone) loses at
# most these steps: ~6 min of MPNet-base on 2 CPU cores, a 1.3 GB checkpoint (2 kept) each time.
TEACHER_SAVE_STEPS = 25
# What trains a teacher: part of its cache key, since another loop (data order, optimizer) makes other
# weights from the same recipe.
FINETUNE_LOOP = "transformers.Trainer"
# Kept from metrics.jsonl per step: enough for the curves, small enough to commit.
TRACE_FIELDS = ("step", "loss", "ce", "kd", "pt", "w_kl", "selected_instances", "teacher_flops_requested")


def cli_flags(args: Mapping[str, Any]) -> list[str]:
    """``{"no_kd": True, "selection_ratio": 0.5}`` -> ``["--no_kd", "--selection_ratio", "0.5"]``."""
    flags: list[str] = []
    for key, value in args.items():
        if value is None or value is False:
            continue
        if value is True:
            flags.append(f"--{key}")
        elif isinstance(value, list | tuple):
            for item in value:
                flags += [f"--{key}", str(item)]
        else:
            flags += [f"--{key}", str(value)]
    return flags


def _trainer(command: str, flags: list[str], log_path: Path) -> float:
    """Run ``student-trainer COMMAND FLAGS`` to the end, output in ``log_path``; its wall seconds."""
    started = time.perf_counter()
    with open(log_path, "a", encoding="utf-8") as log:
        argv = [sys.executable, "-m", "student_trainer.cli", command, *flags]
        code = signals.call(argv, stdout=log, env={**os.environ, **SUBPROCESS_ENV})
    if code != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:]
        raise UserError(f"{command} failed (exit {code}): {' '.join(tail)}; log: {log_path}")
    return time.perf_counter() - started


def teacher_key(task: str, data: Mapping[str, Any], spec: TeacherSpec, max_seq_length: int) -> str:
    """A fingerprint of everything that shapes a fine-tuned teacher, so the cache is never stale."""
    fields = {"task": task, "data": dict(data), "spec": [spec.model, spec.num_layers, spec.finetune]}
    fields["max_seq_length"] = max_seq_length
    fields["loop"] = FINETUNE_LOOP
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:12]


def ensure_teacher(config: ExperimentConfig, layout: Layout, task: str, role: str) -> dict[str, Any]:
    """Fine-tune (or reuse) one task's teacher; its record (scores, size, time) goes to results."""
    spec = config.teachers[role]
    data = config.tasks[task]
    if spec.prompted is not None:
        return prompted_teacher(config, layout, task, role)
    max_len = int(spec.finetune.get("max_seq_length", config.distill.get("max_seq_length", 128)))
    out = layout.teacher_dir(task, spec.model, teacher_key(task, data, spec, max_len))
    with locked(out.with_name(out.name + ".lock")):  # a shard beside us may be making it
        return _ensure_teacher(config, layout, task, role, out, max_len)


def _ensure_teacher(
    config: ExperimentConfig, layout: Layout, task: str, role: str, out: Path, max_len: int
) -> dict[str, Any]:
    from student_trainer.train.checkpoint import list_checkpoints  # transformers' Trainer: heavy

    spec = config.teachers[role]
    data = config.tasks[task]
    record_path = layout.teacher_record(task, role)
    if (out / "eval_results.json").exists() and record_path.exists():
        record = json.loads(record_path.read_text())
        if record.get("folder") == out.name:
            return record
    if not (out / "eval_results.json").exists():
        partial = out.with_name(out.name + ".partial")  # where a stopped fine-tuning left its state
        partial.mkdir(parents=True, exist_ok=True)
        doing = "resuming" if list_checkpoints(partial) else "fine-tuning"
        print(f"[experiment] {doing} the {role} teacher for {task} ({spec.model}) ...", flush=True)
        flags = {
            "model_name_or_path": resolve_model(spec.model),
            "num_layers": spec.num_layers,
            "task": task,
            "data_dir": data["data_dir"],
            "max_seq_length": max_len,
            "output_dir": str(partial),
            "disable_tqdm": True,
            "logging_steps": 10**6,
            "save_strategy": "steps",
            "save_steps": TEACHER_SAVE_STEPS,
            "resume_from_checkpoint": "auto",
            **{k: v for k, v in spec.finetune.items() if k != "max_seq_length"},
        }
        wall = _trainer("finetune", cli_flags(flags), partial / "finetune.log")
        (partial / "wall_time_s.txt").write_text(f"{wall:.1f}\n")
        partial.rename(out)
    record = _teacher_record(out, task, role, spec)
    earlier = json.loads(record_path.read_text()) if record_path.exists() else {}
    if earlier.get("weights_sha256") not in (None, record["weights_sha256"]):
        # a fresh machine re-made the teacher with other weights: runs before and after differ
        now, before = record["weights_sha256"][:12], earlier["weights_sha256"][:12]
        print(f"[experiment] WARNING: the {role} teacher for {task} (sha256 {now}) is not the one the "
              f"committed runs used ({before})")  # fmt: skip
        record["earlier_weights_sha256"] = earlier["weights_sha256"]
    layout.write_json(record_path, record)
    return record


def _teacher_record(out: Path, task: str, role: str, spec: TeacherSpec) -> dict[str, Any]:
    from transformers import AutoConfig  # heavy: only when a teacher is recorded

    from shared.flops import flops_per_token

    model_config = AutoConfig.from_pretrained(out)
    weights = out / "model.safetensors"
    return {
        "task": task,
        "role": role,
        "model": spec.model,
        "num_layers": int(model_config.num_hidden_layers),
        "hidden_size": int(model_config.hidden_size),
        "model_type": model_config.model_type,
        "flops_per_token_at_128": flops_per_token(model_config, 128),
        "finetune": spec.finetune,
        "eval": json.loads((out / "eval_results.json").read_text()),
        "wall_time_s": float((out / "wall_time_s.txt").read_text()),
        "weights_sha256": file_sha256(weights) if weights.exists() else None,
        "folder": out.name,  # under --teachers_dir: no path of the machine that made it
    }


def prompted_teacher(config: ExperimentConfig, layout: Layout, task: str, role: str) -> dict[str, Any]:
    """A prompted teacher is not trained: its record holds its zero-shot score on the task's
    evaluation set (every row through the in-process engine, once; reused while the spec holds)."""
    spec = config.teachers[role]
    record_path = layout.teacher_record(task, role)
    earlier = json.loads(record_path.read_text()) if record_path.exists() else {}
    mine = {"model": spec.model, "num_layers": spec.num_layers, "prompted": spec.prompted,
            "max_seq_length": spec.max_seq_length}  # fmt: skip
    if {key: earlier.get(key) for key in mine} == mine:
        return earlier
    print(f"[experiment] scoring the prompted {role} teacher on {task} ({spec.model}) ...", flush=True)
    started = time.perf_counter()
    scores = asyncio.run(_zero_shot_scores(config, task, spec))
    record = {
        "task": task,
        "role": role,
        **mine,
        "eval": scores,
        "wall_time_s": time.perf_counter() - started,
    }
    layout.write_json(record_path, record)
    return record


async def _zero_shot_scores(config: ExperimentConfig, task: str, spec: TeacherSpec) -> dict[str, float]:
    from student_trainer.data.loading import load_train_and_eval
    from student_trainer.teachers.local import LocalTeacherClient
    from student_trainer.train.metrics import compute_metrics

    options = {**config.distill, **config.tasks[task]}
    _, dev = load_train_and_eval(
        task=task, data_dir=options["data_dir"], max_eval_samples=options.get("max_eval_samples")
    )
    assert dev is not None  # a registered task always has its evaluation split
    client = LocalTeacherClient(
        resolve_model(spec.model), name="teacher", max_seq_length=spec.max_seq_length, **spec.prompted
    )
    await client.start()
    predictions: list[int] = []
    for start in range(0, len(dev.examples), 32):
        rows = dev.examples[start : start + 32]
        pairs = [e.text_b or "" for e in rows] if dev.is_pair else None
        answer = await client.infer(TextQuery([e.text_a for e in rows], pairs))
        predictions += answer.logits.argmax(dim=-1).tolist()
    scores = compute_metrics(dev.metric, predictions, [e.label for e in dev.examples])
    return {f"eval_{name}": float(value) for name, value in scores.items()}


def _served_teacher(layout: Layout, record: Mapping[str, Any], config: ExperimentConfig) -> dict[str, Any]:
    """The service's entry for a teacher record: a fine-tuned folder, or the prompted LM as it is.
    Paths are absolute: the service reads a relative path against the YAML's own folder."""
    if "prompted" in record:
        path = Path(resolve_model(record["model"])).resolve()
        return {"path": str(path), "max_seq_length": record["max_seq_length"], **record["prompted"]}
    max_len = int(config.distill.get("max_seq_length", 128))
    return {"path": str((layout.teachers / record["folder"]).resolve()), "max_seq_length": max_len}


@dataclass(frozen=True)
class ServedTeachers:
    """How the runs of a task reach its teachers, made once their servers are up: each role's
    ``--teacher`` spec, the prompt file of each teacher the trainer asks a prompt itself
    (``openai+``), and the answer store they share."""

    specs: Mapping[str, str] = field(default_factory=dict)
    prompts: Mapping[str, Path] = field(default_factory=dict)
    store: Path | None = None

    def flags(self, roles: tuple[str, ...]) -> dict[str, Any]:
        """``distill``'s flags for the teachers ``roles``."""
        return {
            "teacher": [f"{role}={self.specs[role]}" for role in roles],
            "teacher_prompt": [f"{role}={self.prompts[role]}" for role in roles if role in self.prompts],
        }

    def store_flag(self, roles: tuple[str, ...]) -> dict[str, Any]:
        """The shared answer store, for a run that asks a teacher (a default: the config's own wins)."""
        return {"teacher_store": str(self.store)} if self.store and roles else {}


@contextmanager
def task_service(
    config: ExperimentConfig,
    layout: Layout,
    task: str,
    teachers: Mapping[str, dict[str, Any]],
    vllm_python: str | None = None,
) -> Iterator[ServedTeachers]:
    """The teachers' server(s) for all runs of a task: teacher-server (its cache answers what earlier
    runs asked), or vLLM's (``vllm_python``: the python of its environment, as
    :func:`~student_trainer.teachers.vllm_server.vllm_python` checked it)."""
    if not teachers:
        yield ServedTeachers()
        return
    work = layout.task_work_dir(task)
    work.mkdir(parents=True, exist_ok=True)
    if config.engine == "vllm":
        if vllm_python is None:  # run_grid's caller (student-trainer experiment) checks the one given
            raise UserError(f"{config.name} is served by vLLM: run it with student-trainer experiment")
        with vllm_service(config, work, teachers, vllm_python) as served:
            yield served
        return
    from teacher_server.launch import serve_in_subprocess

    entries = [
        {"name": role, **_served_teacher(layout, record, config), **config.server}
        for role, record in teachers.items()
    ]
    config_path, log = work / "teachers.yaml", work / "server.log"
    config_path.write_text(yaml.safe_dump({"teachers": entries}))
    with serve_in_subprocess(config_path, log_path=log, env=SUBPROCESS_ENV, tie_to_parent=True) as url:
        try:
            yield ServedTeachers({role: f"{url}#{role}" for role in teachers})
        finally:  # a grid stopped by a signal keeps what its service computed, for the report's sums
            _record_service(layout, task, url)


def _record_service(layout: Layout, task: str, url: str) -> None:
    """Append the service's counters to the task's record; a service already gone has none to give."""
    import httpx

    try:
        counters = _service_counters(url)
    except httpx.HTTPError:
        return
    layout.append_service_record(task, counters)


@contextmanager
def vllm_service(
    config: ExperimentConfig, work: Path, teachers: Mapping[str, dict[str, Any]], python: str
) -> Iterator[ServedTeachers]:
    """One vLLM OpenAI-compatible server per prompted teacher (its checkpoint, served under its role),
    stopped when the block ends, however it ends. ``python``: vLLM's, checked by the caller."""
    from student_trainer.teachers.vllm_server import VllmServer

    specs: dict[str, str] = {}
    prompts = {role: work / f"prompt-{role}.yaml" for role in teachers}
    with ExitStack() as servers:
        for role, record in teachers.items():
            prompts[role].write_text(yaml.safe_dump(record["prompted"]))
            model = str(Path(resolve_model(record["model"])).resolve())
            max_len = int(config.server.get("max_model_len", record["max_seq_length"]))
            options = tuple(config.server.get("options", ()))
            server = VllmServer(python, model, role, max_model_len=max_len, options=options)
            print(f"[experiment] starting vLLM for the {role} teacher ({record['model']}) ...", flush=True)
            url = servers.enter_context(server.serve(work / f"vllm-{role}.log"))
            specs[role] = f"openai+{url}/v1#{role}"
        yield ServedTeachers(specs, prompts, store=work / "teacher_answers.sqlite")


def _service_counters(url: str) -> dict[str, Any]:
    """Rows computed, cache hits and FLOPs per teacher, read from the service's own /metrics."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {
        "teacher_batch_size_sum": "rows_computed",
        "teacher_cache_hits_total": "cache_hits",
        "teacher_cache_misses_total": "cache_misses",
        "teacher_flops_total": "flops_computed",
        "teacher_tokens_total": "tokens_computed",
    }
    text = httpx.get(f"{url}/metrics", timeout=10.0, trust_env=False).text
    counters: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted and "model" in sample.labels:
                counters.setdefault(sample.labels["model"], {})[wanted[sample.name]] = sample.value
    return {"finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "teachers": counters}


def distill_flags(
    config: ExperimentConfig, task: str, method: Method, seed: int, served: ServedTeachers, output_dir: Path
) -> list[str]:
    """The ``distill`` command line of one run: the service's answer store < shared flags < the
    task's < the method's; the teachers' own flags are the service's."""
    roles = method.teacher_roles(tuple(config.teachers)) if served.specs else ()
    args: dict[str, Any] = {
        "model_name_or_path": resolve_model(config.student.model),
        "student_num_layers": config.student.num_layers,
        "task": task,
        **served.store_flag(roles),
        **config.distill,
        **config.task_flags(task),
        **method.args,
        "seed": seed,
        "output_dir": str(output_dir),
        "resume_from_checkpoint": "auto",
        "disable_tqdm": True,
    }
    if served.specs:
        args.update(served.flags(roles))
    return cli_flags(args)


def extract_trace(metrics_path: Path) -> dict[str, list[float]]:
    """Per-step columns of ``metrics.jsonl`` (train events only), for the report's curves."""
    columns: dict[str, list[float]] = {name: [] for name in TRACE_FIELDS}
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line of an interrupted run
        if record.get("event") != "train":
            continue
        for name in TRACE_FIELDS:
            columns[name].append(record.get(name))
    return {name: values for name, values in columns.items() if any(v is not None for v in values)}


def write_task_records(config: ExperimentConfig, layout: Layout) -> None:
    """Each task's sizes and majority baseline, as the runs see the data (the report reads them)."""
    for task, data in config.tasks.items():
        layout.write_json(layout.task_record(task), task_record(task, data, config.distill))


def run_grid(
    config: ExperimentConfig,
    layout: Layout,
    *,
    keep_models: bool = False,
    shard: tuple[int, int] = (0, 1),
    vllm_python: str | None = None,
) -> None:
    """Every pending run of the grid (of shard ``i`` of ``n``: every n-th run from the i-th, so
    n processes side by side split it evenly), task by task; progress and ETA after each run.
    SIGINT/SIGTERM stop it after the run in flight has saved its state (:mod:`.signals`), and the
    servers with it. ``vllm_python``: vLLM's python for ``engine: vllm``, checked before anything is
    written (:func:`~student_trainer.teachers.vllm_server.vllm_python`)."""
    with signals.forwarding_signals():
        _run_grid(config, layout, keep_models=keep_models, shard=shard, vllm_python=vllm_python)


def _run_grid(
    config: ExperimentConfig,
    layout: Layout,
    *,
    keep_models: bool,
    shard: tuple[int, int],
    vllm_python: str | None,
) -> None:
    index, count = shard
    runs = config.runs()[index::count]
    pending = [r for r in runs if not layout.is_done(*r)]
    part = f" shard {index}/{count}" if count > 1 else ""
    print(f"[experiment] {config.name}{part}: {len(runs)} runs, {len(runs) - len(pending)} done, "
          f"{len(pending)} to go", flush=True)  # fmt: skip
    walls: list[float] = []
    for task in config.tasks:
        todo = [r for r in pending if r[0] == task]
        if not todo:
            continue
        roles = sorted(
            {role for _, method, _ in todo for role in method.teacher_roles(tuple(config.teachers))}
        )
        teachers = {role: ensure_teacher(config, layout, task, role) for role in roles}
        with task_service(config, layout, task, teachers, vllm_python) as served:
            for _, method, seed in todo:
                done = len(runs) - len(pending) + len(walls)
                print(
                    f"[experiment] run {done + 1}/{len(runs)}: {run_id(task, method.name, seed)} ...",
                    flush=True,
                )
                walls.append(run_one(config, layout, task, method, seed, served, keep_models=keep_models))
                left = len(pending) - len(walls)
                eta = left * sum(walls) / len(walls)
                print(
                    f"[experiment] finished in {walls[-1]:.0f} s; {left} left, ETA {eta / 60:.0f} min",
                    flush=True,
                )


def run_one(
    config: ExperimentConfig,
    layout: Layout,
    task: str,
    method: Method,
    seed: int,
    served: ServedTeachers,
    *,
    keep_models: bool = False,
) -> float:
    """One ``distill`` run; its small results are copied into the results folder."""
    work = layout.run_work_dir(task, method.name, seed)
    work.mkdir(parents=True, exist_ok=True)
    flags = distill_flags(config, task, method, seed, served, work)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    wall = _trainer("distill", flags, work / "run.log")
    results = json.loads((work / "results.json").read_text())
    names = {  # the work folder and the student's resolved alias, as the config names them
        str(layout.work): "{work}",
        str(layout.work.resolve()): "{work}",
        resolve_model(config.student.model): config.student.model,
    }
    layout.save_run(
        task,
        method.name,
        seed,
        results=portable(results, names),
        trace=extract_trace(work / "metrics.jsonl"),
        run=portable(
            {"wall_time_s": wall, "started_utc": started, "command": ["student-trainer", "distill", *flags]},
            names,
        ),
    )
    if not keep_models:  # the results are what the grid is for; weights are 60+ MB a run
        for path in work.glob("checkpoint-*"):
            shutil.rmtree(path, ignore_errors=True)
        for path in work.glob("*.safetensors"):
            path.unlink()
    return wall
