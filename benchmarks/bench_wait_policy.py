"""OpenMP's wait policy: a teacher's forward pass with and without a busy neighbour process.

    python benchmarks/bench_wait_policy.py [--passes 24] [--rows 3,32] [--threads 2]
                                           [--policies PASSIVE,spin:1000,unset] [--gap_ms 50]

libgomp's default (``OMP_WAIT_POLICY`` unset) lets idle workers spin while a process's threads fit
the cores. Alone on the machine that is quick; beside another busy process (the trainer beside
the service, an experiment beside both) a spinning worker holds a core that its team's master
needs. ``PASSIVE`` workers sleep, and wake for every parallel region: on a virtual machine whose
idle cores the host takes back, a wake-up is slow. ``spin:N`` is the default policy with
``GOMP_SPINCOUNT=N`` (workers spin N iterations, then sleep): long enough to span the gaps
between the regions of one pass, short enough to sleep between passes.

Each (policy, threads) cell is its own process, laid out as the service runs a teacher (loaded,
warmed up and run on one worker thread), kept for the whole run; the passes go round-robin
across the cells, ``--gap_ms`` apart (a trainer's step between two teacher passes), so the host's
drift hits every cell alike. The neighbour is a process multiplying matrices on the most threads
of any cell. Median ms per pass of ``--rows`` SST-2 sentences; writes JSON. ``ACTIVE`` workers
never sleep and would slow every other cell: measure it alone. Who chooses which policy:
``shared/openmp.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator

from bench_server import ROOT, write_report

NEIGHBOURS = ("none", "busy")
BUSY = "import torch; a = torch.randn(512, 512)\nwhile True: a @ a"


def serve_passes(rows: list[int], threads: int) -> None:
    """A child: load a teacher, then answer each stdin line ``R`` with the ms of one pass of R rows
    (torch loaded here, after the parent set this process's environment, so libgomp sees it)."""
    import torch

    torch.set_num_threads(threads)
    from bench_server import default_teacher, sentence_queries

    from teacher_engine.engine import TeacherEngine
    from teacher_server.batcher import compute_thread
    from teacher_server.config import TeacherConfig

    teacher = default_teacher()
    queries = {r: sentence_queries(teacher, r, 12) for r in rows}
    thread = compute_thread("cpu")
    engine = thread.submit(TeacherEngine.from_config, TeacherConfig(name="t", path=teacher)).result()
    for count in rows:  # warm-up
        thread.submit(engine.run, queries[count][0]).result()
    print("ready", flush=True)
    for number, line in enumerate(sys.stdin):
        query = queries[int(line)][number % 12]
        started = time.perf_counter()
        thread.submit(engine.run, query).result()
        print(f"{1000 * (time.perf_counter() - started):.3f}", flush=True)
    thread.shutdown()


@contextlib.contextmanager
def neighbour(kind: str, threads: int) -> Iterator[None]:
    """A process keeping ``threads`` cores busy for the duration (``none``: nothing)."""
    if kind == "none":
        yield
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    busy = subprocess.Popen([sys.executable, "-c", BUSY], env=env)
    try:
        time.sleep(2)  # let it reach its loop
        yield
    finally:
        busy.kill()
        busy.wait()


def child_env(policy: str) -> dict[str, str]:
    env = {
        key: value for key, value in os.environ.items() if key not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
    }
    if policy.startswith("spin:"):
        return {**env, "GOMP_SPINCOUNT": policy.removeprefix("spin:")}
    return env if policy == "unset" else {**env, "OMP_WAIT_POLICY": policy}


@contextlib.contextmanager
def cell_processes(cells: list[tuple[str, int]], rows: str) -> Iterator[dict[str, subprocess.Popen]]:
    """One child per (policy, threads), each ready to run passes."""
    children = {}
    try:
        for policy, threads in cells:
            command = [sys.executable, __file__, "--child", "--rows", rows, "--threads", str(threads)]
            children[f"{policy}, {threads} threads"] = subprocess.Popen(
                command, env=child_env(policy), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
            )
        for child in children.values():
            assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        yield children
    finally:
        for child in children.values():
            child.kill()
            child.wait()


def one_pass(child: subprocess.Popen, rows: int) -> float:
    assert child.stdin is not None and child.stdout is not None
    child.stdin.write(f"{rows}\n")
    child.stdin.flush()
    return float(child.stdout.readline())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--passes", type=int, default=24, help="timed passes per cell, rows and neighbour")
    parser.add_argument("--rows", default="3,32")
    parser.add_argument("--threads", default="2", help="torch threads per cell, comma-separated")
    parser.add_argument("--policies", default="PASSIVE,spin:1000,unset", help="unset, PASSIVE or spin:N")
    parser.add_argument("--gap_ms", type=float, default=50.0, help="idle time before each pass")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one cell's process
    parser.add_argument("--output", default=str(ROOT / "runs" / "bench_wait_policy.json"))
    args = parser.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    if args.child:
        serve_passes(rows, threads[0])
        return 0
    cells = [(policy, t) for policy in args.policies.split(",") for t in threads]
    samples: dict[str, dict[str, list[float]]] = {}
    for kind in NEIGHBOURS:
        with neighbour(kind, max(threads)), cell_processes(cells, args.rows) as children:
            for count in rows:
                got: dict[str, list[float]] = {name: [] for name in children}
                names = list(children)
                for number in range(args.passes):
                    first = number % len(names)
                    for name in names[first:] + names[:first]:  # round-robin, each time from another cell
                        time.sleep(args.gap_ms / 1000)
                        got[name].append(one_pass(children[name], count))
                for name, values in got.items():
                    samples[f"{name} / {kind} / {count} rows"] = values
                    median = statistics.median(values)
                    print(f"  {name:<22} neighbour {kind:<5} {count:>3} rows {median:8.1f} ms", flush=True)
    medians = {cell: statistics.median(values) for cell, values in samples.items()}
    report = {
        "command": " ".join(["python benchmarks/bench_wait_policy.py", *sys.argv[1:]]),
        "settings": vars(args),
        "load_average": os.getloadavg(),
        "samples_ms": samples,
        "medians_ms": medians,
    }
    write_report(report, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
