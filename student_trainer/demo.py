"""The end-to-end demo: ``experiments/demo.yaml`` through the experiment runner, then its report.

The runner does the work (:mod:`student_trainer.experiments.runner`): it fine-tunes the teachers
once (cached under ``--work_dir``'s ``teachers/``, so a second run skips them), serves them with
``teacher-server`` in a process of its own, and distils the student over HTTP. This module reads
what the runner wrote (the teacher records, the runs as the report reads them, the service's
counters) and prints it on one screen: the scores, and the teacher FLOPs each part saved.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from shared.errors import UserError
from student_trainer.experiments.config import ExperimentConfig, load_experiment
from student_trainer.experiments.layout import Layout, run_id
from student_trainer.experiments.report import FinishedRun, read_runs
from student_trainer.experiments.runner import run_grid
from student_trainer.experiments.tasks import generate_data


def run_demo(config_path: str | Path, *, data: Sequence[str] = (), work_dir: str | Path) -> dict[str, Any]:
    """Run the config's grid in a fresh folder under ``work_dir/runs`` (teachers shared across
    runs), print the report and return it."""
    started, started_at = time.perf_counter(), time.time()
    config = load_experiment(config_path, data=data)
    work = Path(work_dir).expanduser()
    layout = run_layout(config, work)
    print(f"[demo] {config_path} through the experiment runner, in {layout.results.parent}", flush=True)
    generate_data(config.tasks)
    run_grid(config, layout, keep_models=True)  # the distilled student is what a demo run makes
    report = collect_report(config, layout, started_at)
    report["wall_time_s"] = time.perf_counter() - started
    print(format_report(report))
    return report


def run_layout(config: ExperimentConfig, work: Path) -> Layout:
    """The newest run folder under ``work/runs`` while its grid is unfinished (a stopped demo resumes,
    as the runner says), else a new one named by the time; the teachers are shared by all."""

    def layout(folder: Path) -> Layout:
        return Layout(results=folder / "results", work=folder / "work", teachers=work / "teachers")

    (work / "runs").mkdir(parents=True, exist_ok=True)
    folders = sorted(path for path in (work / "runs").iterdir() if path.is_dir())  # names start with the time
    if folders and not all(layout(folders[-1]).is_done(*run) for run in config.runs()):
        return layout(folders[-1])
    folder = work / "runs" / datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    folder.mkdir()
    return layout(folder)


def collect_report(config: ExperimentConfig, layout: Layout, started_at: float) -> dict[str, Any]:
    """Per task: its teachers (fine-tuned since ``started_at`` or reused), each run's scores and
    FLOPs ledger, and the rows the service computed; a run not finished is a :class:`UserError`."""
    finished = read_runs(config, layout)
    done = {(run.task, run.method, run.seed) for run in finished}
    missing = [run_id(t, m.name, s) for t, m, s in config.runs() if (t, m.name, s) not in done]
    if missing:
        raise UserError(
            f"run {missing[0]} is unfinished (no results.json under {layout.results}): run the demo "
            "again to resume it"
        )
    tasks = {}
    for task in config.tasks:
        records = [layout.teacher_record(task, role) for role in config.teachers]
        teachers = [json.loads(path.read_text()) for path in records if path.exists()]
        runs = [_run(run) for run in finished if run.task == task]
        rows: dict[str, float] = {}
        for record in layout.service_records(task):
            for role, counters in record["teachers"].items():
                rows[role] = rows.get(role, 0) + counters.get("rows_computed", 0)
        tasks[task] = {
            "teachers": {
                t["role"]: {**t, "fine_tuned_now": _made_since(layout, t, started_at)} for t in teachers
            },
            "runs": runs,
            "served_rows": rows,
        }
    return {"name": config.name, "tasks": tasks, "results_dir": str(layout.results)}


def _run(run: FinishedRun) -> dict[str, Any]:
    results = run.results
    return {
        "method": run.method,
        "seed": run.seed,
        "layers": results["student_layers"],
        "eval": results["eval"],
        "flops": results["flops"],
        "wall_time_s": run.wall_time_s,
    }


def _made_since(layout: Layout, record: dict[str, Any], started_at: float) -> bool:
    """Whether the teacher's folder was made after ``started_at`` (False: reused from the cache)."""
    made = layout.teachers / record.get("folder", "") / "wall_time_s.txt"
    return made.exists() and made.stat().st_mtime >= started_at


def _score(evaluation: dict[str, Any] | None) -> str:
    """The task metrics of an evaluation dict (``accuracy``, ``f1``, ``mcc``), prefix-agnostic."""
    scores = {k.removeprefix("eval_"): v for k, v in (evaluation or {}).items()}
    return (
        ", ".join(f"{name} {scores[name]:.3f}" for name in ("accuracy", "f1", "mcc") if name in scores)
        or "n/a"
    )


def percent(fraction: float | None) -> str:
    return f"{100 * (fraction or 0):7.1f} %"


def format_run(run: dict[str, Any]) -> list[str]:
    """A student's score and where the teacher FLOPs went (docs/flops.md names the three savings)."""
    flops = run["flops"]
    return [
        f"{'student':<14} ({run['layers']} layers): {_score(run['eval'])}"
        f"  ({run['method']}, seed {run['seed']})",
        f"saved by dynamic KD's choices {percent(flops['teacher_flops_saved_by_method'])}"
        "  (rows sent vs every row, both unpadded)",
        f"saved by the service          {percent(flops['teacher_flops_saved_by_service'])}"
        f"  (on the rows sent; its cache answered {flops['teacher_cache_hits']:,})",
        f"teacher FLOPs spent           {flops['teacher_flops_spent'] / 1e9:9,.1f} GFLOPs",
        f"vanilla KD, padded            {flops['teacher_flops_vanilla'] / 1e9:9,.1f} GFLOPs"
        f"  ({100 * (flops['teacher_flops_saved_fraction'] or 0):.1f} % saved in all)",
    ]


def format_report(report: dict[str, Any]) -> str:
    lines = [""]
    for task, info in report["tasks"].items():
        teachers = info["teachers"]
        lines += ["=" * 72, f"Dynamic KD demo on {task!r}", "-" * 72]
        lines += [
            f"{role + ' teacher':<14} ({t['num_layers']} layers): {_score(t['eval'])}"
            for role, t in teachers.items()
        ]
        for run in info["runs"]:
            lines += ["-" * 72, *format_run(run)]
        made = (
            "fine-tuned now" if any(t["fine_tuned_now"] for t in teachers.values()) else "reused from cache"
        )
        rows = ", ".join(f"{k} {int(v)}" for k, v in sorted(info["served_rows"].items()))
        lines += [
            "-" * 72,
            f"rows computed by the service: {rows}",
            f"wall time: teachers {sum(t['wall_time_s'] for t in teachers.values()):.0f} s ({made}), "
            f"distill + eval {sum(r['wall_time_s'] for r in info['runs']):.0f} s, "
            f"total {report['wall_time_s']:.0f} s",
            "=" * 72,
        ]
    return "\n".join(lines)
