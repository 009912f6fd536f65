"""Child processes tied to their parent: a process group of their own, and SIGTERM if it dies.

A group of its own keeps a terminal's Ctrl-C (sent to the whole foreground group) from reaching the
child beside its parent, so the parent decides what the child gets, once, and lets the parent stop
the child with every process it started (:func:`stop`). ``PR_SET_PDEATHSIG``
(Linux) sends the child SIGTERM when the parent dies without stopping it (a SIGKILL included), so
nothing is left running; elsewhere only the group is set.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import signal
import subprocess
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def tied_to_this_process() -> Callable[[], None]:
    """A ``preexec_fn`` for :class:`subprocess.Popen` that ties the child to the calling process."""
    parent = os.getpid()
    prctl = ctypes.CDLL(None).prctl if sys.platform.startswith("linux") else None  # loaded before fork

    def setup() -> None:
        os.setpgid(0, 0)
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl: no signal will come
            os.kill(os.getpid(), signal.SIGTERM)

    return setup


def stop(child: subprocess.Popen, timeout_s: float = 30.0, *, group: bool = True) -> None:
    """SIGTERM to ``child`` (with ``group``, to the process group it leads), then SIGKILL to what is
    left once it has exited (or after ``timeout_s``): a server's helpers (vLLM's engine core, Ray's
    raylet) go with it, and a leader that shut down cleanly has already stopped them."""
    send = functools.partial(os.killpg, child.pid) if group else child.send_signal
    with contextlib.suppress(ProcessLookupError):
        send(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.wait(timeout=timeout_s)
    with contextlib.suppress(ProcessLookupError):
        send(signal.SIGKILL)  # a lone child that exited is not signalled again (Popen knows)
    child.wait()
