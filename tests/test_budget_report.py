"""The budget experiment: its config parses, its dry run prices the budgets, and the report compares
budget-based with ratio-based selection at the same teacher spend."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from student_trainer.experiments.config import load_experiment
from student_trainer.experiments.report import budget_vs_ratio, collect, write_report
from tests.distill_support import REPO
from tests.test_experiment import hand_grid

CONFIG = REPO / "experiments" / "budget.yaml"


def test_the_budget_experiment_compares_ratios_with_budgets_of_the_same_spend() -> None:
    config = load_experiment(CONFIG)
    assert config.seeds == (1, 2, 3) and list(config.tasks) == ["sst2"]
    assert config.student.num_layers == 2 and config.teachers["large"].num_layers == 6
    args = {m.name: m.args for m in config.methods}
    assert args["entropy-r0.1"]["selection_ratio"] == 0.1 and args["entropy-r0.3"]["selection_ratio"] == 0.3
    assert args["random-r0.1"] == {"data_selection": "random", "selection_ratio": 0.1, "exact_budget": True}
    assert args["entropy-b10"]["teacher_budget"] == "10%" and args["entropy-b30"]["teacher_budget"] == "30%"
    assert args["random-b10"] == {"data_selection": "random", "teacher_budget": "10%"}
    assert [p.kind for p in config.plots] == ["budget_vs_ratio", "accuracy_vs_flops"]


@pytest.mark.slow
def test_the_budget_experiment_dry_run_prices_budgets_like_their_ratios(reference_data) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "student_trainer.cli", "experiment", "--config", str(CONFIG), "--dry_run"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0 and "cannot read the config" in done.stderr:
        pytest.skip(f"the MiniLM checkpoint is not installed: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    assert "1 task(s) x 7 method(s) x 3 seed(s) = 21 runs" in done.stdout
    teacher = {
        line.split()[0]: float(line.split()[2]) for line in done.stdout.splitlines() if "/seed1 " in line
    }
    assert teacher["sst2/entropy-b10/seed1"] == teacher["sst2/entropy-r0.1/seed1"]  # as printed (2 decimals)
    assert teacher["sst2/entropy-b30/seed1"] == teacher["sst2/entropy-r0.3/seed1"]
    assert teacher["sst2/random-b10/seed1"] < teacher["sst2/vanilla-kd/seed1"] / 9


def hand_made_grid(tmp_path):
    config, layout = hand_grid(
        tmp_path,
        [
            {"name": "entropy-r0.1", "args": {"data_selection": "entropy", "selection_ratio": 0.1}},
            {"name": "entropy-r0.3", "args": {"data_selection": "entropy", "selection_ratio": 0.3}},
            {"name": "entropy-b10", "args": {"data_selection": "entropy", "teacher_budget": "10%"}},
            {"name": "entropy-b30", "args": {"data_selection": "entropy", "teacher_budget": "30%"}},
            {"name": "random-b10", "args": {"data_selection": "random", "teacher_budget": "10%"}},
        ],
        plots=[{"kind": "budget_vs_ratio", "title": "B vs R", "methods": ["entropy", "random"]}],
    )
    layout.write_json(layout.task_record("sst2"), {"metric": "accuracy", "train_size": 100})
    spend = {"entropy-r0.1": 1.0e10, "entropy-r0.3": 3.0e10, "entropy-b10": 1.1e10, "entropy-b30": 2.9e10,
             "random-b10": 1.0e10}  # fmt: skip
    for method, flops in spend.items():
        for seed in (1, 2, 3):
            score = 0.8 + 0.01 * seed + ({1: 0.02, 2: 0.03, 3: 0.025}[seed] if "-b" in method else 0.0)
            results = {"eval": {"eval_accuracy": score}, "epoch": 1.0, "train_runtime_s": 1.0,
                       "flops": {"teacher_flops_requested": flops}}  # fmt: skip
            layout.save_run("sst2", method, seed, results=results, run={"wall_time_s": 2.0})
    return config, layout


def test_budget_runs_are_paired_with_the_ratio_run_of_closest_spend(tmp_path) -> None:
    config, layout = hand_made_grid(tmp_path)
    rows = budget_vs_ratio(config, collect(config, layout)["cells"])
    pairs = {row["budget"]: row["ratio"] for row in rows}
    assert pairs == {"entropy-b10": "entropy-r0.1", "entropy-b30": "entropy-r0.3"}  # random has no ratio run
    first = next(row for row in rows if row["budget"] == "entropy-b10")
    assert first["budget_gflops_per_instance"] == pytest.approx(0.11)
    assert first["ratio_gflops_per_instance"] == pytest.approx(0.10)
    assert first["budget_mean"] - first["ratio_mean"] == pytest.approx(0.025)
    assert 0 < first["p_value"] < 0.05  # paired over the three seeds


def test_the_report_has_the_comparison_and_its_plot(tmp_path) -> None:
    config, layout = hand_made_grid(tmp_path)
    write_report(config, layout)
    report = (layout.results / "report.md").read_text()
    assert "budget-based against ratio-based selection at the same spend" in report
    assert (
        "| sst2 | entropy | entropy-b30 | 0.8450 ± 0.0132 | 0.290 | entropy-r0.3 | 0.8200 ± 0.0100 | 0.300 |"
        in report
    )
    assert (layout.results / "fig1_budget_vs_ratio.png").stat().st_size > 0
    assert len(json.loads((layout.results / "report.json").read_text())["budget_vs_ratio"]) == 2


def test_the_report_reads_each_run_once(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tables, cache savings, answer store, teacher bill and versions all use one read of the runs."""
    config, layout = hand_made_grid(tmp_path)
    reads: Counter[Path] = Counter()
    read_text = Path.read_text

    def counted(self: Path, *args: object, **kwargs: object) -> str:
        reads[self] += 1
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", counted)
    write_report(config, layout)
    runs = {path: n for path, n in reads.items() if path.name in ("results.json", "run.json")}
    assert len(runs) == 2 * 5 * 3 and set(runs.values()) == {1}
