"""A server process a test starts (vLLM, KServe: each in a venv of its own) and always stops."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def server_process(
    command: list[str], ready_url: str, log_path: Path, *, timeout_s: float, env: dict[str, str] | None = None
) -> Iterator[None]:
    """Run ``command`` in a process group of its own until ``ready_url`` answers 200 (at most
    ``timeout_s``, its log shown if it dies first); stop the whole group afterwards."""
    with log_path.open("w") as log:
        server = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            assert server.poll() is None, f"{command[1]} exited: {log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"{command[1]} not ready after {timeout_s} s"
            try:
                if httpx.get(ready_url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
