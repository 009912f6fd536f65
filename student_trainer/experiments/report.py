"""The report of an experiment grid: tables of mean ± std over seeds with a paired test, plots.

Significance follows the paper's asterisk: a method's cell is marked ``*`` when its mean beats the
best baseline of its table (highest mean among the table's ``baselines``) and a two-sided paired
t-test over the seeds both have (``scipy.stats.ttest_rel``) gives p < 0.05. With 3 seeds that
needs a consistent gain; ``p`` is stored in ``report.json`` for every comparison.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.provenance import made_with
from student_trainer.experiments.config import ExperimentConfig, TableSpec
from student_trainer.experiments.layout import Layout, write_json
from student_trainer.train.metrics import above_majority_baseline

SIGNIFICANCE = 0.05


@dataclass
class Cell:
    """One (task, method) over its seeds."""

    scores: dict[int, float] = field(default_factory=dict)  # seed -> the task's metric
    flops_per_instance: list[float] = field(default_factory=list)
    wall_time_s: list[float] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.scores)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.scores.values())

    @property
    def std(self) -> float:
        return statistics.stdev(self.scores.values()) if self.n > 1 else 0.0


def paired_p_value(a: dict[int, float], b: dict[int, float]) -> float | None:
    """Two-sided paired t-test over the seeds both cells have; None below 2 pairs or no spread."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    from scipy.stats import ttest_rel

    p = float(ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).pvalue)
    return None if math.isnan(p) else p


@dataclass(frozen=True)
class FinishedRun:
    """A run of the grid that the runner finished: its ``results.json`` and ``run.json``."""

    task: str
    method: str
    seed: int
    results: dict[str, Any]
    meta: dict[str, Any]

    @property
    def wall_time_s(self) -> float:
        """The runner's wall time of the ``distill`` process (the trainer's own for a run without it)."""
        return float(self.meta.get("wall_time_s", self.results["train_runtime_s"]))


def read_runs(config: ExperimentConfig, layout: Layout) -> list[FinishedRun]:
    """Every finished run of the grid (its ``results.json`` written last marks it), each read once:
    what every part of the report (and the demo) reads."""
    runs = []
    for task, method, seed in config.runs():
        folder = layout.run_results(task, method.name, seed)
        results = _read(folder / "results.json")
        if results is not None:
            runs.append(FinishedRun(task, method.name, seed, results, _read(folder / "run.json") or {}))
    return runs


def collect(config: ExperimentConfig, layout: Layout) -> dict[str, Any]:
    """The finished runs (:func:`read_runs`) and their score, teacher FLOPs per instance and wall
    time by (task, method)."""
    tasks = {t: _read(layout.task_record(t)) for t in config.tasks}
    runs = read_runs(config, layout)
    cells: dict[tuple[str, str], Cell] = defaultdict(Cell)
    for run in runs:
        results, info = run.results, tasks[run.task]
        metric = info["metric"] if info else "accuracy"
        cell = cells[(run.task, run.method)]
        cell.scores[run.seed] = float(results["eval"][f"eval_{metric}"])
        instances = results["epoch"] * info["train_size"] if info else float("nan")
        cell.flops_per_instance.append(results["flops"]["teacher_flops_requested"] / instances)
        cell.wall_time_s.append(run.wall_time_s)
    return {"tasks": tasks, "cells": cells, "runs": runs}


def _read(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def table_rows(
    table: TableSpec, tasks: list[str], cells: dict[tuple[str, str], Cell]
) -> list[dict[str, Any]]:
    """Each method's cells per task, with the comparison against the best baseline."""
    rows = []
    for method in table.methods:
        row: dict[str, Any] = {"method": method, "baseline": method in table.baselines, "tasks": {}}
        for task in tasks:
            cell = cells.get((task, method))
            if cell is None or cell.n == 0:
                continue
            entry = {
                "mean": cell.mean,
                "std": cell.std,
                "n": cell.n,
                "scores": cell.scores,
                "teacher_gflops_per_instance": statistics.fmean(cell.flops_per_instance) / 1e9,
                "mean_wall_time_s": statistics.fmean(cell.wall_time_s),
            }
            best = _best_baseline(table, task, cells)
            if best is not None and method not in table.baselines:
                p = paired_p_value(cell.scores, cells[(task, best)].scores)
                entry.update(
                    vs=best,
                    p_value=p,
                    significant=bool(
                        p is not None and p < SIGNIFICANCE and cell.mean > cells[(task, best)].mean
                    ),
                )
            row["tasks"][task] = entry
        rows.append(row)
    return rows


def _best_baseline(table: TableSpec, task: str, cells: dict[tuple[str, str], Cell]) -> str | None:
    present = [b for b in table.baselines if (task, b) in cells and cells[(task, b)].n > 0]
    return max(present, key=lambda b: cells[(task, b)].mean, default=None)


def format_table(
    table: TableSpec, tasks: list[str], rows: list[dict[str, Any]], task_info: dict[str, Any], teachers: dict
) -> str:
    """A markdown table: one score column and one teacher-FLOPs column per task."""
    header = ["method"]
    for task in tasks:
        metric = (task_info.get(task) or {}).get("metric", "accuracy")
        header += [f"{task} {metric}", f"{task} teacher GFLOPs/inst."]
    lines = [f"### {table.title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["method"] + (" (baseline)" if row["baseline"] else "")]
        for task in tasks:
            entry = row["tasks"].get(task)
            if entry is None:
                cells += ["—", "—"]
                continue
            mark = "*" if entry.get("significant") else ""
            cells.append(f"{entry['mean']:.4f} ± {entry['std']:.4f}{mark} (n={entry['n']})")
            cells.append(f"{entry['teacher_gflops_per_instance']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    for label, key in (("majority baseline", None), *((f"teacher `{r}`", r) for r in sorted(teachers))):
        cells = [label]
        for task in tasks:
            info = task_info.get(task) or {}
            metric = info.get("metric", "accuracy")
            if key is None:
                value = (info.get("majority_baseline") or {}).get(f"eval_{metric}")
            else:
                value = ((teachers[key].get(task) or {}).get("eval") or {}).get(f"eval_{metric}")
            cells += [f"{value:.4f}" if value is not None else "—", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def below_majority(rows: list[dict[str, Any]], task_info: dict[str, Any]) -> list[str]:
    """Cells whose mean does not beat the majority-class baseline on the task's metric, by the rule
    of ``above_majority_baseline`` in ``results.json`` (the report says so plainly)."""
    found = []
    for row in rows:
        for task, entry in row["tasks"].items():
            info = task_info.get(task) or {}
            baseline = {**(info.get("majority_baseline") or {}), "metric": info.get("metric", "accuracy")}
            key = f"eval_{baseline['metric']}"
            if key in baseline and not above_majority_baseline({key: entry["mean"]}, baseline):
                found.append(f"{task}/{row['method']} ({entry['mean']:.4f}, baseline {baseline[key]:.4f})")
    return found


def selection_series(config: ExperimentConfig, task: str, cells: dict[tuple[str, str], Cell]) -> dict:
    """``(strategy, "budget" | "ratio") -> [(teacher GFLOPs per instance, method, cell)]`` sorted by
    spend: the data-selection methods of ``task`` that ran, by how they were told what to spend."""
    series: dict[tuple[str, str], list[tuple[float, str, Cell]]] = defaultdict(list)
    for method in config.methods:
        cell = cells.get((task, method.name))
        strategy = method.args.get("data_selection", "none")
        if cell is None or cell.n == 0 or strategy == "none":
            continue
        kind = "budget" if method.args.get("teacher_budget") is not None else "ratio"
        series[(strategy, kind)].append((statistics.fmean(cell.flops_per_instance) / 1e9, method.name, cell))
    return {key: sorted(points, key=lambda p: p[0]) for key, points in series.items()}


def budget_vs_ratio(config: ExperimentConfig, cells: dict[tuple[str, str], Cell]) -> list[dict[str, Any]]:
    """Each budget-based run against the ratio-based run of its strategy whose measured teacher spend
    is closest: accuracy at (about) the same teacher FLOPs, with the paired t-test over seeds."""
    rows = []
    for task in config.tasks:
        series = selection_series(config, task, cells)
        for (strategy, kind), points in series.items():
            ratios = series.get((strategy, "ratio"), [])
            if kind != "budget" or not ratios:
                continue
            for spend, name, cell in points:
                r_spend, r_name, r_cell = min(ratios, key=lambda p: abs(p[0] - spend))
                rows.append(
                    {"task": task, "strategy": strategy, "budget": name, "ratio": r_name,
                     "budget_mean": cell.mean, "budget_std": cell.std, "ratio_mean": r_cell.mean,
                     "ratio_std": r_cell.std, "budget_gflops_per_instance": spend,
                     "ratio_gflops_per_instance": r_spend, "n": min(cell.n, r_cell.n),
                     "p_value": paired_p_value(cell.scores, r_cell.scores)}
                )  # fmt: skip
    return rows


def format_budget_vs_ratio(rows: list[dict[str, Any]]) -> str:
    """The markdown of :func:`budget_vs_ratio`."""
    lines = [
        "### Accuracy vs teacher FLOPs: budget-based against ratio-based selection at the same spend",
        "",
    ]
    lines += [
        "| task | strategy | budget run | score | GFLOPs/inst. | ratio run | score | GFLOPs/inst. | p |"
    ]
    lines += ["|" + "---|" * 9]
    for r in rows:
        p = "—" if r["p_value"] is None else f"{r['p_value']:.3f}"
        lines.append(
            f"| {r['task']} | {r['strategy']} | {r['budget']} | "
            f"{r['budget_mean']:.4f} ± {r['budget_std']:.4f} "
            f"| {r['budget_gflops_per_instance']:.3f} | {r['ratio']} | {r['ratio_mean']:.4f} ± "
            f"{r['ratio_std']:.4f} | {r['ratio_gflops_per_instance']:.3f} | {p} |"
        )
    return "\n".join(lines)


def _run_flops(runs: list[FinishedRun], task: str) -> Iterator[dict[str, Any]]:
    """The ``flops`` ledger of each finished run of ``task``."""
    return (run.results["flops"] for run in runs if run.task == task)


def service_savings(config: ExperimentConfig, layout: Layout, runs: list[FinishedRun]) -> dict[str, Any]:
    """Teacher FLOPs the runs requested vs what the service computed: the cache's share."""
    out = {}
    for task in config.tasks:
        history = layout.service_records(task)
        computed = sum(t.get("flops_computed", 0) for s in history for t in s["teachers"].values())
        requested = sum(flops["teacher_flops_requested"] for flops in _run_flops(runs, task))
        if history:
            out[task] = {
                "requested_tflops": requested / 1e12,
                "computed_tflops": computed / 1e12,
                "saved_by_cache": 1 - computed / requested if requested else None,
                "service_sessions": len(history),
            }
    return out


def store_hits(config: ExperimentConfig, runs: list[FinishedRun]) -> dict[str, dict[str, Any]]:
    """Per task, the rows the runs looked up in the answer store and how many it answered (tasks whose
    runs looked nothing up are left out)."""
    out = {}
    for task in config.tasks:
        ledgers = list(_run_flops(runs, task))
        hits = sum(int(flops.get("teacher_store_hits", 0)) for flops in ledgers)
        lookups = sum(int(flops.get("teacher_store_lookups", 0)) for flops in ledgers)
        if lookups:
            out[task] = {"hits": hits, "lookups": lookups, "hit_rate": hits / lookups}
    return out


def teacher_bill(config: ExperimentConfig, runs: list[FinishedRun]) -> dict[str, dict[str, Any]]:
    """Per task, what the runs' ledgers say the teachers were asked and charged, whatever served
    them: the rows asked (calls), the tokens their servers counted, the FLOPs they computed."""
    out = {}
    for task in config.tasks:
        total: Counter[str] = Counter()
        for flops in _run_flops(runs, task):
            total["runs"] += 1
            total["spent"] += flops.get("teacher_flops_spent", 0)
            for role in config.teachers:  # a role may hold "_": read the ledger's keys by name
                total["teacher_rows"] += int(flops.get(f"teacher_rows_{role}", 0))
                total["teacher_tokens"] += int(flops.get(f"teacher_tokens_{role}", 0))
        if total["runs"]:
            out[task] = {
                "rows": total["teacher_rows"],
                "tokens": total["teacher_tokens"],
                "spent_tflops": total["spent"] / 1e12,
            }
    return out


def versions_of_runs(runs: list[FinishedRun]) -> list[dict[str, Any]]:
    """Each distinct ``made_with`` of the finished runs and how many runs it made (None for runs
    made before ``results.json`` recorded it)."""
    counts = Counter(json.dumps(run.results.get("made_with"), sort_keys=True) for run in runs)
    return [{"made_with": json.loads(key), "runs": n} for key, n in counts.most_common()]


def describe(versions: dict[str, str | None] | None) -> str:
    """``made_with`` in words, for report.md."""
    if not versions:
        return "versions not recorded"
    packages = ", ".join(f"{k} {v}" for k, v in versions.items() if k != "commit")
    return f"{packages}, commit {versions.get('commit') or 'unknown'}"


def write_report(config: ExperimentConfig, layout: Layout) -> Path:
    """``report.md`` + ``report.json`` (+ PNG plots) in the experiment's results folder."""
    data = collect(config, layout)
    cells, task_info, runs = data["cells"], data["tasks"], data["runs"]
    teachers = {
        role: {t: _read(layout.teacher_record(t, role)) for t in config.tasks} for role in config.teachers
    }
    parts = [f"# {config.name} (profile {config.profile})", "", config.description, ""]
    tables_json = []
    for table in config.tables:
        tasks = [t for t in config.tasks if table.tasks is None or t in table.tasks]
        rows = table_rows(table, tasks, cells)
        parts += [format_table(table, tasks, rows, task_info, teachers), ""]
        weak = below_majority(rows, task_info)
        if weak:
            parts += ["Not above the majority baseline: " + "; ".join(weak), ""]
        tables_json.append({"title": table.title, "tasks": tasks, "rows": rows, "below_majority": weak})
    from student_trainer.experiments.plots import draw_plots

    comparison = budget_vs_ratio(config, cells)
    if comparison:
        parts += [format_budget_vs_ratio(comparison), ""]
    plots = draw_plots(config, cells, layout)
    parts += [f"![{title}]({path.name})" for title, path in plots] + [""]
    savings = service_savings(config, layout, runs)
    for task, s in savings.items():
        parts.append(
            f"- {task}: the runs requested {s['requested_tflops']:.2f} TFLOPs of teacher compute; "
            f"the service computed {s['computed_tflops']:.2f} TFLOPs "
            f"({100 * (s['saved_by_cache'] or 0):.1f}% answered from its cache, "
            f"over {s['service_sessions']} service session(s))."
        )
    stored = store_hits(config, runs)
    parts += [
        f"- {task}: the answer store answered {h['hits']:,} of the {h['lookups']:,} rows looked up "
        f"({100 * h['hit_rate']:.1f}%), paid for by an earlier run."
        for task, h in stored.items()
    ]
    bill = teacher_bill(config, runs)
    parts += [
        f"- {task}: the runs asked the teachers about {b['rows']:,} rows; their servers counted "
        f"{b['tokens']:,} tokens and computed {b['spent_tflops']:.2f} TFLOPs for them."
        for task, b in bill.items()
    ]
    wall = sum(sum(c.wall_time_s) for c in cells.values())
    done = sum(c.n for c in cells.values())
    parts += [f"- {done} of {len(config.runs())} runs done; their wall time: {wall / 3600:.2f} h."]
    now, versions = made_with(), versions_of_runs(runs)
    parts += [f"- This report: {describe(now)}."]
    parts += [f"- {entry['runs']} run(s): {describe(entry['made_with'])}." for entry in versions] + [""]
    path = layout.results / "report.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    write_json(
        layout.results / "report.json",
        {"tables": tables_json, "budget_vs_ratio": comparison, "tasks": task_info, "teachers": teachers,
         "service": savings, "answer_store": stored, "teacher_bill": bill,
         "runs_done": done, "runs_total": len(config.runs()), "wall_time_s": wall,
         "made_with": now, "runs_made_with": versions},
    )  # fmt: skip
    print(f"[experiment] report: {path}")
    return path
