"""OpenMP's wait policy: a teacher's forward pass with and without a busy neighbour process.

    python benchmarks/bench_wait_policy.py [--rounds 2] [--rows 3,32] [--threads 2]
                                           [--policies unset,PASSIVE,spin:10000]

libgomp's default (``OMP_WAIT_POLICY`` unset) lets idle workers spin while a process's threads fit
the cores. Alone on the machine that is quick; beside another busy process (the trainer beside
the service, an experiment beside both) a spinning worker holds a core that its team's master
needs. ``PASSIVE`` workers sleep. Each (policy, neighbour) runs in its own process laid out as
the service runs a teacher (loaded, warmed up and run on one worker thread), in interleaved
rounds; the neighbour is a process multiplying matrices on ``--threads`` threads. ``spin:N`` is
the default policy with ``GOMP_SPINCOUNT=N`` (workers spin N iterations, then sleep). Median ms per
pass of ``--rows`` SST-2 sentences; writes JSON. ``teacher-server`` and ``student-trainer``
default to ``PASSIVE`` (see ``shared/openmp.py``).
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


def measure(rows: list[int], threads: int) -> dict[int, float]:
    """Median ms per pass for each row count, in this process (torch loaded before anything else,
    so libgomp sees the environment this process was started with)."""
    import torch

    torch.set_num_threads(threads)
    from bench_server import default_teacher, load_sentences, pad
    from transformers import AutoTokenizer

    from shared.teacher_api import TeacherQuery
    from teacher_server.batcher import teacher_thread
    from teacher_server.config import TeacherConfig
    from teacher_server.engine import TeacherEngine

    teacher = default_teacher()
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    sentences, _ = load_sentences(max(rows) * 12)
    encoded = [tokenizer(s, truncation=True, max_length=64)["input_ids"] for s in sentences]
    thread = teacher_thread("t")
    engine = thread.submit(TeacherEngine.from_config, TeacherConfig(name="t", path=teacher)).result()
    medians = {}
    for count in rows:
        queries = [TeacherQuery(*pad(encoded[i * count : (i + 1) * count]), None) for i in range(12)]
        times = []
        for query in queries:
            started = time.perf_counter()
            thread.submit(engine.run, query).result()
            times.append(time.perf_counter() - started)
        medians[count] = 1000 * statistics.median(times[2:])  # the first two warm up
    thread.shutdown()
    return medians


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rows", default="3,32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--policies", default="unset,PASSIVE", help="unset, PASSIVE, ACTIVE or spin:N")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one measurement
    parser.add_argument("--output", default=str(ROOT / "runs" / "bench_wait_policy.json"))
    args = parser.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    if args.child:
        print(" ".join(f"{ms:.2f}" for ms in measure(rows, args.threads).values()))
        return 0
    cells = [(policy, kind) for kind in NEIGHBOURS for policy in args.policies.split(",")]
    samples: dict[str, list[list[float]]] = {f"{p}/{k}": [] for p, k in cells}
    for number in range(args.rounds):
        for policy, kind in cells if number % 2 == 0 else reversed(cells):
            child = [sys.executable, __file__, "--child", "--rows", args.rows, "--threads", str(args.threads)]
            with neighbour(kind, args.threads):
                out = subprocess.run(child, env=child_env(policy), capture_output=True, text=True, check=True)
            values = [float(v) for v in out.stdout.split()]
            samples[f"{policy}/{kind}"].append(values)
            shown = " ".join(f"{v:8.1f}" for v in values)
            print(f"  round {number} {policy:<11} neighbour {kind:<5} {shown}", flush=True)
    medians = {cell: [statistics.median(c) for c in zip(*got, strict=True)] for cell, got in samples.items()}
    print(f"\n{'policy':<11} {'neighbour':<9} " + " ".join(f"{f'{r} rows ms':>11}" for r in rows))
    for cell, values in medians.items():
        policy, kind = cell.split("/")
        print(f"{policy:<11} {kind:<9} " + " ".join(f"{v:11.1f}" for v in values))
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
