"""What uvicorn's HTTP stack costs a small request: h11 or httptools, asyncio's loop or uvloop.

    python benchmarks/bench_server_stack.py [--requests 200] [--rounds 2] [--rows 3]

The service (``create_app``) on a tiny random BERT teacher (2 layers, width 32: its forward pass
costs next to nothing, so what is left is the stack), output cache off, served by uvicorn with each
parser and event loop in turn; one trainer client (``HttpTeacherClient``: binary v2, keep-alive)
sends ``--requests`` requests of ``--rows`` rows one at a time. Stacks are visited in interleaved
rounds (forward, then reversed); median ms a request per stack and round. Writes JSON.
``teacher-server`` runs httptools and uvloop (see ``teacher_server/drain.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from bench_server import ROOT, report_samples

from shared.openmp import inherited_env
from shared.teacher_api import TeacherQuery
from student_trainer.teachers.client import make_teacher_client
from teacher_server.launch import free_port, running

STACKS = [("h11", "asyncio"), ("httptools", "asyncio"), ("httptools", "uvloop")]
SERVE = """
import sys, uvicorn
from teacher_server.app import create_app
from teacher_server.config import load_config
app = create_app(load_config(sys.argv[1]))
port, http, loop = int(sys.argv[2]), sys.argv[3], sys.argv[4]
uvicorn.run(app, host="127.0.0.1", port=port, http=http, loop=loop, log_level="warning")
"""


def tiny_teacher(folder: Path) -> Path:
    sys.path.insert(0, str(ROOT))  # tests/ holds the tiny-model builder the test suite uses
    from tests.tiny_models import save_tiny_bert

    return save_tiny_bert(folder / "teacher", num_layers=2, hidden_size=32)


async def median_ms(url: str, queries: list[TeacherQuery]) -> float:
    client = make_teacher_client(url, name="t")
    await client.start()
    for query in queries[:20]:  # warm-up
        await client.infer(query)
    times = []
    for query in queries:
        started = time.perf_counter()
        await client.infer(query)
        times.append(1000 * (time.perf_counter() - started))
    await client.aclose()
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rows", type=int, default=3)
    parser.add_argument("--output", default=str(ROOT / "runs" / "bench_server_stack.json"))
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    ids = [torch.randint(5, 90, (args.rows, 20), generator=generator) for _ in range(args.requests)]
    queries = [TeacherQuery(i, torch.ones_like(i), use_cache=False) for i in ids]
    samples: dict[str, list[float]] = {f"{http}+{loop}": [] for http, loop in STACKS}
    with tempfile.TemporaryDirectory(prefix="bench_server_stack_") as tmp:
        config = Path(tmp) / "teachers.yaml"
        entry = {"name": "t", "path": str(tiny_teacher(Path(tmp))), "max_seq_length": 64}
        config.write_text(yaml.safe_dump({"cache_max_bytes": 0, "teachers": [entry]}))
        for number in range(args.rounds):
            for http, loop in STACKS if number % 2 == 0 else reversed(STACKS):
                url = f"http://127.0.0.1:{(port := free_port())}"
                command = [sys.executable, "-c", SERVE, str(config), str(port), http, loop]
                log = Path(tmp) / f"{http}+{loop}.log"  # a failed start quotes its last lines
                with running(command, inherited_env(), f"{url}/v2/health/ready", name=log.stem, log_path=log):
                    ms = asyncio.run(median_ms(url, queries))
                samples[f"{http}+{loop}"].append(ms)
                print(f"  round {number} {http:<9} {loop:<7} {ms:6.2f} ms a request", flush=True)
    report_samples(samples, f"median ms a request of {args.rows} rows (per round)", args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
