"""Same config and seed, same ``results.json``: in another clone path, and through a shared service.

Dynamic KD's hard choices (which rows are most uncertain, which teacher answers them) turn a
last-bit difference in one teacher answer into a different student, so reproducibility here
means bit-identical numbers, not close ones.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from teacher_server.launch import serve_in_subprocess
from tests.distill_support import (
    REPO,
    distill_argv,
    run_in_process,
    save_student,
    tiny_demo_config,
    train_log,
    write_sentences,
)
from tests.tiny_models import save_tiny_bert

pytestmark = pytest.mark.slow

PACKAGES = ("shared", "student_trainer", "teacher_engine", "teacher_server")


def comparable(results: dict) -> dict:
    """``results.json`` without what legitimately changes between runs: wall times, paths, ports."""
    timings = ("train_runtime_s", "train_samples_per_second", "teacher_time_s")
    kept = {k: v for k, v in results.items() if k not in (*timings, "args")}
    kept["teachers"] = {role: {**t, "spec": None} for role, t in results["teachers"].items()}
    paths = ("output_dir", "data_dir", "teacher")
    kept["args"] = {k: v for k, v in results["args"].items() if k not in paths}
    return kept


@pytest.mark.timeout(900)
def test_demo_pipeline_gives_the_same_results_in_two_clone_paths(tmp_path: Path) -> None:
    """The demo (tiny models; 2 epochs, so the service cache answers rows too) in two copies of
    the code at different paths, each with its own data, work dir, fresh teachers and fresh service."""
    base = save_tiny_bert(tmp_path / "base", num_layers=6, hidden_size=32, seed=3)
    config = tiny_demo_config(
        tmp_path / "demo.yaml",
        base,
        data_dir=".cache/demo/data/synthetic",
        num_train=64,
        num_dev=16,
        epochs=2,
    )
    results = []
    for clone in (tmp_path / "a", tmp_path / "clones" / "a-much-longer-clone-path"):
        for package in PACKAGES:
            shutil.copytree(REPO / package, clone / package, ignore=shutil.ignore_patterns("__pycache__"))
        env = {**os.environ, "PYTHONPATH": str(clone), "PYTHONHASHSEED": "random"}
        done = subprocess.run(
            [sys.executable, "-m", "student_trainer.cli", "demo", "--config", str(config)],
            cwd=clone,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        (path,) = (clone / ".cache" / "demo" / "runs").glob("*/results/runs/synthetic/*/seed42/results.json")
        results.append(json.loads(path.read_text()))
    assert results[0]["flops"]["teacher_cache_hits"] > 0  # the second epoch was answered from the cache
    assert comparable(results[0]) == comparable(results[1])


def _distill(url: str, student: Path, train_file: Path, output_dir: Path, seed: int) -> tuple[dict, list]:
    argv = distill_argv(student, train_file, output_dir, {"small": url, "large": url})
    argv += ["--max_steps", "12", "--seed", str(seed), "--teacher_selection", "hard"]
    argv += ["--data_selection", "entropy", "--selection_ratio", "1.0", "--overwrite_output_dir"]
    results = run_in_process(argv)
    steps = [{k: r[k] for k in ("loss", "ce", "kd")} for r in train_log(output_dir)]
    return results, steps


@pytest.mark.timeout(600)
def test_a_run_through_a_shared_service_does_not_depend_on_the_runs_before_it(
    tmp_path: Path, tiny_teachers: dict[str, Path]
) -> None:
    """A grid shares one long-lived service: the rows of run B that run A already asked come from
    the cache, computed in A's batches. With ``batch_invariant`` B's numbers equal B run alone."""
    student = save_student(tmp_path / "student")
    train_file = write_sentences(tmp_path / "train.tsv", 48, seed=5)
    teachers = [
        {"name": role, "path": str(path), "batch_invariant": True} for role, path in tiny_teachers.items()
    ]
    config = tmp_path / "teachers.yaml"
    config.write_text(yaml.safe_dump({"teachers": teachers}))

    with serve_in_subprocess(config, log_path=tmp_path / "shared.log") as url:
        _distill(url, student, train_file, tmp_path / "a", seed=1)
        after_a, after_a_steps = _distill(url, student, train_file, tmp_path / "b-after-a", seed=2)
    with serve_in_subprocess(config, log_path=tmp_path / "fresh.log") as url:
        alone, alone_steps = _distill(url, student, train_file, tmp_path / "b-alone", seed=2)

    assert after_a["flops"]["teacher_cache_hits"] > alone["flops"]["teacher_cache_hits"]  # A's rows reused
    assert after_a_steps == alone_steps
    weights = [(tmp_path / run / "model.safetensors").read_bytes() for run in ("b-after-a", "b-alone")]
    assert weights[0] == weights[1]
