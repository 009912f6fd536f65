"""OpenMP's wait policy, chosen by whoever puts busy processes on the same cores, and which
threads of a process may start a team of workers.

libgomp reads ``OMP_WAIT_POLICY`` once, when torch is imported. By default, while a process's
threads fit the cores, an idle worker spins (up to 300k iterations) instead of sleeping. Alone on
its cores that is the fast choice: sleeping (``PASSIVE``) workers wake for every parallel region,
which costs a packed pass 17-28 % (its many short regions). Beside any other busy process on the
same cores (the trainer beside the service, an experiment beside both) a spinning worker holds a
core while the master of its team waits for one, and a pass takes up to 22x longer than with
``PASSIVE``; a bounded spin (``GOMP_SPINCOUNT=10000``) still loses 2x there, and one of 1,000 shows
no consistent gain alone (``python benchmarks/bench_wait_policy.py --policies unset,PASSIVE,spin:10000``).

No spin count is right in both places, and a process cannot know at start what will run beside
it (a trainer may start later); whoever co-locates does. So ``teacher-server`` keeps OpenMP's
default (a server is usually alone on its cores), and what puts work beside it asks for
``PASSIVE``: ``student-trainer`` for itself
and its in-process teacher, :func:`teacher_server.launch.serve_in_subprocess` (the demo, the
experiment runner) for the server it starts beside itself, the CPU compose file for a server beside
its trainer. A policy the user set is always kept, one this process chose for itself is not passed
on to a server it starts (that server's launcher decides), and a server that finds its cores already
busy at start says so (:func:`busy_cores_warning`).

libgomp keeps a pool of workers per thread that starts a parallel region, and once a process holds
more workers than cores it cuts every idle worker's spin to almost nothing: a second pool beside a
teacher's (one large copy on the event loop is enough) made every later pass of MiniLM-L6 1.3x
slower at 2 threads, for good. So a server runs each device's passes on one thread and calls
:func:`serial_thread` on every other thread that touches tensors.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Mapping

POLICY = "OMP_WAIT_POLICY"
PASSIVE = "PASSIVE"
_injected = False  # whether os.environ's policy is prefer_passive_wait's, not the user's


def prefer_passive_wait() -> None:
    """Make this process's OpenMP workers sleep when idle, unless the environment says otherwise
    (call it before anything imports torch)."""
    global _injected
    if POLICY not in os.environ:
        os.environ[POLICY] = PASSIVE
        _injected = True


def inherited_env() -> dict[str, str]:
    """This process's environment for a child server, less a policy :func:`prefer_passive_wait` chose
    for this process alone (the child's launcher decides its own); a policy the user set stays."""
    env = dict(os.environ)
    if _injected and env.get(POLICY) == PASSIVE:
        del env[POLICY]
    return env


def colocated_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` for a child that shares its cores with busy work: ``PASSIVE`` unless a policy is set."""
    return {POLICY: PASSIVE, **env}


def busy_cores_warning(environ: Mapping[str, str], load: float, cores: int) -> str | None:
    """One line for a process about to spin on cores that are busy already (a 1-minute load average
    of at least one per core); None where a policy is set or the cores have room."""
    if POLICY in environ or load < cores:
        return None
    return (
        f"the load average is {load:.1f} on {cores} cores and OpenMP's idle workers spin: beside busy "
        f"work a pass can take many times longer; set {POLICY}={PASSIVE} to make them sleep"
    )


def serial_thread() -> None:
    """Make torch's CPU operators run on the calling thread alone, so it never starts a pool of
    OpenMP workers of its own; other threads keep their count. Where no OpenMP runtime is loaded
    (another platform, a torch built without it) there is no pool to avoid and nothing is done."""
    import torch

    torch.get_num_threads()  # torch sets each thread's count on its first use: before, not after
    for runtime in _openmp_runtimes():
        runtime.omp_set_num_threads(1)  # this thread's own setting (OpenMP's per-thread nthreads)


@functools.cache
def _openmp_runtimes() -> tuple[ctypes.CDLL, ...]:
    """The OpenMP runtimes loaded in this process (GNU's, torch's; Intel's, if another library
    brought it), found in its memory map (Linux)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/libgomp" in line or "/libiomp" in line}
    except OSError:
        return ()
    return tuple(ctypes.CDLL(path) for path in sorted(paths))
