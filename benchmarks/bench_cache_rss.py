"""RSS of the output cache under a flood of unique rows: does memory stay within the byte budget?

For each ``--budget_mib``, in a fresh process: puts ``--rows`` unique 3-logit rows (what a sentence
classifier's trainer asks for) into one ``OutputCache``, the way the batcher does (a row sliced from
its batch), and reads the process's resident set size (``/proc/self/statm``) before and after, after
a first flood with the cache off (so the loop's own allocations are not counted). A million rows turn
a 16 MiB cache over 35 times: the steady state of a long run, where the allocator's fragmentation
has grown as far as it goes. Prints a table and writes JSON. Linux only.

    python benchmarks/bench_cache_rss.py  # 4, 16 and 64 MiB; writes runs/bench_cache_rss.json
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import resource
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from shared.flags import add_flag
from teacher_engine.engine import OutputSpec
from teacher_server.cache import OutputCache, RowOutputs, row_key

ROOT = Path(__file__).resolve().parents[1]
BATCH = 64  # rows per forward pass, as the batcher slices them


def rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def flood(rows: int, budget_mib: float, labels: int) -> dict[str, float]:
    cache = OutputCache(int(budget_mib * 2**20))
    spec, types = OutputSpec(True, (), ()), torch.zeros(8, dtype=torch.int64)
    gc.collect()
    before = rss_mib()
    for start in range(0, rows, BATCH):
        logits = torch.randn(BATCH, labels)
        for j in range(min(BATCH, rows - start)):
            ids = torch.tensor([2, start + j, 7, 7, 7, 7, 7, 3])
            cache.put(row_key("bench", "r", ids, types, spec), RowOutputs(logits[j], None, None))
    gc.collect()
    grown = rss_mib() - before
    return {
        "rows_put": rows,
        "rows_kept": len(cache),
        "budget_mib": budget_mib,
        "counted_mib": cache.bytes_used / 2**20,
        "rss_growth_mib": grown,
        "rss_growth_over_budget": grown / budget_mib if budget_mib else 0.0,
        "real_bytes_per_kept_row": grown * 2**20 / max(1, len(cache)),
    }


def measure(budget_mib: float, rows: int, labels: int) -> dict[str, float]:
    """One budget's flood, after the same flood with the cache off: what the loop itself leaves in
    RSS (allocator arenas) is then reused, not counted."""
    torch.set_num_threads(1)
    baseline = flood(rows, 0.0, labels)["rss_growth_mib"]
    return {**flood(rows, budget_mib, labels), "rss_growth_cache_off_first_mib": baseline}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    add_flag(parser, "--budget_mib", old="--budget-mib", type=float, nargs="+", default=[4.0, 16.0, 64.0])
    parser.add_argument("--labels", type=int, default=3)
    parser.add_argument("--output", default=str(ROOT / "runs" / "bench_cache_rss.json"))
    args = parser.parse_args()
    fresh = multiprocessing.get_context("spawn")  # each budget in its own process: no heap left over
    with ProcessPoolExecutor(1, mp_context=fresh, max_tasks_per_child=1) as pool:
        runs = [pool.submit(measure, budget, args.rows, args.labels) for budget in args.budget_mib]
        results = [run.result() for run in runs]
    print("| " + " | ".join(results[0]) + " |")
    print("|" + "---|" * len(results[0]))
    for result in results:
        cells = (f"{v:,.2f}" if isinstance(v, float) else f"{v:,}" for v in result.values())
        print("| " + " | ".join(cells) + " |")
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"settings": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
