"""One OpenMP pool per process, or two: what a second pool costs a forward pass.

    python benchmarks/bench_teacher_thread.py [--rounds 3] [--threads 2] [--rows 8]

OpenMP keeps a pool of worker threads per *calling* thread. A teacher loaded and warmed up on one
thread and then run on another (what the service did before) leaves two pools on the same cores;
one thread doing it all leaves one. Each mode runs in its own process (pools live as long as the
process), in interleaved rounds: ``main`` (load and run on the main thread), ``one-thread`` (load,
warm up and run on one worker thread: the service now) and ``two-threads`` (load and warm up on
one thread, run on another). Median ms per pass of ``--rows`` SST-2 sentences; writes JSON.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from bench_server import ROOT, default_teacher, sentence_queries, write_report

MODES = ("main", "one-thread", "two-threads", "copy-beside", "serial-copy-beside")


def measure(mode: str, rows: int, threads: int) -> float:
    """Median ms per pass, in this process, laid out as ``mode`` says."""
    import torch  # imported here so that the parent process starts no OpenMP pool of its own

    from shared.openmp import serial_thread
    from teacher_engine.engine import TeacherEngine
    from teacher_server.config import TeacherConfig

    torch.set_num_threads(threads)
    teacher = default_teacher()
    queries = sentence_queries(teacher, rows, 40)

    def load() -> TeacherEngine:
        engine = TeacherEngine.from_config(TeacherConfig(name="t", path=teacher, max_seq_length=64))
        engine.run(queries[0])  # the warm-up pass, as the service does
        return engine

    def run(engine: TeacherEngine) -> float:
        times = []
        for query in queries:
            started = time.perf_counter()
            engine.run(query)
            times.append(time.perf_counter() - started)
        return 1000 * statistics.median(times[5:])

    def copy() -> None:
        if mode == "serial-copy-beside":
            serial_thread()
        torch.ones(4_000_000).mul(2)

    if mode == "main":
        return run(load())
    with ThreadPoolExecutor(1) as first, ThreadPoolExecutor(1) as second:
        engine = first.submit(load).result()
        if mode.endswith("copy-beside"):
            second.submit(copy).result()
        return (second if mode == "two-threads" else first).submit(run, engine).result()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # a child process's one mode
    parser.add_argument("--output", default=str(ROOT / "runs" / "bench_teacher_thread.json"))
    args = parser.parse_args()
    if args.mode:
        print(measure(args.mode, args.rows, args.threads))
        return 0
    samples: dict[str, list[float]] = {mode: [] for mode in MODES}
    for number in range(args.rounds):
        for mode in MODES if number % 2 == 0 else reversed(MODES):
            child = [sys.executable, __file__, "--mode", mode, "--rows", str(args.rows)]
            child += ["--threads", str(args.threads)]
            out = subprocess.run(child, capture_output=True, text=True, check=True).stdout
            samples[mode].append(float(out.strip().splitlines()[-1]))
            print(f"  round {number} {mode:<18} {samples[mode][-1]:6.1f} ms", flush=True)
    for mode, values in samples.items():
        print(f"{mode:<18} median {statistics.median(values):6.1f} ms per pass of {args.rows} rows")
    report = {
        "command": " ".join(["python benchmarks/bench_teacher_thread.py", *sys.argv[1:]]),
        "settings": vars(args),
        "load_average": os.getloadavg(),
        "samples_ms": samples,
        "medians_ms": {mode: statistics.median(values) for mode, values in samples.items()},
    }
    write_report(report, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
