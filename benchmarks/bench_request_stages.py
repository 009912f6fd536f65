"""Where one request's time goes: the service's stages, in CPU milliseconds and shares.

    python benchmarks/bench_request_stages.py [--threads 1] [--requests 150] [--rounds 2]

The load of ``bench_peers.py`` (requests of 8 raw SST-2 dev sentences, text in, logits out, the
MiniLM-L6 classifier, output cache off) from one client. Two views:

* the served process, driven over HTTP: CPU time per request of its event-loop thread (HTTP,
  JSON, tokenizing, the batcher, encoding), of its busiest other thread (the teacher's: forward
  passes) and of the rest, beside the client's own CPU time and the wall time per request, with
  the seconds the service's metrics count in passes and in the infer route;
* in process, each stage of the infer path alone (``time.thread_time``): decoding the body,
  tokenizing, admission (validation, cache lookup), merging rows, the pass, its metrics,
  scattering the answer, encoding the response; then the same stages with no pass between
  requests (one answer reused): what they cost when a pass has not just run through the caches.

CPU time is what to compare on a machine shared with other work: a busy neighbour stretches wall
times by 1.5-3x but a thread's own CPU time far less. Medians over ``--rounds``; writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import psutil
import torch
from bench_peers import V2, classifier_checkpoint, drive, load_dev_sentences, request_bodies, served_ours
from bench_server import ROOT, default_teacher, write_report

from shared.teacher_api import TeacherQuery
from teacher_engine.engine import TeacherEngine, right_aligned
from teacher_server import v2_adapter
from teacher_server.batcher import DynamicBatcher, Row
from teacher_server.cache import OutputCache
from teacher_server.config import TeacherConfig
from teacher_server.metrics import ServiceMetrics

METRICS = ("teacher_request_seconds", "teacher_batch_compute_seconds")


def scrape(url: str) -> dict[str, float]:
    """The sums and counts of the request and pass histograms."""
    values: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", trust_env=False).text.splitlines():
        name = line.partition("{")[0].partition(" ")[0]
        if name.removesuffix("_sum").removesuffix("_count") in METRICS and not line.startswith("#"):
            values[name] = values.get(name, 0.0) + float(line.split()[-1])
    return values


def thread_cpu(process: psutil.Process) -> dict[int, float]:
    """CPU seconds of each of ``process``'s threads."""
    return {t.id: t.user_time + t.system_time for t in process.threads()}


def served_stages(url: str, server: psutil.Process, bodies: list[bytes]) -> dict[str, float]:
    """One client sends every body once: ms per request of each thread's CPU, the client's, the wall."""
    asyncio.run(drive(url, V2, bodies[:10], 1))  # warm-up: connections, lazy initialisation
    metrics, threads, client = scrape(url), thread_cpu(server), time.process_time()
    started = time.perf_counter()
    asyncio.run(drive(url, V2, bodies, 1))
    wall = time.perf_counter() - started
    client = time.process_time() - client
    after, spent = scrape(url), thread_cpu(server)
    used = {tid: seconds - threads.get(tid, 0.0) for tid, seconds in spent.items()}
    loop = used.pop(server.pid, 0.0)
    teacher = max(used, key=lambda tid: used[tid])
    count = len(bodies)
    per_request = {
        "server event loop": loop,
        "server teacher thread": used.pop(teacher),
        "server other threads": sum(used.values()),
        "client": client,
    }
    ms = {f"{name} cpu_ms": 1000 * seconds / count for name, seconds in per_request.items()}
    for name in METRICS:
        ms[f"{name} wall_ms"] = 1000 * (after[f"{name}_sum"] - metrics[f"{name}_sum"]) / count
    return {**ms, "wall_ms": 1000 * wall / count}


def in_process_stages(
    engine: TeacherEngine, config: TeacherConfig, bodies: list[bytes], *, passes: bool = True
) -> dict[str, float]:
    """ms of CPU per request of each stage of the infer path, run alone on this thread. Without
    ``passes`` the first request's answer serves every request (all are 8 rows, logits only) and no
    pass runs between them: the same stages on caches a pass has not just flushed."""
    spent: dict[str, float] = {}

    def timed(stage: str, work: Callable, *args: object) -> object:
        started = time.thread_time()
        result = work(*args)
        spent[stage] = spent.get(stage, 0.0) + time.thread_time() - started
        return result

    async def run_all() -> None:
        batcher = DynamicBatcher(engine, config, cache=OutputCache(0), metrics=ServiceMetrics())
        answer = None
        for body in bodies:
            decoded = timed("decode body", v2_adapter.parse, body, None, engine, config)
            call = timed("tokenize", v2_adapter.to_call, decoded, engine, config)
            request = timed("admit", admit, batcher, call.query)
            rows = [Row(request, i, n) for i, n in enumerate(request.lengths)]
            query = timed("merge rows", batcher._merge, rows, request.spec)
            if passes or answer is None:
                answer = timed("forward pass", engine.compute, query)
            timed("pass metrics", batcher._record_pass, rows, [request], answer, 0.0)
            timed("scatter", batcher._scatter, rows, [request], request.spec, answer, 0.0)
            timed("encode response", v2_adapter.encode, "teacher", call, request.future.result())

    asyncio.run(run_all())
    if not passes:
        del spent["forward pass"]  # the one pass that made the answer reused
    return {f"{stage} cpu_ms": 1000 * seconds / len(bodies) for stage, seconds in spent.items()}


def admit(batcher: DynamicBatcher, query: TeacherQuery) -> Any:
    """What :meth:`DynamicBatcher.infer` does before a request queues: validate, split, look up."""
    batcher.engine.validate(query)
    return batcher._prepare(right_aligned(query)[0])


def table(title: str, rows: dict[str, float], total_key: str | None = None) -> str:
    """ms per stage and its share of the CPU stages' sum."""
    cpu = {name: ms for name, ms in rows.items() if name.endswith("cpu_ms")}
    total = sum(cpu.values())
    lines = [title]
    for name, ms in rows.items():
        share = f"{ms / total:6.1%}" if name in cpu else "      "
        lines.append(f"  {name.removesuffix(' cpu_ms'):<44} {ms:8.2f} ms {share}")
    lines.append(f"  {'sum of the CPU stages':<44} {total:8.2f} ms")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", default=None, help="checkpoint dir (default: the pretrained MiniLM-L6)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server and in process")
    parser.add_argument("--requests", type=int, default=150, help="requests of 8 sentences per round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of both views; medians reported")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "peers", help="the saved classifier")
    parser.add_argument("--output", default=str(ROOT / "runs" / "bench_request_stages.json"))
    args = parser.parse_args(argv)
    teacher = classifier_checkpoint(args.teacher or default_teacher(), args.cache)
    sentences, source = load_dev_sentences(args.requests * 8)
    bodies = request_bodies(sentences)
    served_args = SimpleNamespace(
        teacher=teacher, max_seq_length=128, max_batch_size=64, max_batch_tokens=4096, device="cpu"
    )
    config = TeacherConfig(name="teacher", path=teacher, max_seq_length=128, max_batch_tokens=4096)
    torch.set_num_threads(args.threads)
    engine = TeacherEngine.from_config(config)
    served: list[dict[str, float]] = []
    alone: list[dict[str, float]] = []
    no_pass_between: list[dict[str, float]] = []
    for _ in range(args.rounds):
        with served_ours(served_args, args.threads, {}) as url:
            (server,) = [p for p in psutil.Process().children() if "teacher_server.cli" in p.cmdline()]
            served.append(served_stages(url, server, bodies))
        alone.append(in_process_stages(engine, config, bodies))
        no_pass_between.append(in_process_stages(engine, config, bodies, passes=False))
    medians = [
        {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
        for rounds in (served, alone, no_pass_between)
    ]
    print(table(f"served, 1 client, {args.threads} thread(s), per request:", medians[0]))
    print(table("in process, each stage alone, per request:", medians[1]))
    print(table("in process, the same stages with no pass between requests:", medians[2]))
    load = os.getloadavg()[0]
    print(f"1-minute load average {load:.1f} on {os.cpu_count()} CPUs")
    report = {
        "command": " ".join(["python benchmarks/bench_request_stages.py", *(argv or sys.argv[1:])]),
        "sentences": source,
        "load_average_after": load,
        "settings": {k: str(v) for k, v in vars(args).items()},
        "served_median": medians[0],
        "in_process_median": medians[1],
        "no_pass_between_median": medians[2],
        "served_rounds": served,
        "in_process_rounds": alone,
        "no_pass_between_rounds": no_pass_between,
    }
    write_report(report, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
