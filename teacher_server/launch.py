"""Run ``teacher-server`` as a child process on loopback: the demo, benchmarks and local scripts.

A separate process is the honest way to measure and demonstrate the service: the trainer
then pays the real HTTP, serialisation and scheduling costs a remote deployment pays.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import httpx

from shared.children import stop, tied_to_this_process
from shared.errors import UserError
from shared.openmp import colocated_env, inherited_env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_until_ready(
    server: subprocess.Popen,
    ready_url: str,
    timeout_s: float,
    *,
    name: str = "teacher-server",
) -> None:
    """Poll a v2 readiness endpoint until 200; a one-line UserError if the process exits first or
    ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        if server.poll() is not None:
            raise UserError(f"{name} exited with code {server.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(ready_url, timeout=2.0, trust_env=False).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise UserError(f"{name} not ready after {timeout_s:.0f} s")
        time.sleep(0.2)


LOG_TAIL_CHARS = 400


def log_tail(path: Path, lines: int = 3) -> str:
    """The last non-empty ``lines`` of a log in one line (a traceback's last lines say why)."""
    text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
    tail = " | ".join([line.strip() for line in text.splitlines() if line.strip()][-lines:])
    return tail[-LOG_TAIL_CHARS:] or "(empty)"


@contextlib.contextmanager
def running(
    command: list[str],
    env: Mapping[str, str],
    ready_url: str,
    *,
    name: str,
    log_path: Path | None = None,
    ready_timeout_s: float = 180.0,
    tied: bool = True,
    stop_timeout_s: float = 30.0,
) -> Iterator[subprocess.Popen]:
    """``command``, a server, as a child process until the block ends, entered once ``ready_url``
    answers 200; a one-line UserError ending in its log's last lines if it exits or times out first.

    ``tied``: in a process group of its own that gets SIGTERM if this process dies, and stopped as a
    group (a server's helpers, vLLM's engine core or Ray's raylet, go too); else SIGTERM to it alone,
    SIGKILL after ``stop_timeout_s``. Either way a server shutting down cleanly finishes its
    in-flight requests first."""
    with open(log_path, "w") if log_path else contextlib.nullcontext(subprocess.DEVNULL) as log:
        server = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=dict(env),
            preexec_fn=tied_to_this_process() if tied else None,
        )  # fmt: skip
    try:
        try:
            wait_until_ready(server, ready_url, ready_timeout_s, name=name)
        except UserError as err:
            tail = f"; its log ({log_path}) ends: {log_tail(log_path)}" if log_path else ""
            raise UserError(f"{err}{tail}") from None
        yield server
    finally:
        stop(server, stop_timeout_s, group=tied)


@contextlib.contextmanager
def serve_in_subprocess(
    config_path: str | Path,
    *,
    port: int | None = None,
    log_path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    ready_timeout_s: float = 180.0,
    log_level: str = "info",
    tie_to_parent: bool = False,
    colocated: bool = True,
) -> Iterator[str]:
    """Start the service, yield its URL once ``/v2/health/ready`` answers 200, stop it gracefully.

    A port something already listens on is refused up front: the child binds only after loading
    its teachers, and until then the other server would answer the readiness poll (and every
    request after it) in the child's name. ``tie_to_parent``: the server runs in a process group of
    its own and gets SIGTERM if this process dies (:mod:`shared.children`). ``colocated``: the
    caller works beside the server (the demo, the experiment runner), so the server's OpenMP
    workers sleep when idle unless the environment sets a policy (:mod:`shared.openmp`); False
    leaves the server its own default (a benchmark of the service as shipped), even where this
    process chose ``PASSIVE`` for itself (``import student_trainer``).
    """
    if port and not port_is_free(port):
        raise UserError(f"port {port} on 127.0.0.1 is in use: choose another, or 0 for a free one")
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "teacher_server.cli", "--config", str(config_path)]
    command += ["--port", str(port), "--log_level", log_level]
    child_env = {**inherited_env(), **(env or {})}
    with running(
        command,
        colocated_env(child_env) if colocated else child_env,
        f"{url}/v2/health/ready",
        name="teacher-server",
        log_path=Path(log_path) if log_path else None,
        ready_timeout_s=ready_timeout_s,
        tied=tie_to_parent,
    ):
        yield url
