"""The experiment runner on tiny models: a grid runs, is skipped when re-run, resumes after a
SIGKILL to the same numbers, and the report's statistics match ones computed by hand."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from shared.errors import UserError
from student_trainer.experiments.config import ExperimentConfig, expand_methods, load_experiment, parse_config
from student_trainer.experiments.layout import Layout
from student_trainer.experiments.report import collect, paired_p_value, write_report
from student_trainer.train.checkpoint import list_checkpoints
from tests.distill_support import REPO, save_student, write_sentences

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # whole grids: minutes on a busy machine

METHODS = ["vanilla-kd", "entropy-r0.5"]
SEEDS = [1, 2]


def grid_config(root: Path, teacher: Path, student: Path, data: Path, **distill: object) -> Path:
    config = {
        "name": "tiny",
        "tasks": {"sst2": {"data_dir": str(data)}},
        "seeds": SEEDS,
        "teachers": {
            "large": {
                "model": str(teacher),
                "learning_rate": 1e-3,
                "max_steps": 4,
                "per_device_train_batch_size": 8,
                "seed": 1,
            },
        },  # fmt: skip
        "student": {"model": str(student), "num_layers": 2},
        "distill": {
            "max_seq_length": 16,
            "learning_rate": 1e-3,
            "max_steps": 8,
            "per_device_train_batch_size": 8,
            "eval_strategy": "no",
            "save_strategy": "steps",
            "save_steps": 2,
            "logging_steps": 1,
            **distill,
        },  # fmt: skip
        "server": {"batch_invariant": True},
        "methods": [
            {"name": "vanilla-kd", "args": {"teacher_selection": "large"}},
            {
                "name": "{data_selection}-r{selection_ratio}",
                "args": {"teacher_selection": "large"},
                "sweep": {"data_selection": ["entropy"], "selection_ratio": [0.5]},
            },
        ],  # fmt: skip
        "tables": [{"title": "tiny table", "methods": METHODS, "baselines": ["vanilla-kd"]}],
        "plots": [{"kind": "accuracy_vs_flops", "title": "tiny plot"}],
    }
    path = root / "grid.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def experiment_argv(config: Path, root: Path) -> list[str]:
    """Results and work under ``root``; fine-tuned teachers shared by every grid of the module."""
    return [sys.executable, "-m", "student_trainer.cli", "experiment", "--config", str(config),
            "--results_dir", str(root / "results"), "--work_dir", str(root / "work"),
            "--teachers_dir", str(root.parent / "teachers")]  # fmt: skip


def run_experiment(config: Path, root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        experiment_argv(config, root), cwd=REPO, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("experiment")
    data = root / "data"
    data.mkdir()
    write_sentences(data / "train.tsv", 48, seed=1)
    write_sentences(data / "dev.tsv", 24, seed=2)
    return {
        "root": root,
        "data": data,
        "teacher": save_student(root / "teacher", num_layers=3, seed=5),
        "student": save_student(root / "student", num_layers=3, seed=6),
    }


@pytest.fixture(scope="module")
def finished_grid(workspace) -> Path:
    """A whole 2-method x 2-seed grid, run once for the tests below."""
    root = workspace["root"] / "first"
    root.mkdir()
    config = grid_config(root, workspace["teacher"], workspace["student"], workspace["data"])
    done = run_experiment(config, root)
    assert done.returncode == 0, done.stdout + done.stderr
    return root


def results_of(root: Path) -> dict[str, dict]:
    runs = root / "results" / "default" / "tiny" / "runs"
    return {
        str(path.parent.relative_to(runs)): json.loads(path.read_text())
        for path in runs.rglob("results.json")
    }


def test_grid_runs_every_cell_and_reports(finished_grid):
    results = results_of(finished_grid)
    assert sorted(results) == sorted(f"sst2/{m}/seed{s}" for m in METHODS for s in SEEDS)
    for run, result in results.items():
        assert result["global_step"] == 8
        assert result["args"]["seed"] == int(run[-1])
    selected = results["sst2/entropy-r0.5/seed1"]["flops"]["teacher_flops_requested"]
    vanilla = results["sst2/vanilla-kd/seed1"]["flops"]["teacher_flops_requested"]
    assert 0 < selected < vanilla
    folder = finished_grid / "results" / "default" / "tiny"
    assert (folder / "runs/sst2/vanilla-kd/seed1/trace.json").exists()
    teacher = json.loads((folder / "teachers/sst2-large.json").read_text())
    assert teacher["num_layers"] == 3 and "eval_accuracy" in teacher["eval"]
    service = json.loads((folder / "service/sst2.json").read_text())
    assert service[0]["teachers"]["large"]["rows_computed"] > 0
    report = (folder / "report.md").read_text()
    assert "tiny table" in report and "majority baseline" in report
    assert (folder / "fig1_accuracy_vs_flops.png").stat().st_size > 1000


def test_a_grid_runs_with_the_default_folders_and_records_no_machine_path(workspace, tmp_path):
    """The defaults are relative (``.cache/experiments/teachers``): the service must still find the
    teacher, and the committed teacher record must not hold a path of this machine."""
    config = yaml.safe_load(
        grid_config(tmp_path, workspace["teacher"], workspace["student"], workspace["data"]).read_text()
    )
    config.update(seeds=[1], methods=config["methods"][:1], tables=[], plots=[])
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(config))
    done = subprocess.run(
        [sys.executable, "-m", "student_trainer.cli", "experiment", "--config", "grid.yaml"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    record = (tmp_path / "results/default/tiny/teachers/sst2-large.json").read_text()
    assert str(tmp_path) not in record and json.loads(record)["folder"].startswith("sst2-")
    assert (tmp_path / ".cache/experiments/teachers" / json.loads(record)["folder"] / "config.json").exists()


def test_each_run_and_the_report_record_what_made_them(finished_grid):
    from importlib.metadata import version

    expected = {name: version(name) for name in ("torch", "transformers", "tokenizers")}
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    for result in results_of(finished_grid).values():
        assert {k: result["made_with"][k] for k in expected} == expected
        assert result["made_with"]["python"].count(".") == 2
        assert not head or result["made_with"]["commit"].startswith(head)
    report = json.loads((finished_grid / "results/default/tiny/report.json").read_text())
    assert report["made_with"]["transformers"] == expected["transformers"]
    assert report["runs_made_with"] == [{"made_with": result["made_with"], "runs": 4}]
    assert (
        f"transformers {expected['transformers']}"
        in (finished_grid / "results/default/tiny/report.md").read_text()
    )


def test_rerun_skips_finished_runs(finished_grid, workspace):
    before = {p: p.stat().st_mtime_ns for p in (finished_grid / "results").rglob("results.json")}
    again = run_experiment(finished_grid / "grid.yaml", finished_grid)
    assert again.returncode == 0, again.stderr
    assert "4 done, 0 to go" in again.stdout
    assert "fine-tuning" not in again.stdout
    assert before == {p: p.stat().st_mtime_ns for p in (finished_grid / "results").rglob("results.json")}


def test_sigkill_mid_grid_resumes_to_the_same_numbers(finished_grid, workspace):
    root = workspace["root"] / "killed"
    root.mkdir()
    config = grid_config(root, workspace["teacher"], workspace["student"], workspace["data"])
    runner = subprocess.Popen(
        experiment_argv(config, root), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    killed_run = root / "work" / "default" / "tiny" / "runs" / "sst2" / "entropy-r0.5" / "seed1"
    deadline = time.monotonic() + 300
    while not list_checkpoints(killed_run):  # a whole one, not the .tmp- folder of one being written
        assert runner.poll() is None, "the runner ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    for pid in [runner.pid, *descendants(runner.pid)]:  # all at once, as a container stop or a scheduler does
        os.kill(pid, signal.SIGKILL)
    runner.wait()
    wait_until_gone(root)
    assert not (root / "results/default/tiny/runs/sst2/entropy-r0.5/seed1/results.json").exists()
    resumed = run_experiment(config, root)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "2 done, 2 to go" in resumed.stdout  # vanilla-kd's two seeds ran before the kill
    assert "resum" in (killed_run / "run.log").read_text().lower()
    for run, result in results_of(root).items():
        expected = results_of(finished_grid)[run]
        assert result["eval"] == expected["eval"], run
        assert result["flops"]["teacher_flops_requested"] == expected["flops"]["teacher_flops_requested"]


def processes_naming(root: Path) -> dict[int, str]:
    """Live processes whose command line names a path under ``root`` (the runner, its ``finetune`` or
    ``distill`` and its teacher-server all do), by pid: their start times (from /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            stat = (entry / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError, NotADirectoryError, PermissionError):
            continue
        if entry.name.isdigit() and str(root) in cmdline and stat.rsplit(")", 1)[1].split()[0] != "Z":
            found[int(entry.name)] = stat.rsplit(")", 1)[1].split()[19]
    return found


def descendants(pid: int) -> set[int]:
    """Every process below ``pid``, walking parent links in /proc."""
    children: dict[int, set[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError):
                continue
            children.setdefault(parent, set()).add(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.add(child)
            todo.append(child)
    return found


def wait_until_gone(root: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while processes_naming(root):
        assert time.monotonic() < deadline, f"left running: {processes_naming(root)}"
        time.sleep(0.1)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_grid_with_nothing_left_and_it_resumes_to_the_same_numbers(
    finished_grid, workspace, sig
):
    """What a scheduler, ``kill`` or Ctrl-C does: the run in flight checkpoints, the service stops,
    exit 130, no process of the grid left; the same command then completes the grid."""
    root = workspace["root"] / f"signal-{sig.name}"
    root.mkdir()
    config = grid_config(root, workspace["teacher"], workspace["student"], workspace["data"])
    with open(root / "runner.log", "w") as log:
        runner = subprocess.Popen(
            experiment_argv(config, root), cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    in_flight = root / "work" / "default" / "tiny" / "runs" / "sst2" / "vanilla-kd" / "seed2"
    deadline = time.monotonic() + 300
    while not {"checkpoint-2", "checkpoint-4"} & {p.name for p in in_flight.glob("checkpoint-*")}:
        assert runner.poll() is None, (root / "runner.log").read_text()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    grid = descendants(runner.pid)
    commands = [(Path("/proc") / str(pid) / "cmdline").read_bytes() for pid in grid]
    assert any(b"teacher_server.cli" in c for c in commands) and any(b"distill" in c for c in commands)
    runner.send_signal(sig)
    assert runner.wait(timeout=120) == 130, (root / "runner.log").read_text()
    assert processes_naming(root) == {}
    assert not [pid for pid in grid if (Path("/proc") / str(pid)).exists()]
    assert list(in_flight.glob("checkpoint-*")), "the run in flight stopped without its checkpoint"
    assert not (root / "results/default/tiny/runs/sst2/vanilla-kd/seed2/results.json").exists()
    stopped_service = json.loads((root / "results/default/tiny/service/sst2.json").read_text())
    assert len(stopped_service) == 1 and stopped_service[0]["teachers"]  # what it computed is kept
    resumed = run_experiment(config, root)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "1 done, 3 to go" in resumed.stdout
    assert "resum" in (in_flight / "run.log").read_text().lower()
    expected = results_of(finished_grid)
    assert sorted(results_of(root)) == sorted(expected)
    for run, result in results_of(root).items():
        assert result["eval"] == expected[run]["eval"], run
        assert result["flops"]["teacher_flops_requested"] == expected[run]["flops"]["teacher_flops_requested"]


def hand_grid(tmp_path: Path, methods: list[dict], **keys: object) -> tuple[ExperimentConfig, Layout]:
    """A one-task, three-seed grid whose results a test writes by hand, and its folders."""
    config = parse_config(
        {
            "name": "hand",
            "tasks": {"sst2": {"data_dir": "unused"}},
            "seeds": [1, 2, 3],
            "teachers": {"large": {"model": "unused"}},
            "student": {"model": "unused"},
            "methods": methods,
            **keys,
        }
    )
    return config, Layout(tmp_path / "results", tmp_path / "work", tmp_path / "teachers")


def test_report_statistics_match_hand_computation(tmp_path):
    config, layout = hand_grid(
        tmp_path,
        [{"name": "base", "args": {}}, {"name": "ours", "args": {"data_selection": "entropy"}}],
        tables=[{"title": "T", "methods": ["base", "ours"], "baselines": ["base"]}],
    )
    layout.write_json(layout.task_record("sst2"), {"metric": "accuracy", "train_size": 100,
                                                   "majority_baseline": {"eval_accuracy": 0.5}})  # fmt: skip
    scores = {"base": [0.80, 0.82, 0.81], "ours": [0.84, 0.85, 0.855]}
    for method, values in scores.items():
        for seed, value in zip([1, 2, 3], values, strict=True):
            results = {"eval": {"eval_accuracy": value}, "epoch": 2.0, "train_runtime_s": 1.0,
                       "flops": {"teacher_flops_requested": 4e11 if method == "base" else 1e11}}  # fmt: skip
            layout.save_run("sst2", method, seed, results=results, run={"wall_time_s": 3.0})
    cells = collect(config, layout)["cells"]
    ours = cells[("sst2", "ours")]
    assert ours.mean == pytest.approx(statistics.fmean(scores["ours"]))
    assert ours.std == pytest.approx(math.sqrt(sum((v - ours.mean) ** 2 for v in scores["ours"]) / 2))
    assert ours.flops_per_instance == [1e11 / 200] * 3
    diffs = [a - b for a, b in zip(scores["ours"], scores["base"], strict=True)]
    t = statistics.fmean(diffs) / (statistics.stdev(diffs) / math.sqrt(3))
    from scipy.stats import t as student_t

    assert paired_p_value(ours.scores, cells[("sst2", "base")].scores) == pytest.approx(
        2 * student_t.sf(t, 2)
    )
    write_report(config, layout)
    report = json.loads((layout.results / "report.json").read_text())
    row = report["tables"][0]["rows"][1]["tasks"]["sst2"]
    assert 2 * student_t.sf(t, 2) < 0.05 and row["significant"] is True  # p = 0.013 with these numbers
    assert row["teacher_gflops_per_instance"] == pytest.approx(0.5)
    assert f"{ours.mean:.4f} ± {ours.std:.4f}* (n=3)" in (layout.results / "report.md").read_text()


def test_the_ratio_curve_leaves_out_budget_runs_of_the_same_strategy(tmp_path):
    methods = [
        {"name": "entropy-r0.5", "args": {"data_selection": "entropy", "selection_ratio": 0.5}},
        {"name": "entropy-b10", "args": {"data_selection": "entropy", "teacher_budget": "10%"}},
    ]
    plots = [{"kind": "ratio_curve", "title": "r", "task": "sst2", "methods": ["entropy"]}]
    config, layout = hand_grid(tmp_path, methods, tables=[], plots=plots)
    layout.write_json(layout.task_record("sst2"), {"metric": "accuracy", "train_size": 100})
    for method in ("entropy-r0.5", "entropy-b10"):
        for seed in (1, 2, 3):
            results = {"eval": {"eval_accuracy": 0.8}, "epoch": 2.0, "train_runtime_s": 1.0,
                       "flops": {"teacher_flops_requested": 1e11}}  # fmt: skip
            layout.save_run("sst2", method, seed, results=results, run={"wall_time_s": 3.0})
    write_report(config, layout)  # a budget run has no selection_ratio: it raised KeyError
    assert (layout.results / "fig1_ratio_curve.png").stat().st_size > 0


def test_report_counts_what_the_answer_store_answered(tmp_path):
    config, layout = hand_grid(tmp_path, [{"name": "kd", "args": {}}], tables=[])
    layout.write_json(layout.task_record("sst2"), {"metric": "accuracy", "train_size": 100})
    for seed, (hits, lookups) in zip([1, 2, 3], [(0, 40), (40, 40), (10, 20)], strict=True):
        flops = {
            "teacher_flops_requested": 1e11,
            "teacher_store_hits": hits,
            "teacher_store_lookups": lookups,
        }
        results = {"eval": {"eval_accuracy": 0.8}, "epoch": 1.0, "train_runtime_s": 1.0, "flops": flops}
        layout.save_run("sst2", "kd", seed, results=results, run={"wall_time_s": 1.0})
    write_report(config, layout)
    assert json.loads((layout.results / "report.json").read_text())["answer_store"] == {
        "sst2": {"hits": 50, "lookups": 100, "hit_rate": 0.5}
    }
    assert "answered 50 of the 100 rows looked up (50.0%)" in (layout.results / "report.md").read_text()


def _write_the_record_repeatedly(path: str, start) -> None:
    from student_trainer.experiments.layout import write_json

    start.wait()
    for i in range(2000):
        write_json(Path(path), {"writer": os.getpid(), "i": i})


def test_shards_writing_the_same_record_side_by_side_all_succeed(tmp_path):
    """Grid shards each write their task's record; with one shared partial file a writer's rename
    found its file already renamed by another (FileNotFoundError)."""
    import multiprocessing

    path = tmp_path / "tasks" / "sst2.json"
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(4)
    writers = [
        context.Process(target=_write_the_record_repeatedly, args=(str(path), start)) for _ in range(4)
    ]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=120)
    assert [writer.exitcode for writer in writers] == [0, 0, 0, 0]
    assert json.loads(path.read_text())["i"] == 1999
    assert [p.name for p in path.parent.iterdir()] == ["sst2.json"]


def test_sweep_expands_and_names_must_be_unique():
    methods = expand_methods(
        [
            {
                "name": "{s}-r{r}",
                "args": {"teacher_selection": "large"},
                "sweep": {"s": ["a", "b"], "r": [0.5, 0.1]},
            }
        ]
    )
    assert [m.name for m in methods] == ["a-r0.5", "a-r0.1", "b-r0.5", "b-r0.1"]
    assert methods[3].args == {"teacher_selection": "large", "s": "b", "r": 0.1}
    with pytest.raises(UserError, match="appear twice"):
        expand_methods([{"name": "same", "sweep": {"s": ["a", "b"]}}])
    with pytest.raises(UserError, match="runner sets"):
        expand_methods([{"name": "x", "args": {"seed": 3}}])


BAD_CONFIGS = [
    ({"bogus": 1}, "unknown keys"),
    ({"teachers": {"soft": {"model": "m"}}}, "'soft' is not a teacher name"),
    ({"tables": [{"title": "t", "methods": ["nope"]}]}, "no method 'nope'"),
    ({"plots": [{"kind": "pie"}]}, "kind 'pie'"),
    ({"methods": [{"name": "small-only", "args": {"teacher_selection": "small"}}]}, "defines only"),
]


def test_bad_configs_fail_in_one_line(tmp_path):
    for change, message in BAD_CONFIGS:
        raw = {"name": "x", "tasks": {"sst2": {"data_dir": "d"}}, "seeds": [1], "student": {"model": "m"},
               "teachers": {"large": {"model": "m"}}, "methods": [{"name": "kd", "args": {}}]}  # fmt: skip
        raw.update(change)
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(raw))
        with pytest.raises(UserError, match=message):
            load_experiment(path)
    done = subprocess.run(  # the last one through the CLI: one line, exit 2
        [sys.executable, "-m", "student_trainer.cli", "experiment", "--config", str(path), "--dry_run"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "defines only" in done.stderr


def test_dry_run_estimates_flops_from_real_lengths(workspace, tmp_path):
    config = grid_config(tmp_path, workspace["teacher"], workspace["student"], workspace["data"])
    done = subprocess.run(
        [*experiment_argv(config, tmp_path), "--dry_run"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "2 method(s) x 2 seed(s) = 4 runs" in done.stdout
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines() if line.startswith("sst2/")}
    vanilla, entropy = float(rows["sst2/vanilla-kd/seed1"][2]), float(rows["sst2/entropy-r0.5/seed1"][2])
    assert entropy == pytest.approx(vanilla / 2, rel=0.02)
    assert not (tmp_path / "results").exists()  # a dry run writes nothing


def test_a_teacher_is_fine_tuned_once_whatever_role_it_plays(finished_grid, workspace, tmp_path):
    """The same recipe as ``small`` in one grid and ``large`` in another is one folder, made once."""
    from dataclasses import replace

    from student_trainer.experiments.runner import ensure_teacher

    config = load_experiment(finished_grid / "grid.yaml")
    both = replace(config, teachers={"small": config.teachers["large"], **config.teachers})
    teachers = workspace["root"] / "teachers"
    layout = Layout(results=tmp_path / "results", work=tmp_path / "work", teachers=teachers)
    before = sorted(p.name for p in layout.teachers.iterdir() if p.is_dir())
    small = ensure_teacher(both, layout, "sst2", "small")  # finds the grid's teacher: no fine-tuning
    assert small["folder"] == ensure_teacher(both, layout, "sst2", "large")["folder"]
    assert sorted(p.name for p in layout.teachers.iterdir() if p.is_dir()) == before
    assert small["role"] == "small" and (layout.results / "teachers/sst2-small.json").exists()


def test_a_stopped_teacher_fine_tuning_resumes_to_the_weights_of_one_never_stopped(
    workspace, tmp_path, monkeypatch, capsys
):
    """A fine-tuning stopped midway: the next run continues from the saved state, not step 0."""
    from dataclasses import replace

    from student_trainer.args.finetune import FinetuneArguments
    from student_trainer.experiments import runner
    from student_trainer.train.finetune import finetune
    from tests.test_finetune import parse, stop_at_step

    config = load_experiment(
        grid_config(tmp_path, workspace["teacher"], workspace["student"], workspace["data"])
    )
    large = config.teachers["large"]
    config = replace(config, teachers={"large": replace(large, finetune={**large.finetune, "max_steps": 6})})
    monkeypatch.setattr(runner, "TEACHER_SAVE_STEPS", 2)

    def stopped_after_three_steps(command: str, flags: list[str], log_path: Path) -> float:
        namespace = parse(flags)
        args = namespace.parser.arguments(namespace, FinetuneArguments)
        with monkeypatch.context() as patch:
            stop_at_step(patch, 4)
            with pytest.raises(KeyboardInterrupt):
                finetune(args)
        raise UserError("the process was stopped")

    def layout(name: str) -> Layout:
        return Layout(
            results=tmp_path / name / "results", work=tmp_path / name / "work", teachers=tmp_path / name
        )

    with monkeypatch.context() as patch:
        patch.setattr(runner, "_trainer", stopped_after_three_steps)
        with pytest.raises(UserError, match="the process was stopped"):
            runner.ensure_teacher(config, layout("stopped"), "sst2", "large")
    resumed = runner.ensure_teacher(config, layout("stopped"), "sst2", "large")
    assert "resuming the large teacher" in capsys.readouterr().out
    log = tmp_path / "stopped" / resumed["folder"] / "finetune.log"
    assert (
        f"Resuming from {tmp_path / 'stopped'}" in log.read_text()
        and "checkpoint-2 (step 2)" in log.read_text()
    )
    whole = runner.ensure_teacher(config, layout("whole"), "sst2", "large")
    assert resumed["weights_sha256"] == whole["weights_sha256"] and resumed["eval"]["global_step"] == 6


def test_two_shards_side_by_side_give_the_grid_unsharded(finished_grid, workspace):
    root = workspace["root"] / "sharded"
    root.mkdir()
    config = grid_config(root, workspace["teacher"], workspace["student"], workspace["data"])
    shards = [
        subprocess.Popen([*experiment_argv(config, root), "--shard", f"{i}/2"], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]  # fmt: skip
    outputs = [shard.communicate(timeout=600)[0] for shard in shards]
    assert [shard.returncode for shard in shards] == [0, 0], outputs
    assert all("shard" in out and "2 runs, 0 done" in out for out in outputs)
    sharded, whole = results_of(root), results_of(finished_grid)
    assert sorted(sharded) == sorted(whole)
    for run in whole:
        assert sharded[run]["eval"] == whole[run]["eval"], run
    bad = subprocess.run([*experiment_argv(config, root), "--shard", "2/2"], capture_output=True, text=True)
    assert bad.returncode == 2 and "'2/2' is not I/N" in bad.stderr.strip().splitlines()[-1]


def test_run_results_are_not_git_ignored():
    """Run results are what a fresh clone resumes from: the work folder is ignored, they are not."""
    layout = Layout(
        results=Path("results/cpu/x"), work=Path("runs/experiments/cpu/x"), teachers=Path(".cache/t")
    )
    paths = [
        layout.run_results("sst2", "vanilla-kd", 1) / "results.json",
        layout.run_work_dir("sst2", "m", 1),
    ]
    checked = subprocess.run(
        ["git", "check-ignore", *map(str, paths)], cwd=REPO, capture_output=True, text=True
    )
    if checked.returncode == 128:
        pytest.skip("not a git checkout")
    assert checked.stdout.split() == [str(paths[1])]


def test_committed_teacher_records_hold_no_machine_path():
    records = list((REPO / "results").glob("*/*/teachers/*.json"))
    assert records
    for path in records:
        record = json.loads(path.read_text())
        assert "dir" not in record, path
        assert "prompted" in record or "/" not in record["folder"], path  # a prompted teacher has no folder


MACHINE_PATH = re.compile(r'"(/(?:root|home|tmp|work|opt|usr)/[^"]*|[^"]*site-packages[^"]*)"')


def test_committed_runs_hold_no_machine_path():
    files = [
        p for name in ("run.json", "results.json") for p in (REPO / "results").glob(f"*/*/runs/**/{name}")
    ]
    assert files
    found = {str(p.relative_to(REPO)): MACHINE_PATH.findall(p.read_text()) for p in files}
    assert {path: paths for path, paths in found.items() if paths} == {}


def test_a_run_records_its_work_folder_by_name(finished_grid):
    """The grid ran with an absolute --work_dir: results name it ``{work}``, not this machine's path."""
    for run in (finished_grid / "results" / "default" / "tiny" / "runs").rglob("*.json"):
        assert str(finished_grid / "work") not in run.read_text(), run
    command = json.loads(next((finished_grid / "results").rglob("run.json")).read_text())["command"]
    assert command[command.index("--output_dir") + 1].startswith("{work}/runs/sst2/")
