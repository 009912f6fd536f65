"""How far a packed teacher pass is from this CPU's limit: its achieved FLOP/s beside a GEMM peak.

    python benchmarks/bench_flops.py [--threads 1,2] [--rows 8,64] [--shapes minilm,bert-base]
                                     [--batches 20] [--rounds 3] [--gemm_size 2048]

The peak is what a product of two large fp32 matrices (``--gemm_size``, square) achieves at
each thread count, by ``torch.mm`` (MKL) or oneDNN, whichever is faster: the best this machine's
libraries do on the layers' kind of work. The pass is the
teacher engine's packed pass (``teacher_engine/packing.py``), as the service runs it, over
batches of ``--rows`` SST-2 training sentences: 8 is one client's request run alone, 64 the
batcher's largest pass when 16 clients' requests queue together. Teachers: the pretrained
MiniLM-L6 (``minilm``) and randomly initialised BERTs of the design card's shapes
(``bert-base``, ``bert-large``; random weights cost what trained ones do). The FLOPs counted are
the useful ones (:func:`shared.flops.encoder_forward_flops` on the real tokens, head included),
so the ratio says what share of the peak reaches the answer. Beside it, the same pass's matrix
products alone (one layer's Q, K, V, output and feed-forward weights on as many tokens as the
pass packs, times its layers): what the pass's own matrix kernel gives at its shapes. The pass against
them says what the rest of a layer (attention over padded rows, normalisation, activation,
packing, Python) costs; them against the peak, what small matrices cost. Medians over interleaved
rounds; writes JSON.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_packing import batches, ms_per_pass
from bench_server import ROOT, SHAPES, default_teacher, random_teacher, write_report

from shared.flops import FlopsShape, encoder_forward_flops, layer_forward_flops
from teacher_engine.engine import TeacherEngine
from teacher_engine.packing import Product, linear
from teacher_server.config import TeacherConfig


def gemm_flops_per_s(size: int, repeats: int) -> float:
    """The best FLOP/s of a product of two ``size``-square fp32 matrices over ``repeats`` runs, by
    ``torch.mm`` (MKL) or by the packed pass's own kernel (oneDNN: :func:`teacher_engine.packing.linear`,
    or its weight prepared, :class:`~teacher_engine.packing.Product`), whichever is fastest here."""
    a, layer = torch.randn(size, size), torch.nn.Linear(size, size, bias=False)
    prepared = Product.of(layer)
    best = float("inf")
    with torch.inference_mode():
        for product in (lambda: torch.mm(a, layer.weight), lambda: linear(layer, a), lambda: prepared(a)):
            product()  # warm-up: the library's threads and buffers
            for _ in range(repeats):
                started = time.perf_counter()
                product()
                best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def layer_gemms_flops_per_s(shape: FlopsShape, tokens: int, repeats: int) -> float:
    """The best FLOP/s of one layer's matrix products (Q, K and V as one; output; the feed-forward's
    in and out) on ``tokens`` packed rows, over ``repeats`` runs of ten, as the pass prepares them."""
    hidden, inner = shape.hidden_size, shape.intermediate_size
    narrow, wide = torch.randn(tokens, hidden), torch.randn(tokens, inner)
    square = [torch.nn.Linear(hidden, hidden, bias=False) for _ in range(4)]
    products = [(narrow, Product.of(*square[:3])), (narrow, Product.of(square[3]))]
    products += [(narrow, Product.of(torch.nn.Linear(hidden, inner, bias=False)))]
    products += [(wide, Product.of(torch.nn.Linear(inner, hidden, bias=False)))]
    flops = layer_forward_flops(hidden, inner, tokens, attention_len=0)  # 0: the products alone
    best = float("inf")
    with torch.inference_mode():
        for x, product in products:  # warm-up, untimed: the kernels at these shapes
            product(x)
        for _ in range(repeats):
            started = time.perf_counter()
            for _ in range(10):
                for x, product in products:
                    product(x)
            best = min(best, (time.perf_counter() - started) / 10)
    return flops / best


def packed_tokens(queries: list) -> int:
    """The real tokens of a pass, on average: how many rows a packed pass's matrices run on."""
    return round(sum(int(query.attention_mask.sum()) for query in queries) / len(queries))


def pass_flops(engine: TeacherEngine, queries: list) -> float:
    """Useful FLOPs per pass, on average: the real tokens of every row through the whole encoder."""
    total = sum(
        encoder_forward_flops(engine.flops_shape, query.attention_mask.sum(-1).tolist(), batches=1)
        for query in queries
    )
    return total / len(queries)


def teacher_path(shape: str, folder: Path) -> str:
    return default_teacher() if shape == "minilm" else random_teacher(shape, folder / shape)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", default="1,2", help="torch threads, comma-separated")
    parser.add_argument("--rows", default="8,64", help="sentences per pass, comma-separated")
    parser.add_argument(
        "--shapes", default="minilm,bert-base", help=f"teachers: minilm, {', '.join(sorted(SHAPES))}"
    )
    parser.add_argument("--batches", type=int, default=20, help="passes of each size per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians reported")
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument("--gemm_size", type=int, default=2048, help="the peak's square matrices")
    parser.add_argument("--output", default=str(ROOT / "runs" / "bench_flops.json"))
    args = parser.parse_args(argv)
    shapes = args.shapes.split(",")
    unknown = set(shapes) - {"minilm", *SHAPES}
    if unknown:
        parser.error(f"--shapes: unknown {', '.join(sorted(unknown))}")
    threads_list = [int(t) for t in args.threads.split(",")]
    rows_list = [int(r) for r in args.rows.split(",")]
    load_before = os.getloadavg()[0]

    engines = {}
    with tempfile.TemporaryDirectory() as tmp:
        for shape in shapes:
            config = TeacherConfig(
                name=shape, path=teacher_path(shape, Path(tmp)), max_seq_length=args.max_seq_length
            )
            engines[shape] = TeacherEngine.from_config(config)
    cells = [(shape, rows) for shape in shapes for rows in rows_list]
    queries = {cell: batches(engines[cell[0]], cell[1], args.batches, args.max_seq_length) for cell in cells}
    tokens = {cell: packed_tokens(queries[cell]) for cell in cells}
    peaks: dict[int, list[float]] = {t: [] for t in threads_list}
    passes: dict[tuple, list[float]] = {(t, *cell): [] for t in threads_list for cell in cells}
    gemms: dict[tuple, list[float]] = {key: [] for key in passes}
    for number in range(args.rounds):
        for threads in threads_list:
            torch.set_num_threads(threads)
            peaks[threads].append(gemm_flops_per_s(args.gemm_size, repeats=5))
            for shape, rows in cells if number % 2 == 0 else reversed(cells):
                engine, batch = engines[shape], queries[(shape, rows)]
                ms_per_pass(engine, batch[:2], True)  # warm-up at this shape and thread count
                passes[(threads, shape, rows)].append(ms_per_pass(engine, batch, True))
                measured = layer_gemms_flops_per_s(engine.flops_shape, tokens[(shape, rows)], repeats=3)
                gemms[(threads, shape, rows)].append(measured)

    results = []
    print(
        f"{'threads':>7} {'teacher':>10} {'rows':>5} {'tokens':>6} {'ms/pass':>8} {'GFLOP/s':>8} "
        f"{'its GEMMs GFLOP/s':>17} {'of GEMMs':>8} {'peak GFLOP/s':>12} {'of peak':>8}"
    )
    for (threads, shape, rows), samples in passes.items():
        ms, peak = statistics.median(samples), statistics.median(peaks[threads])
        gemm_samples = gemms[(threads, shape, rows)]
        alone = statistics.median(gemm_samples)
        achieved = pass_flops(engines[shape], queries[(shape, rows)]) / (ms / 1000)
        cell_tokens = tokens[(shape, rows)]
        results.append({
            "threads": threads, "teacher": shape, "rows": rows, "packed_tokens": cell_tokens,
            "median_ms_per_pass": ms, "samples_ms": samples, "achieved_flops_per_s": achieved,
            "layer_gemms_flops_per_s": alone, "layer_gemms_samples_flops_per_s": gemm_samples,
            "share_of_layer_gemms": achieved / alone, "gemm_peak_flops_per_s": peak,
            "share_of_peak": achieved / peak,
        })  # fmt: skip
        print(
            f"{threads:>7} {shape:>10} {rows:>5} {cell_tokens:>6} {ms:>8.1f} {achieved / 1e9:>8.1f} "
            f"{alone / 1e9:>17.1f} {achieved / alone:>8.0%} {peak / 1e9:>12.1f} {achieved / peak:>8.0%}"
        )
    load = (load_before, os.getloadavg()[0])
    print(f"1-minute load average before/after: {load[0]:.1f}/{load[1]:.1f} on {os.cpu_count()} CPUs")
    report = {
        "command": " ".join(
            ["python benchmarks/bench_flops.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "settings": vars(args),
        "machine": {"cpus": os.cpu_count(), "load_average_before_after": load, "torch": torch.__version__},
        "gemm_peak_samples_flops_per_s": peaks,
        "cells": results,
    }
    write_report(report, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
