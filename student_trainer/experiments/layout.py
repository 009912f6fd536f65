"""Where an experiment's files live: small results (committed) apart from bulky work files."""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def run_id(task: str, method: str, seed: int) -> str:
    return f"{task}/{method}/seed{seed}"


def write_json(path: Path, data: Any) -> None:
    """Write atomically (a kill mid-write leaves the old file or none, never half of one). The
    partial file's name is the writer's own: grid shards side by side may write the same record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        partial.write_text(json.dumps(data, indent=1, default=str) + "\n", encoding="utf-8")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def portable(data: Any, names: dict[str, str]) -> Any:
    """``data`` with each string that is one of ``names``' paths, or lies under one, named by its
    stand-in (``/home/me/work/runs/x`` -> ``{work}/runs/x``, ``large=/home/me/work/p.yaml`` ->
    ``large={work}/p.yaml`` as a ``NAME=PATH`` flag gives it): results to commit hold no machine path."""
    if isinstance(data, dict):
        return {key: portable(value, names) for key, value in data.items()}
    if isinstance(data, list):
        return [portable(value, names) for value in data]
    if isinstance(data, str):
        role, sep, value = data.partition("=")
        prefix, text = (role + sep, value) if sep and "/" not in role else ("", data)
        for path, name in names.items():
            if text == path or text.startswith(path + "/"):
                return prefix + name + text[len(path) :]
    return data


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing): grid shards running side by side
    wait for one another instead of fine-tuning the same teacher twice or losing a record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass(frozen=True)
class Layout:
    """``results``: what the report reads (commit it); ``work``: checkpoints and logs (ignored);
    ``teachers``: fine-tuned teachers, shared by every experiment that asks for the same one."""

    results: Path
    work: Path
    teachers: Path

    write_json = staticmethod(write_json)

    def run_results(self, task: str, method: str, seed: int) -> Path:
        return self.results / "runs" / run_id(task, method, seed)

    def is_done(self, task: str, method: Any, seed: int) -> bool:
        name = getattr(method, "name", method)
        return (self.run_results(task, name, seed) / "results.json").exists()

    def run_work_dir(self, task: str, method: str, seed: int) -> Path:
        return self.work / "runs" / run_id(task, method, seed)

    def task_work_dir(self, task: str) -> Path:
        return self.work / "service" / task

    def teacher_dir(self, task: str, model: str, key: str) -> Path:
        """Named by what the teacher is, not the role it plays: the same fine-tuned MiniLM is the
        ``large`` teacher of one experiment and the ``small`` one of another, made once."""
        return self.teachers / f"{task}-{Path(model).name}-{key}"

    def teacher_record(self, task: str, role: str) -> Path:
        return self.results / "teachers" / f"{task}-{role}.json"

    def task_record(self, task: str) -> Path:
        return self.results / "tasks" / f"{task}.json"

    def save_run(self, task: str, method: str, seed: int, **files: Any) -> None:
        """results.json last: its presence is what marks the run done."""
        folder = self.run_results(task, method, seed)
        for name in sorted(files, key=lambda n: n == "results"):
            write_json(folder / f"{name}.json", files[name])

    def service_records(self, task: str) -> list[dict[str, Any]]:
        """The counters of each teacher-server that served ``task``, oldest first."""
        path = self.results / "service" / f"{task}.json"
        return json.loads(path.read_text()) if path.exists() else []

    def append_service_record(self, task: str, record: dict[str, Any]) -> None:
        with locked(self.work / "locks" / f"service-{task}.lock"):
            write_json(self.results / "service" / f"{task}.json", [*self.service_records(task), record])
