"""The connection's bounds (:mod:`teacher_server.http_protocol`), over raw sockets to a live server:
header size, count and deadline, and what a client that breaks HTTP/1.1 gets back."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from teacher_server.config import ServerConfig
from tests.test_server_http import LiveServer

GOOD_BODY = json.dumps(
    {"inputs": [{"name": "input_ids", "shape": [1, 3], "datatype": "INT64", "data": [2, 10, 3]}]}
).encode()


@pytest.fixture(scope="module")
def server(tiny_teachers):
    config = ServerConfig(
        teachers=[{"name": "small", "path": str(tiny_teachers["small"])}],
        max_header_bytes=4096,
        max_headers=20,
        read_timeout_s=1.0,
    )
    with LiveServer(config) as live:
        live.port = int(live.url.rsplit(":", 1)[1])
        yield live


def exchange(port: int, *parts: bytes, limit_s: float = 10) -> tuple[bytes, float]:
    """Send ``parts``, then read until the server closes; what came back and how long it took.
    A server that answers and closes early may make a later send fail: that is fine here."""
    started, received = time.monotonic(), b""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(limit_s)
        try:
            for part in parts:
                sock.sendall(part)
        except OSError:
            pass
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
    return received, time.monotonic() - started


def answers(stream: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """The HTTP/1.1 responses in ``stream``, in order: status, headers, body."""
    found = []
    while stream:
        head, _, rest = stream.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:])
        length = int(headers["content-length"])
        found.append((int(lines[0].split()[1]), headers, rest[:length]))
        stream = rest[length:]
    return found


def request(path: str = "/v2/health/live", *headers: str, method: str = "GET", body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: test", *headers]
    if body or method == "POST":
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return "\r\n".join(lines).encode() + b"\r\n\r\n" + body


def refused(stream: bytes, status: int, field: str | None, words: str) -> None:
    [(code, headers, body)] = answers(stream)
    assert code == status and headers["content-type"] == "application/json", stream[:300]
    error = json.loads(body)
    assert error["field"] == field and words in error["error"], error


def test_a_huge_header_is_refused_431_before_it_is_read(server):
    """A 16 MB header was read whole (seconds of the event loop) before the API key was checked."""
    flood = [request().removesuffix(b"\r\n\r\n") + b"\r\nX-Flood: "] + [b"a" * 2**20] * 16
    received, seconds = exchange(server.port, *flood)
    refused(received, 431, "headers", "exceed 4096 bytes (max_header_bytes)")
    assert seconds < 5
    assert httpx.get(f"{server.url}/v2/health/live", trust_env=False).status_code == 200


@pytest.mark.parametrize(
    ("headers", "words"),
    [
        ([f"X-Many-{i}: {'b' * 300}" for i in range(15)], "exceed 4096 bytes"),  # each small, too many bytes
        ([f"X-Many-{i}: 1" for i in range(25)], "more than 20 request headers (max_headers)"),
    ],
    ids=["bytes", "count"],
)
def test_too_many_header_bytes_or_headers_are_refused_431(server, headers, words):
    received, _ = exchange(server.port, request("/v2/health/live", *headers))
    refused(received, 431, "headers", words)


def test_headers_within_the_limits_are_served(server):
    headers = [f"X-Few-{i}: {'c' * 150}" for i in range(17)]  # about 3 KB in 19 headers with Host and
    received, _ = exchange(server.port, request("/v2/health/live", *headers, "Connection: close"))
    [(status, _, body)] = answers(received)
    assert status == 200 and json.loads(body) == {"live": True}


def test_slow_headers_are_answered_408_json(server):
    received, seconds = exchange(server.port, b"GET /v2/health/live HTTP/1.1\r\nHost: test\r\n")
    refused(received, 408, "headers", "not received within 1 s")
    assert seconds < 5


def test_a_body_shorter_than_its_content_length_is_400_json_after_the_requests_before_it(server):
    """The short body swallows the start of the next request, whose rest is not HTTP: that is a
    400 for the connection, sent after the answers to the complete requests before it."""
    infer = request("/v2/models/small/infer", method="POST", body=GOOD_BODY)
    short = request("/v2/models/small/infer", method="POST").replace(
        b"Content-Length: 0", b"Content-Length: 5"
    )
    received, _ = exchange(server.port, infer + short + b"{}" + request())
    statuses = [(status, headers["content-type"]) for status, headers, _ in answers(received)]
    assert statuses == [(200, "application/json"), (400, "application/json"), (400, "application/json")]
    assert json.loads(answers(received)[-1][2])["error"].startswith("malformed HTTP request")
