"""What the trainer's tests share: tiny data, a tiny pretrained student, argv builders, log readers."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import httpx
import torch
import yaml
from prometheus_client.parser import text_string_to_metric_families
from transformers import BertForSequenceClassification

from student_trainer.args.distill import parse_distill_args
from student_trainer.kd.config import SUPERVISIONS, TEACHER_SELECTIONS
from student_trainer.kd.selection import SELECTION_STRATEGIES
from student_trainer.train.checkpoint import list_checkpoints
from student_trainer.train.distill import distill
from tests.tiny_models import WORDS, save_tiny_tokenizer, tiny_config

REPO = Path(__file__).resolve().parents[1]
CONTENT_WORDS = [w for w in WORDS if w.isalpha()]

# every teacher selection × every supervision; data selection, KD loss and PT features rotate
METHODS = [
    (teacher, supervision, SELECTION_STRATEGIES[i % 5], ("kl", "mse")[i % 2], ("cls", "all-tokens")[i % 2])
    for i, (teacher, supervision) in enumerate(itertools.product(TEACHER_SELECTIONS, SUPERVISIONS))
]


def tiny_demo_config(
    path: Path, base: Path, *, data_dir: str | Path, num_train: int = 96, num_dev: int = 32, epochs: float = 1
) -> Path:
    """``experiments/demo.yaml`` shrunk to seconds: ``base`` (a tiny BERT) for every model, a tiny
    synthetic task in ``data_dir``, half the teachers' epochs, a 1-layer student."""
    config = yaml.safe_load((REPO / "experiments" / "demo.yaml").read_text())
    task = config["tasks"]["synthetic"]
    task["data_dir"] = str(data_dir)
    task["generate"].update(num_train=num_train, num_dev=num_dev)
    for teacher in config["teachers"].values():
        teacher.update(model=str(base), num_train_epochs=teacher["num_train_epochs"] / 2)
    config["student"] = {"model": str(base), "num_layers": 1}
    config["distill"].update(num_train_epochs=epochs, max_seq_length=32)
    path.write_text(yaml.safe_dump(config))
    return path


def write_sentences(path: Path, num_rows: int, seed: int, *, min_words: int = 2, max_words: int = 12) -> Path:
    """A ``sentence<TAB>label`` file of random whole-token sentences (lengths vary: padding matters)."""
    rng = random.Random(seed)
    lines = ["sentence\tlabel"]
    for _ in range(num_rows):
        words = [rng.choice(CONTENT_WORDS) for _ in range(rng.randint(min_words, max_words))]
        lines.append(f"{' '.join(words)}\t{rng.randint(0, 1)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def save_student(path: Path, *, num_layers: int = 3, dropout: float = 0.1, seed: int = 3) -> Path:
    """A tiny "pretrained" BERT (hidden 32) the student takes its first layers from."""
    torch.manual_seed(seed)
    config = tiny_config(
        num_layers=num_layers, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout
    )
    BertForSequenceClassification(config).save_pretrained(path)
    save_tiny_tokenizer(path)
    return path


def distill_argv(
    student: Path, train_file: Path, output_dir: Path, teachers: dict[str, str], *extra: str
) -> list[str]:
    """A quick run: 2-layer student, batches of 8, no evaluation or checkpoints unless ``extra`` asks."""
    argv = [
        "--model_name_or_path",
        str(student),
        "--student_num_layers",
        "2",
        "--train_file",
        str(train_file),
        "--output_dir",
        str(output_dir),
        "--per_device_train_batch_size",
        "8",
        "--max_steps",
        "3",
        "--learning_rate",
        "1e-3",
        "--logging_steps",
        "1",
        "--eval_strategy",
        "no",
        "--save_strategy",
        "no",
        "--disable_tqdm",
        "--seed",
        "7",
    ]
    for role, spec in teachers.items():
        argv += ["--teacher", f"{role}={spec}"]
    return argv + list(extra)


def run_in_process(argv: list[str]) -> dict:
    return distill(parse_distill_args(argv))


def run_cli(argv: list[str], *, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    """``student-trainer distill ...`` in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, "-m", "student_trainer.cli", "distill", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def run_torchrun(argv: list[str], processes: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node N student-trainer distill argv`` (gloo on CPU)."""
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(processes),
    ]
    return subprocess.run(
        [*launcher, str(Path(sys.executable).with_name("student-trainer")), "distill", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def kill_after_checkpoint(argv: list[str], output_dir: Path, step: int) -> None:
    """Start ``distill argv`` in a fresh interpreter and SIGKILL it once ``checkpoint-<step>`` is whole
    (renamed from ``.tmp-checkpoint-<step>`` once its checksums were written)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "student_trainer.cli", "distill", *argv],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while output_dir / f"checkpoint-{step}" not in list_checkpoints(output_dir):
        assert process.poll() is None, f"the run ended before checkpoint-{step}"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL


def service_metrics(url: str) -> dict[tuple[str, str], float]:
    """A service's own Prometheus ``/metrics``: ``(sample name, model) -> value``, summed over the
    other labels."""
    values: dict[tuple[str, str], float] = defaultdict(float)
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=5).text):
        for sample in family.samples:
            values[(sample.name, sample.labels.get("model", ""))] += sample.value
    return values


def train_log(output_dir: Path) -> list[dict]:
    """The per-step records of ``metrics.jsonl``."""
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record["event"] == "train"]


def expected_rows(teacher_selection: str, batch_size: int, ratio: float, strategy: str) -> dict[str, int]:
    """Rows each teacher must receive for one batch: ``n = int(B·r)``, hard split ⌊n/2⌋ / the rest."""
    n = batch_size if strategy == "none" else int(batch_size * ratio + 1e-9)
    if teacher_selection == "hard":
        return {"small": n // 2, "large": n - n // 2}
    if teacher_selection in ("small", "large"):
        return {teacher_selection: n, "small" if teacher_selection == "large" else "large": 0}
    return {"small": n, "large": n}


def checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every trained tensor of a checkpoint: student weights and projections."""
    from safetensors.torch import load_file

    tensors = dict(load_file(str(path / "model.safetensors")))
    projections = path / "projections.safetensors"
    if projections.exists():
        tensors.update({f"projections.{k}": v for k, v in load_file(str(projections)).items()})
    return tensors


class WrappedTeacher:
    """A teacher client that forwards everything to ``real``; tests override :meth:`infer`."""

    def __init__(self, real):
        self.real = real

    @property
    def info(self):
        return self.real.info

    async def start(self, ready_timeout_s: float):
        return await self.real.start(ready_timeout_s)

    async def infer(self, query):
        return await self.real.infer(query)

    async def aclose(self) -> None:
        await self.real.aclose()


class FlakyTeacher(WrappedTeacher):
    """A real in-process teacher that goes down for good after ``answers`` answers."""

    def __init__(self, real, answers: int):
        super().__init__(real)
        self.answers = answers

    async def infer(self, query):
        if self.answers == 0:
            raise ConnectionError("connection refused")
        self.answers -= 1
        return await self.real.infer(query)
