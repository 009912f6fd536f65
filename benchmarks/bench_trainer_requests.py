"""A trainer's teacher requests, one at a time: through `teacher-server` vs the in-process engine.

    python benchmarks/bench_trainer_requests.py [--rows 3,32] [--overheads 8,32] [--requests 16]

What dynamic KD sends: ``R`` rows picked from a batch of 32 SST-2 training sentences, padded to
the batch's longest (r = 0.1 of 32 is 3 rows, r = 1 all 32), token ids in, logits out, one request
at a time, output cache off. The in-process engine (``local:``) runs each query as one pass; the
service plans its own passes with each candidate ``pass_overhead_tokens`` (rounds interleaved:
service, one server per overhead, then in-process; twice, the second time reversed). Within a
round the row counts take turns, request by request, so the host's drift (up to 3x within minutes
on a shared VM) hits them alike. Reported per row count: median ms a request (client side), the
server's compute and queue ms, what a request costs outside the pass (client side minus the
server's compute and queue: the trainer's client, HTTP, the server's handler and batcher; median
of the per-request differences), padded tokens; then per backend the median over turns of the
fewest rows' time over the most rows' (the teacher time of a step at r = 0.1 over one at r = 1,
when the row counts are 3 and 32). Writes JSON (``--output``).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
from pathlib import Path

# first: importing student_trainer makes OpenMP's idle workers sleep (shared/openmp.py), and libgomp
# reads that once, when torch loads; imported after torch, this process would spin as the default does
import student_trainer  # noqa: F401

# isort: split
import torch
import yaml
from bench_kd import save_teacher
from bench_server import ROOT, load_sentences, write_report
from transformers import AutoTokenizer

from shared.teacher_api import TeacherQuery
from student_trainer.teachers.client import make_teacher_client
from teacher_server.launch import serve_in_subprocess


def trainer_queries(teacher: Path, rows: int, count: int, seed: int) -> list[TeacherQuery]:
    """``rows`` random rows of random batches of 32, padded as the trainer's batch was."""
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    sentences, _ = load_sentences(4000)
    rng = random.Random(seed)
    queries = []
    for _ in range(count):
        batch = tokenizer(rng.sample(sentences, 32), padding=True, truncation=True, return_tensors="pt")
        pick = torch.tensor(rng.sample(range(32), rows))
        ids, mask, types = (batch[k][pick] for k in ("input_ids", "attention_mask", "token_type_ids"))
        queries.append(TeacherQuery(ids, mask, types, use_cache=False))
    return queries


async def timed(spec: str, queries: dict[int, list[TeacherQuery]]) -> dict[int, list[dict[str, float]]]:
    """Every query once untimed (warm-up), then once timed, the row counts taking turns."""
    client = make_teacher_client(spec, name="large")
    await client.start()
    turns = list(zip(*queries.values(), strict=True))
    for turn in turns:
        for query in turn:
            await client.infer(query)
    samples: dict[int, list[dict[str, float]]] = {rows: [] for rows in queries}
    for number, turn in enumerate(turns):
        for rows, query in list(zip(queries, turn, strict=True))[:: 1 if number % 2 == 0 else -1]:
            started = asyncio.get_running_loop().time()
            answer = await client.infer(query)
            samples[rows].append({
                "ms": 1000 * (asyncio.get_running_loop().time() - started),
                "compute_ms": answer.timings.compute_us / 1000,
                "queue_ms": answer.timings.queue_us / 1000,
                "padded_tokens": answer.padded_tokens,
            })  # fmt: skip
    await client.aclose()
    return samples


def run_backend(
    backend: str, teacher: Path, work: Path, queries: dict[int, list[TeacherQuery]]
) -> dict[int, list[dict]]:
    if backend == "in-process":
        return asyncio.run(timed(f"local:{teacher}", queries))
    overhead = int(backend.rsplit(" ", 1)[1])
    config = work / f"overhead-{overhead}.yaml"
    entry = {"name": "large", "path": str(teacher), "max_seq_length": 128, "pass_overhead_tokens": overhead}
    config.write_text(yaml.safe_dump({"cache_max_bytes": 0, "teachers": [entry]}))
    with serve_in_subprocess(config, log_path=work / f"server-{overhead}.log") as url:
        return asyncio.run(timed(url, queries))


def print_cells(rows: int, cells: dict[str, list[dict]], requests: int) -> None:
    print(f"\n{rows} rows a request ({requests} requests x 2 rounds), medians:")
    for backend, samples in cells.items():
        median = {key: statistics.median(s[key] for s in samples) for key in samples[0]}
        outside = statistics.median(s["ms"] - s["compute_ms"] - s["queue_ms"] for s in samples)
        outside_ms = f"{outside:5.2f}" if median["compute_ms"] else "    -"  # in-process: not split
        print(
            f"  {backend:<22} {median['ms']:7.1f} ms | server compute {median['compute_ms']:6.1f} "
            f"queue {median['queue_ms']:4.1f} | outside the pass {outside_ms} "
            f"| padded tokens {median['padded_tokens']:5.0f}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="3,32", help="rows per request, comma-separated")
    parser.add_argument("--overheads", default="8,32", help="the service's pass_overhead_tokens to compare")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(ROOT / "runs" / "bench_trainer_requests.json"))
    args = parser.parse_args()
    backends = [f"service, overhead {o}" for o in args.overheads.split(",")] + ["in-process"]
    row_counts = [int(r) for r in args.rows.split(",")]
    results: dict[str, dict[str, list]] = {str(rows): {b: [] for b in backends} for rows in row_counts}
    with tempfile.TemporaryDirectory(prefix="bench_trainer_requests_") as tmp:
        teacher = save_teacher(Path(tmp) / "teacher", args.seed)
        queries = {rows: trainer_queries(teacher, rows, args.requests, args.seed) for rows in row_counts}
        for round_ in range(2):
            for backend in backends if round_ == 0 else reversed(backends):
                for rows, samples in run_backend(backend, teacher, Path(tmp), queries).items():
                    results[str(rows)][backend] += samples
    for rows in row_counts:
        print_cells(rows, results[str(rows)], args.requests)
    fewest, most = str(min(row_counts)), str(max(row_counts))
    ratios = {}
    for backend in backends:  # each request of the fewest rows over the next of the most: drift cancels
        turns = zip(results[fewest][backend], results[most][backend], strict=True)
        ratios[backend] = statistics.median(few["ms"] / many["ms"] for few, many in turns)
        print(f"{backend:<24} {fewest} rows / {most} rows, median per turn: {ratios[backend]:.3f}x")
    write_report({"command": " ".join(["python benchmarks/bench_trainer_requests.py", *sys.argv[1:]]),
                  "settings": vars(args), "samples": results,
                  f"ratio_{fewest}_over_{most}_rows": ratios}, args.output)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
