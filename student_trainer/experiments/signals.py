"""SIGINT/SIGTERM to the experiment runner: the run in flight gets the signal (``distill``
checkpoints and exits 130), the runner then stops its teachers' servers (teacher-server, or vLLM
with its engine core) and exits 130 itself, and the same command resumes. Children run in process
groups of their own (:mod:`shared.children`), so the signal reaches them once, through the runner,
even when a terminal sends it to the whole group.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import IO, Any

from shared.children import tied_to_this_process

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _InFlight:
    child: subprocess.Popen | None = None
    received: int | None = None


_STATE = _InFlight()


def _forward(sig: int, _frame: Any) -> None:
    """The child in flight gets the signal (each one: a second stops ``distill`` at once); with none
    in flight the runner stops here."""
    first = _STATE.received is None
    _STATE.received = sig
    child = _STATE.child
    if child is not None and child.poll() is None:
        if first:
            print(f"[experiment] {signal.Signals(sig).name}: stopping once the run in flight has saved "
                  "its state; the same command resumes", file=sys.stderr, flush=True)  # fmt: skip
        child.send_signal(sig)
    elif first:
        raise KeyboardInterrupt


@contextmanager
def forwarding_signals() -> Iterator[None]:
    """Handle SIGINT/SIGTERM as the module says while the grid runs (even if the shell that started
    the runner in the background set SIGINT to be ignored)."""
    previous = {sig: signal.signal(sig, _forward) for sig in SIGNALS}
    _STATE.received = None
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def call(argv: list[str], *, stdout: IO[str], env: Mapping[str, str]) -> int:
    """``subprocess.call`` of a child tied to the runner; KeyboardInterrupt once it has exited, if a
    signal came meanwhile."""
    child = subprocess.Popen(
        argv, stdout=stdout, stderr=subprocess.STDOUT, env=env, preexec_fn=tied_to_this_process()
    )
    _STATE.child = child
    try:
        code = child.wait()
    finally:
        _STATE.child = None
    if _STATE.received is not None:
        raise KeyboardInterrupt
    return code
