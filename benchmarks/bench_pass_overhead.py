"""What one more forward pass costs, in padded tokens: the batcher's ``pass_overhead_tokens``.

    python benchmarks/bench_pass_overhead.py [--threads 1,2] [--pools 3,8,32,128] [--overheads 0,8,32,...]

Length bucketing (``plan_batches``) splits the rows waiting for a teacher into passes of similar
length when taking a longer row would pad the pass by more than ``pass_overhead_tokens``. Too low
and a lone request of 8 sentences runs as 2–3 small passes; too high and passes carry padding.
This measures in-process (no server) the sequences per second of the passes planned for pools of
``P`` queued SST-2 sentences (3 = a trainer's r = 0.1 of a batch of 32, 8 = one request, 128 = 16
clients' requests) under each candidate overhead, so the default can be the best one measured, not
a guess. It also fits ms per pass = fixed + per token x padded tokens over passes of 1-32 rows x
8-64 tokens: fixed / per token is the overhead the planner's cost model assumes. Writes JSON
(``--output``).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
from bench_server import ROOT, default_teacher, in_process, load_sentences, write_report
from transformers import AutoTokenizer

from shared.modeling import load_sequence_classifier
from teacher_server.batcher import Row, plan_batches

NO_SPLIT = 10**9  # an overhead no padding can exceed: every pool runs as full passes
SHAPES = [(rows, length) for rows in (1, 2, 4, 8, 16, 32) for length in (8, 16, 32, 64)]


def planned_passes(
    encoded: list[list[int]], pool: int, overhead: int, args: argparse.Namespace
) -> list[list[int]]:
    """The passes the batcher plans for consecutive pools of ``pool`` rows."""
    passes = []
    for start in range(0, len(encoded), pool):
        rows = [Row(None, i, len(encoded[i])) for i in range(start, min(start + pool, len(encoded)))]
        planned = plan_batches(rows, args.max_batch_size, args.max_batch_tokens, overhead)
        passes += [[row.index for row in batch] for batch in planned]
    return passes


def weights_read_ms(model: torch.nn.Module) -> float:
    """Median ms to read every weight past the embeddings once: the memory traffic any pass pays,
    however few its tokens (compare with the fitted fixed part)."""
    weights = [p for name, p in model.named_parameters() if "embeddings" not in name]
    samples = []
    for _ in range(12):
        started = time.perf_counter()
        for weight in weights:
            weight.detach().sum()
        samples.append(1000 * (time.perf_counter() - started))
    return statistics.median(samples[2:])


def pass_cost(model: torch.nn.Module) -> dict[str, float]:
    """Least-squares fit of the median ms per pass over ``SHAPES`` (random token ids), and what
    reading the weights alone takes."""
    generator = torch.Generator().manual_seed(0)
    tokens, times = [], []
    for rows, length in SHAPES:
        ids = torch.randint(1000, 20000, (rows, length), generator=generator)
        samples = []
        with torch.inference_mode():
            for _ in range(7):
                started = time.perf_counter()
                model(input_ids=ids, attention_mask=torch.ones_like(ids))
                samples.append(1000 * (time.perf_counter() - started))
        tokens.append(rows * length)
        times.append(statistics.median(samples[2:]))  # the first two warm up
    per_token, fixed = statistics.linear_regression(tokens, times)
    return {
        "fixed_ms": fixed,
        "per_token_ms": per_token,
        "overhead_tokens": fixed / per_token,
        "weights_read_ms": weights_read_ms(model),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", default="1,2", help="torch thread counts, comma-separated")
    parser.add_argument("--pools", default="3,8,32,128", help="queued rows per planning, comma-separated")
    parser.add_argument("--overheads", default="0,8,32,64,128,256,512,none", help="'none': never split")
    parser.add_argument("--sentences", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the best is kept")
    parser.add_argument("--max_batch_size", type=int, default=64)
    parser.add_argument("--max_batch_tokens", type=int, default=4096)
    parser.add_argument("--output", default=str(ROOT / "runs" / "bench_pass_overhead.json"))
    args = parser.parse_args(argv)
    overheads = [NO_SPLIT if o == "none" else int(o) for o in args.overheads.split(",")]
    teacher = default_teacher()
    sentences, source = load_sentences(args.sentences)
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    encoded = [tokenizer(s, truncation=True, max_length=128)["input_ids"] for s in sentences]
    model = load_sequence_classifier(teacher, num_labels=2).eval()

    rows, costs = [], {}
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        costs[threads] = cost = pass_cost(model)
        print(
            f"threads {threads}: a pass costs {cost['fixed_ms']:.1f} ms + {cost['per_token_ms']:.3f} ms per "
            f"padded token: {cost['overhead_tokens']:.0f} tokens (reading the weights once: "
            f"{cost['weights_read_ms']:.1f} ms)",
            flush=True,
        )
        for pool in [int(p) for p in args.pools.split(",")]:
            plans = {o: planned_passes(encoded, pool, o, args) for o in overheads}
            best = dict.fromkeys(overheads, 0.0)
            for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits all alike
                for o, passes in plans.items():
                    best[o] = max(best[o], in_process(model, encoded, passes))
            for o in overheads:
                passes_per_pool = len(plans[o]) * pool / len(encoded)
                rows.append({
                    "threads": threads, "pool": pool, "overhead_tokens": None if o == NO_SPLIT else o,
                    "passes_per_pool": passes_per_pool, "sequences_per_s": best[o],
                })  # fmt: skip
                print(
                    f"threads {threads} pool {pool:>4} overhead {o if o != NO_SPLIT else 'none':>5}: "
                    f"{passes_per_pool:5.2f} passes/pool {best[o]:7.1f} seq/s",
                    flush=True,
                )
    report = {
        "command": " ".join(["python benchmarks/bench_pass_overhead.py", *(argv or sys.argv[1:])]),
        "sentences": source,
        "machine": {
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },  # fmt: skip
        "pass_cost_by_threads": costs,
        "rows": rows,
    }
    write_report(report, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
