"""What one small request costs the trainer's HTTP client: httpx, aiohttp, and raw asyncio streams.

    python benchmarks/bench_http_clients.py [--requests 1500] [--rounds 2] [--server_wait_ms 0]

A trainer at small ``r`` sends one request of a few rows per step, so the client's own cost per
round trip is part of what selection is meant to save. The server is uvicorn (httptools, uvloop,
as ``teacher-server`` runs) with a bare ASGI app that reads the body and answers 300 fixed bytes,
so what is measured is the client plus the loopback round trip; raw streams (a hand-written
HTTP/1.1 exchange) are the floor. ``--server_wait_ms`` makes the app busy-wait that long before it
answers, as a teacher's pass would: what a round trip costs beyond the wait then includes waking a
client that sat idle (on a VM, its idle vCPU). One keep-alive connection, requests one at a time, the first
100 of each run left out; clients visited in interleaved rounds (forward, then reversed); median
ms a request per client and round. Writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable

import aiohttp
import httpx
from bench_server import ROOT, report_samples

from teacher_server.launch import free_port, running

ANSWER_BYTES = 300
SERVE = f"""
import sys, time, uvicorn
WAIT_S = float(sys.argv[2]) / 1000
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    end = time.perf_counter() + WAIT_S
    while time.perf_counter() < end:  # a teacher's pass stands here: the client's process sits idle
        pass
    headers = [(b"content-type", b"application/octet-stream"), (b"content-length", b"{ANSWER_BYTES}")]
    await send({{"type": "http.response.start", "status": 200, "headers": headers}})
    await send({{"type": "http.response.body", "body": b"x" * {ANSWER_BYTES}}})
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), http="httptools", loop="uvloop", log_level="error")
"""
HEADERS = {"content-type": "application/octet-stream"}
Send = Callable[[], Awaitable[None]]


async def timed(send: Send, requests: int) -> float:
    times = []
    for _ in range(requests):
        started = time.perf_counter()
        await send()
        times.append(1000 * (time.perf_counter() - started))
    return statistics.median(times[100:])


async def with_httpx(url: str, body: bytes, requests: int) -> float:
    async with httpx.AsyncClient(base_url=url, trust_env=False) as client:

        async def send() -> None:
            (await client.post("/infer", content=body, headers=HEADERS)).raise_for_status()

        return await timed(send, requests)


async def with_aiohttp(url: str, body: bytes, requests: int) -> float:
    async with aiohttp.ClientSession() as session:

        async def send() -> None:
            async with session.post(f"{url}/infer", data=body, headers=HEADERS) as response:
                response.raise_for_status()
                await response.read()

        return await timed(send, requests)


async def with_streams(url: str, body: bytes, requests: int) -> float:
    reader, writer = await asyncio.open_connection("127.0.0.1", int(url.rsplit(":", 1)[1]))
    head = f"POST /infer HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: {len(body)}\r\n\r\n".encode()

    async def send() -> None:
        writer.write(head + body)
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")  # the bare app always answers ANSWER_BYTES
        await reader.readexactly(ANSWER_BYTES)

    try:
        return await timed(send, requests)
    finally:
        writer.close()


CLIENTS = {"httpx": with_httpx, "aiohttp": with_aiohttp, "raw streams": with_streams}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--body_bytes", type=int, default=600, help="a 3-row binary v2 request is ~600 bytes")
    parser.add_argument("--server_wait_ms", type=float, default=0.0, help="the app busy-waits this long")
    parser.add_argument("--output", default=str(ROOT / "runs" / "bench_http_clients.json"))
    args = parser.parse_args()
    body = b"y" * args.body_bytes
    samples: dict[str, list[float]] = {name: [] for name in CLIENTS}
    url = f"http://127.0.0.1:{(port := free_port())}"
    command = [sys.executable, "-c", SERVE, str(port), str(args.server_wait_ms)]
    with running(command, os.environ, f"{url}/", name="the echo server", ready_timeout_s=60):
        for number in range(args.rounds):
            for name in CLIENTS if number % 2 == 0 else reversed(CLIENTS):
                ms = asyncio.run(CLIENTS[name](url, body, args.requests))
                samples[name].append(ms)
                print(f"  round {number} {name:<12} {ms:6.3f} ms a request", flush=True)
    wait = f", {args.server_wait_ms:g} ms server wait included" if args.server_wait_ms else ""
    report_samples(samples, f"median ms a request of {args.body_bytes} bytes{wait} (per round)", args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
