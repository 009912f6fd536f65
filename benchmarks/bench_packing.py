"""A padded pass against a packed one: the same engine, the same batches of real sentences.

    python benchmarks/bench_packing.py [--rows 3,8,32] [--threads 1,2] [--rounds 4] [--teacher DIR]

A batch of SST-2 training sentences padded to its longest runs every layer over the padding; a
packed pass (``teacher_engine/packing.py``) runs the layers' matrices on the real tokens only and pads
just attention. The teacher engine runs ``--batches`` batches of each size both ways, in
interleaved rounds (padded first, then packed first); each figure is the median over rounds of
the mean ms per pass. Also prints each way's tokens per pass, and the largest logit difference
between the two and whether every row's predicted label agrees. Writes JSON.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from bench_server import ROOT, default_teacher, load_sentences, pad, write_report

from shared.teacher_api import TeacherQuery
from teacher_engine.engine import TeacherEngine
from teacher_server.config import TeacherConfig

WAYS = ("padded", "packed")


def batches(engine: TeacherEngine, rows: int, count: int, max_length: int) -> list[TeacherQuery]:
    sentences, _ = load_sentences(rows * count)
    encoded = [engine.tokenizer(s, truncation=True, max_length=max_length)["input_ids"] for s in sentences]
    queries = []
    for i in range(count):
        ids, mask = pad(encoded[i * rows : (i + 1) * rows])
        queries.append(TeacherQuery(ids, mask, None, want_logits=True))
    return queries


def ms_per_pass(engine: TeacherEngine, queries: list[TeacherQuery], packed: bool) -> float:
    engine.packs = packed
    started = time.perf_counter()
    for query in queries:
        engine.run(query)
    return 1000 * (time.perf_counter() - started) / len(queries)


def cell(engine: TeacherEngine, queries: list[TeacherQuery], rounds: int) -> dict:
    """Both ways over the same batches, ``rounds`` times, alternating which goes first."""
    samples: dict[str, list[float]] = {way: [] for way in WAYS}
    for number in range(rounds):
        for way in WAYS if number % 2 == 0 else reversed(WAYS):
            samples[way].append(ms_per_pass(engine, queries, way == "packed"))
    answers: dict[str, list] = {}
    for way in WAYS:
        engine.packs = way == "packed"
        answers[way] = [engine.run(query) for query in queries]
    engine.packs = True
    medians = {way: statistics.median(values) for way, values in samples.items()}
    pairs = list(zip(answers["padded"], answers["packed"], strict=True))
    return {
        "samples_ms": samples,
        "median_ms": medians,
        "speedup": medians["padded"] / medians["packed"],
        "tokens_per_pass": {
            way: statistics.mean(answer.padded_tokens for answer in answers[way]) for way in WAYS
        },
        "max_logit_difference": max(float((a.logits - b.logits).abs().max()) for a, b in pairs),
        "same_predictions": all(torch.equal(a.logits.argmax(-1), b.logits.argmax(-1)) for a, b in pairs),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="3,8,32", help="sentences per batch, comma-separated")
    parser.add_argument("--threads", default="1,2", help="torch threads, comma-separated")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--batches", type=int, default=30, help="batches of each size")
    parser.add_argument("--max_seq_length", type=int, default=64)
    parser.add_argument("--teacher", default=None, help="checkpoint dir (default: the pretrained MiniLM-L6)")
    parser.add_argument("--output", default=str(ROOT / "runs" / "bench_packing.json"))
    args = parser.parse_args()
    teacher = args.teacher or default_teacher()
    config = TeacherConfig(name="t", path=teacher, max_seq_length=args.max_seq_length)
    engine = TeacherEngine.from_config(config)
    if not engine.packs:
        print(f"{engine.info.model_type} does not pack (see teacher_engine/families.py)", file=sys.stderr)
        return 2
    cells = []
    print("threads | rows | padded ms | packed ms | speedup | tokens padded / packed | max |Δ| | labels")
    for threads in map(int, args.threads.split(",")):
        torch.set_num_threads(threads)
        for rows in map(int, args.rows.split(",")):
            queries = batches(engine, rows, args.batches, args.max_seq_length)
            ms_per_pass(engine, queries[:3], True)  # warm-up at this shape and thread count
            result = {"threads": threads, "rows": rows, **cell(engine, queries, args.rounds)}
            cells.append(result)
            median, tokens = result["median_ms"], result["tokens_per_pass"]
            print(
                f"{threads} | {rows} | {median['padded']:.1f} | {median['packed']:.1f} | "
                f"{result['speedup']:.2f}x | {tokens['padded']:.0f} / {tokens['packed']:.0f} | "
                f"{result['max_logit_difference']:.1e} | {result['same_predictions']}",
                flush=True,
            )
    report = {
        "command": " ".join(["python benchmarks/bench_packing.py", *sys.argv[1:]]),
        "settings": {**vars(args), "teacher": teacher},
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average": os.getloadavg(),
        "cells": cells,
    }
    write_report(report, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
