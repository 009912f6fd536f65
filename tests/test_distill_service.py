"""The trainer against a real `teacher-server` process: what the SERVICE saw, faults, remote = local.

Request sizes and FLOPs are read from the service's own Prometheus ``/metrics`` (rows per
forward pass, FLOPs run), not from the trainer's counters. The service cache is off so every
row sent is a row computed.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from transformers import AutoConfig, AutoTokenizer

from shared.flops import encoder_forward_flops
from student_trainer.teachers.client import make_teacher_client
from student_trainer.train import setup as distill_setup
from tests.distill_support import (
    METHODS,
    REPO,
    WrappedTeacher,
    distill_argv,
    expected_rows,
    run_in_process,
    save_student,
    service_metrics,
    train_log,
    write_sentences,
)

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Service:
    """`teacher-server` as a separate process on a loopback port."""

    def __init__(self, root: Path, teachers: dict[str, Path], *, cache_bytes: int = 0):
        self.config = root / "teachers.yaml"
        entries = [{"name": r, "path": str(p), "max_queue_delay_ms": 1} for r, p in teachers.items()]
        self.config.write_text(yaml.safe_dump({"cache_max_bytes": cache_bytes, "teachers": entries}))
        self.log = root / "server.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> Service:
        command = [
            sys.executable,
            "-m",
            "teacher_server.cli",
            "--config",
            str(self.config),
            "--port",
            str(self.port),
        ]
        with self.log.open("a") as log:
            self.process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            assert self.process.poll() is None, self.log.read_text()[-2000:]
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "teacher-server did not become ready"
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL: a crash, no draining."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def metrics(self) -> dict[tuple[str, str], float]:
        return service_metrics(self.url)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, tiny_teachers: dict[str, Path]) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("service")
    return {
        "root": root,
        "student": save_student(root / "student"),
        "train": write_sentences(root / "train.tsv", 40, seed=1),
        **tiny_teachers,
    }


@pytest.fixture(scope="module")
def service(workspace) -> Service:
    root = workspace["root"] / "shared-service"
    root.mkdir()
    server = Service(root, {"small": workspace["small"], "large": workspace["large"]}).start()
    yield server
    server.stop()


class MeteredTeacher(WrappedTeacher):
    """Wraps the real HTTP client; around each request, reads what the service's metrics say it ran."""

    def __init__(self, real, service: Service, records: list[dict]):
        super().__init__(real)
        self.service, self.records = service, records

    async def infer(self, query):
        model = self.real.model
        before = await asyncio.to_thread(self.service.metrics)
        answer = await self.real.infer(query)
        after = await asyncio.to_thread(self.service.metrics)

        def delta(name: str) -> float:
            return after[(name, model)] - before[(name, model)]

        self.records.append(
            {
                "role": model,
                "service_rows": delta("teacher_batch_size_sum"),
                "service_flops": delta("teacher_flops_total"),
                "answer_flops": answer.teacher_flops,
            }
        )
        return answer


def metered(monkeypatch: pytest.MonkeyPatch, service: Service) -> list[dict]:
    records: list[dict] = []
    monkeypatch.setattr(
        distill_setup,
        "make_teacher_client",
        lambda spec, name, **options: MeteredTeacher(
            make_teacher_client(spec, name=name, **options), service, records
        ),
    )
    return records


def http_argv(workspace, service: Service, output_dir: Path, *extra: str) -> list[str]:
    teachers = {role: service.url for role in ("small", "large")}
    return distill_argv(workspace["student"], workspace["train"], output_dir, teachers, *extra)


@pytest.mark.parametrize(("teacher", "supervision", "strategy", "kd_loss", "features"), METHODS)
def test_the_service_computes_exactly_the_selected_rows(
    workspace, service, tmp_path, monkeypatch, teacher, supervision, strategy, kd_loss, features
) -> None:
    records = metered(monkeypatch, service)
    ratio = 1.0 if strategy == "none" else 0.5
    extra = ["--teacher_selection", teacher, "--supervision", supervision, "--data_selection", strategy]
    extra += ["--selection_ratio", str(ratio), "--kd_loss", kd_loss, "--pt_features", features]
    results = run_in_process(http_argv(workspace, service, tmp_path, *extra))

    steps = train_log(tmp_path)
    assert len(steps) == 3
    for role in ("small", "large"):
        wanted = [expected_rows(teacher, s["instances"], ratio, strategy)[role] for s in steps]
        seen = [r for r in records if r["role"] == role]
        assert [r["service_rows"] for r in seen] == [n for n in wanted if n > 0]  # int(B·r); hard: halves
        assert [s[f"teacher_flops_{role}"] for s in steps if s[f"teacher_rows_{role}"]] == [
            r["answer_flops"] for r in seen
        ]
    # the ledger is the sum of what the service reported; its own counter agrees up to the
    # integer split of each forward pass's FLOPs among its rows
    assert results["flops"]["teacher_flops_spent"] == sum(r["answer_flops"] for r in records)
    for record in records:
        assert 0 <= record["service_flops"] - record["answer_flops"] < record["service_rows"]


def test_ratio_one_tenth_spends_one_tenth_of_vanilla(workspace, service, tmp_path, monkeypatch) -> None:
    """Equal-length sentences, so trimming cannot help: the saving is the selection's, and the
    service's own in the teacher's last layer."""
    records = metered(monkeypatch, service)
    data = write_sentences(tmp_path / "equal.tsv", 80, seed=3, min_words=6, max_words=6)
    argv = distill_argv(workspace["student"], data, tmp_path / "out", {"large": service.url})
    argv += ["--data_selection", "entropy", "--selection_ratio", "0.1", "--per_device_train_batch_size", "20"]
    results = run_in_process(argv + ["--max_steps", "4"])

    assert [r["service_rows"] for r in records] == [2, 2, 2, 2]
    # the service runs only [CLS] through the teacher's last layer: what that saves is its own
    sentence = data.read_text().splitlines()[1].split("\t")[0]
    length = len(AutoTokenizer.from_pretrained(workspace["large"])(sentence)["input_ids"])
    config = AutoConfig.from_pretrained(workspace["large"])
    ran = 0.1 * encoder_forward_flops(config, [length], first_token_last=True)
    ran /= encoder_forward_flops(config, [length])
    flops = results["flops"]
    assert flops["teacher_flops_spent"] / flops["teacher_flops_vanilla"] == pytest.approx(ran, rel=1e-3)
    service_flops = sum(r["service_flops"] for r in records)
    assert service_flops / flops["teacher_flops_vanilla"] == pytest.approx(ran, rel=1e-3)
    assert flops["teacher_flops_saved_fraction"] == pytest.approx(1 - ran, rel=1e-3)
    assert flops["teacher_flops_vanilla_unpadded"] == flops["teacher_flops_vanilla"]  # no padding to remove


def test_the_service_cache_is_not_counted_as_dynamic_kd_saving(workspace, tmp_path) -> None:
    """Vanilla KD (every row, one teacher) for two epochs with the cache on: the second epoch is
    free on the bill, but dynamic KD's own saving stays exactly zero."""
    root = tmp_path / "cached-service"
    root.mkdir()
    server = Service(root, {"large": workspace["large"]}, cache_bytes=10**7).start()
    try:
        argv = distill_argv(workspace["student"], workspace["train"], tmp_path / "out", {"large": server.url})
        results = run_in_process(argv + ["--data_selection", "none", "--max_steps", "10"])  # 2 epochs of 5
    finally:
        server.stop()
    flops = results["flops"]
    assert flops["teacher_cache_hits"] == 40  # the whole second epoch
    steps = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    spent = {step["step"]: step["teacher_flops_spent"] for step in steps if step["event"] == "train"}
    assert spent[10] == spent[5] > 0  # the second epoch cost nothing
    assert flops["teacher_flops_spent"] == spent[5]
    vanilla = flops["teacher_flops_vanilla"]
    assert flops["teacher_flops_saved_fraction"] == pytest.approx(1 - spent[5] / vanilla)
    assert flops["teacher_flops_saved_fraction"] > 0.4  # about half: epoch 2's padded batches differ
    assert flops["teacher_flops_requested"] == flops["teacher_flops_vanilla_unpadded"]
    assert flops["teacher_flops_saved_by_method"] == 0
    assert flops["teacher_flops_saved_by_service"] == pytest.approx(
        1 - spent[5] / flops["teacher_flops_requested"]
    )


def test_remote_and_local_teachers_give_the_same_loss_trajectory(workspace, service, tmp_path) -> None:
    method = ["--teacher_selection", "hard", "--data_selection", "entropy", "--selection_ratio", "0.5"]
    method += ["--supervision", "uncertainty", "--pt_features", "all-tokens", "--max_steps", "5"]
    run_in_process(http_argv(workspace, service, tmp_path / "remote", *method))
    local = {role: f"local:{workspace[role]}" for role in ("small", "large")}
    run_in_process(distill_argv(workspace["student"], workspace["train"], tmp_path / "local", local, *method))

    remote_steps, local_steps = train_log(tmp_path / "remote"), train_log(tmp_path / "local")
    for remote, local_step in zip(remote_steps, local_steps, strict=True):
        for key in ("loss", "ce", "kd", "pt"):
            assert remote[key] == pytest.approx(local_step[key], rel=1e-5, abs=1e-7), (remote["step"], key)
        assert remote["teacher_rows_small"] == local_step["teacher_rows_small"]


def start_trainer(argv: list[str], log: Path) -> subprocess.Popen:
    with log.open("w") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "student_trainer.cli", "distill", *argv],
            cwd=REPO,
            stdout=handle,
            stderr=subprocess.STDOUT,
            text=True,
        )


def wait_for_steps(output_dir: Path, steps: int, trainer: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    log = output_dir / "metrics.jsonl"
    while not (log.exists() and len(log.read_text().splitlines()) >= steps):
        assert trainer.poll() is None, "the trainer ended early"
        assert time.monotonic() < deadline
        time.sleep(0.01)


FAULT_METHOD = ["--teacher_selection", "soft", "--data_selection", "margin", "--selection_ratio", "0.5"]
FAULT_METHOD += ["--max_steps", "25", "--save_strategy", "steps", "--save_steps", "1000"]


def test_service_killed_and_restarted_mid_run_loses_no_step(workspace, tmp_path) -> None:
    server = Service(tmp_path, {"small": workspace["small"], "large": workspace["large"]}).start()
    try:
        output = tmp_path / "run"
        argv = http_argv(workspace, server, output, *FAULT_METHOD, "--teacher_ready_timeout", "90")
        trainer = start_trainer(argv, tmp_path / "trainer.log")
        wait_for_steps(output, 5, trainer)
        server.kill()
        time.sleep(1.0)
        server.start()
        assert trainer.wait(timeout=180) == 0, (tmp_path / "trainer.log").read_text()[-3000:]
    finally:
        server.stop()
    assert [s["step"] for s in train_log(output)] == list(range(1, 26))
    assert json.loads((output / "results.json").read_text())["global_step"] == 25
    assert "failed" in (tmp_path / "trainer.log").read_text()  # the client did see the outage


def test_service_that_never_comes_back_fails_clearly_after_a_checkpoint(workspace, tmp_path) -> None:
    server = Service(tmp_path, {"small": workspace["small"], "large": workspace["large"]}).start()
    output = tmp_path / "run"
    argv = http_argv(workspace, server, output, *FAULT_METHOD)
    try:
        trainer = start_trainer(argv + ["--teacher_ready_timeout", "2"], tmp_path / "trainer.log")
        wait_for_steps(output, 5, trainer)
        server.kill()
        assert trainer.wait(timeout=180) == 3  # a teacher outage, not a usage error (2)
    finally:
        server.stop()
    last_line = (tmp_path / "trainer.log").read_text().strip().splitlines()[-1]
    assert last_line.startswith("student-trainer distill: error: teacher '")
    assert "stopped at step" in last_line and "--resume_from_checkpoint latest" in last_line
    done = train_log(output)[-1]["step"]
    assert f"checkpoint-{done}" in last_line
    assert (
        json.loads((output / f"checkpoint-{done}" / "trainer_state.json").read_text())["global_step"] == done
    )

    # the checkpoint does not care where the teachers run: finish the run with the in-process ones
    local = {role: f"local:{workspace[role]}" for role in ("small", "large")}
    local_argv = distill_argv(workspace["student"], workspace["train"], output, local, *FAULT_METHOD)
    resumed = run_in_process(local_argv + ["--resume_from_checkpoint", "latest"])
    assert resumed["global_step"] == 25
    assert [s["step"] for s in train_log(output)] == list(range(1, 26))
