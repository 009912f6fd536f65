"""The HTTP teacher client against real HTTP servers on 127.0.0.1.

``FakeReplica`` is a scriptable v2 server (FastAPI + uvicorn in a thread) that answers with
canned-but-correct v2 bodies built by the codec, and can be told to answer 429/503/500/400,
drop the connection, stall, or go down — so balancing, retries and failover are checked
over real sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.abc
import itertools
import logging
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from shared.codec import (
    HEADER_LENGTH,
    DecodedRequest,
    build_response_body,
    parse_request_body,
    requested_layers,
    wants_binary,
)
from shared.errors import UserError
from shared.protocol import InferenceRequest
from shared.teacher_api import TeacherAnswer, TeacherQuery, Timings
from student_trainer.teachers import http
from student_trainer.teachers.client import (
    TeacherCallError,
    TeacherRequestError,
    TeacherUnavailableError,
    ask_teachers,
)
from student_trainer.teachers.http import HttpTeacherClient

HIDDEN = 4
LABELS = ["neg", "pos", "neutral"]
DTYPES = {"FP32": torch.float32, "FP16": torch.float16, "BF16": torch.bfloat16}


def fake_outputs(inputs: dict, header) -> dict[str, torch.Tensor]:
    """Deterministic stand-ins for a teacher's outputs, a function of the token ids."""
    ids, mask = inputs["input_ids"].long(), inputs["attention_mask"].long()
    total = (ids * mask).sum(1, keepdim=True).float()
    dtype = DTYPES[str((header.parameters or {}).get("output_dtype", "FP32"))]
    outputs = {}
    for output in header.outputs or []:
        layers = torch.tensor(requested_layers(header, output.name) or (), dtype=torch.float32)
        if output.name == "logits":
            value = total / 7 * torch.arange(1, len(LABELS) + 1)
        elif output.name == "hidden_cls":
            value = total[:, :, None] / 3 + layers[None, :, None] * 10 + torch.arange(HIDDEN) / 9
        else:
            value = ids[:, None, :, None] / 11 + layers[None, :, None, None] + torch.arange(HIDDEN) / 13
        outputs[output.name] = value.to(dtype)
    return outputs


class ServerThread:
    """uvicorn serving an ASGI app on a fixed loopback port from a thread; can stop and start again."""

    def __init__(self, app, *, lifespan: str = "off"):
        self.app, self.lifespan = app, lifespan
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self):
        # IPPROTO_TCP explicitly: asyncio only sets TCP_NODELAY on sockets that say so, and
        # without it Nagle + delayed ACKs add ~40 ms to every request.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        config = uvicorn.Config(
            self.app, log_level="critical", lifespan=self.lifespan, timeout_graceful_shutdown=1
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            assert self._thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
            self._server = None


class FakeReplica(ServerThread):
    """One scriptable teacher replica; ``plan`` holds what the next infer calls do, then they answer."""

    def __init__(self, *, model: str = "fake", api_key: str | None = None, latency_s: float = 0.0):
        self.model, self.api_key, self.latency_s = model, api_key, latency_s
        self.plan: list[str] = []  # "429:<retry-after>", "503", "500", "400", "drop", "sleep:<s>"
        self.ready = True
        self.foreign = False  # True: answers as a v2 server that is not ours (no extra parameters)
        self.infers = 0
        self.health_checks: list[float] = []  # when GET /v2/health/ready came in (monotonic)
        self.requests: list[tuple[DecodedRequest, dict[str, str]]] = []
        self.client_ports: list[int] = []  # each infer's client port: one per connection
        super().__init__(self._asgi())

    def _asgi(self):
        app = FastAPI()

        def authorized(request: Request) -> bool:
            return self.api_key is None or request.headers.get("authorization") == f"Bearer {self.api_key}"

        def unauthorized() -> JSONResponse:
            return JSONResponse(
                {"error": "missing or wrong API key", "field": "Authorization"}, status_code=401
            )

        @app.get("/v2/health/ready")
        def server_ready() -> Response:
            self.health_checks.append(time.monotonic())
            return Response(status_code=200 if self.ready else 503)

        @app.get("/v2/models/{name}/ready")
        def model_ready(name: str, request: Request) -> Response:
            if not authorized(request):
                return unauthorized()
            if name != self.model:
                return JSONResponse({"error": f"unknown model {name!r}", "field": "model"}, status_code=404)
            return Response(status_code=200 if self.ready else 503)

        @app.get("/v2/models/{name}")
        def metadata(name: str) -> dict:
            tensor = {"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]}
            parameters = {"num_layers": 2, "hidden_size": HIDDEN, "num_labels": len(LABELS), "labels": LABELS,
                          "vocab_size": 100, "max_seq_length": 64}  # fmt: skip
            return {
                "name": name, "versions": ["1"], "platform": "fake", "inputs": [tensor], "outputs": [],
                **({} if self.foreign else {"parameters": parameters}),
            }  # fmt: skip

        @app.post("/v2/models/{name}/infer")
        async def infer(name: str, request: Request) -> Response:
            if not authorized(request):
                return unauthorized()
            action = self.plan.pop(0) if self.plan else "ok"
            if action.startswith("sleep:"):
                await asyncio.sleep(float(action.partition(":")[2]))
            if action.startswith("429"):
                return JSONResponse({"error": "queue full"}, 429, {"Retry-After": action.partition(":")[2]})
            if action in ("503", "500"):
                return JSONResponse({"error": f"fake {action}"}, status_code=int(action))
            if action == "400":
                error = {"error": "token id 9999 is outside the vocabulary", "field": "inputs[0].data"}
                return JSONResponse(error, status_code=400)
            await asyncio.sleep(self.latency_s)
            decoded = parse_request_body(await request.body(), request.headers.get(HEADER_LENGTH))
            self.requests.append((decoded, dict(request.headers)))
            outputs = fake_outputs(decoded.inputs, decoded.header)
            mask = decoded.inputs["attention_mask"]
            tokens = int(mask.sum())
            body, headers = build_response_body(
                name,
                outputs,
                binary_outputs={n for n in outputs if wants_binary(decoded.header, n)},
                parameters={} if self.foreign else {
                    "teacher_flops": 1000 * tokens, "tokens": tokens, "padded_tokens": mask.numel(),
                    "cache_hits": int(decoded.header.parameters.get("cache") is True),
                    "queue_us": 5, "compute_us": 7.5},
            )  # fmt: skip
            return Response(body, headers=headers)

        async def asgi(scope, receive, send):
            """Count infer calls; ``drop`` starts a response and then closes the connection."""
            if scope["type"] == "http" and scope["path"].endswith("/infer"):
                self.infers += 1
                self.client_ports.append(scope["client"][1])
                if self.plan and self.plan[0] == "drop":
                    self.plan.pop(0)
                    await send(
                        {
                            "type": "http.response.start",
                            "status": 200,
                            "headers": [(b"content-length", b"99")],
                        }
                    )
                    await send({"type": "http.response.body", "body": b"{", "more_body": True})
                    raise ConnectionAbortedError("fake replica dropped the connection")
            await app(scope, receive, send)

        return asgi


@pytest.fixture
def replicas() -> Iterator[Callable[..., FakeReplica]]:
    started: list[FakeReplica] = []

    def start(**options) -> FakeReplica:
        started.append(FakeReplica(**options).start())
        return started[-1]

    yield start
    for replica in started:
        replica.stop()


def closed_url() -> str:
    """A loopback port nobody listens on: connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def query(batch: int = 3, length: int = 5, **kind) -> TeacherQuery:
    ids = torch.randint(1, 100, (batch, length), generator=torch.Generator().manual_seed(batch * length))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, -2:] = 0
    return TeacherQuery(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids), **kind)


def expected(q: TeacherQuery, output_dtype: str = "FP32") -> dict[str, torch.Tensor]:
    outputs = [{"name": "logits"}] if q.want_logits else []
    if q.cls_layers:
        outputs.append({"name": "hidden_cls", "parameters": {"layers": list(q.cls_layers)}})
    if q.token_layers:
        outputs.append({"name": "hidden_states", "parameters": {"layers": list(q.token_layers)}})
    header = InferenceRequest.model_validate(
        {"inputs": [{"name": "x", "shape": [0], "datatype": "INT32", "data": []}], "outputs": outputs,
         "parameters": {"output_dtype": output_dtype}}
    )  # fmt: skip
    inputs = {"input_ids": q.input_ids, "attention_mask": q.attention_mask}
    return {name: value.float() for name, value in fake_outputs(inputs, header).items()}


def run(
    client: HttpTeacherClient, *queries: TeacherQuery, ready_timeout_s: float = 5.0
) -> list[TeacherAnswer]:
    """Start the client, run the queries concurrently, close it."""

    async def main() -> list[TeacherAnswer]:
        try:
            await client.start(ready_timeout_s)
            return list(await asyncio.gather(*(client.infer(q) for q in queries)))
        finally:
            await client.aclose()

    return asyncio.run(main())


# --- readiness and metadata -----------------------------------------------------------------------


def test_start_waits_for_readiness_then_reads_metadata(replicas) -> None:
    replica = replicas()
    replica.ready = False
    flipped: list[float] = []

    def become_ready() -> None:
        replica.ready = True
        flipped.append(time.monotonic())

    threading.Timer(0.3, become_ready).start()
    client = HttpTeacherClient([closed_url(), replica.url], model="fake")
    info = asyncio.run(client.start(5.0))
    assert flipped, "start() returned before the replica was ready"
    assert (info.name, info.num_layers, info.hidden_size, info.num_labels) == ("fake", 2, HIDDEN, 3)
    assert info.label_names == tuple(LABELS) and client.info == info


def test_start_gives_up_after_the_ready_timeout_naming_every_url(replicas) -> None:
    replica, down = replicas(), closed_url()
    replica.ready = False
    began = time.monotonic()
    with pytest.raises(TeacherUnavailableError) as err:
        asyncio.run(HttpTeacherClient([replica.url, down], model="fake").start(0.5))
    assert 0.5 <= time.monotonic() - began < 3
    assert replica.url in str(err.value) and down in str(err.value) and "HTTP 503" in str(err.value)


def test_start_fails_fast_on_an_unknown_model(replicas) -> None:
    replica = replicas()
    began = time.monotonic()
    with pytest.raises(TeacherRequestError) as err:
        asyncio.run(HttpTeacherClient([replica.url], model="nope").start(30))
    assert time.monotonic() - began < 5
    assert err.value.status == 404 and "unknown model 'nope'" in str(err.value)


def test_api_key_is_sent_as_a_bearer_token(replicas) -> None:
    replica = replicas(api_key="s3cret")
    (answer,) = run(HttpTeacherClient([replica.url], model="fake", api_key="s3cret"), query())
    assert answer.logits is not None
    with pytest.raises(TeacherRequestError) as err:
        run(HttpTeacherClient([replica.url], model="fake", api_key="wrong"), query())
    assert err.value.status == 401 and "API key" in str(err.value)


def test_an_api_key_read_from_a_file_works_and_a_broken_one_is_refused_unechoed(replicas, tmp_path) -> None:
    replica = replicas(api_key="s3cret")
    key_file = tmp_path / "teacher.key"
    key_file.write_text("s3cret\n")
    client = HttpTeacherClient([replica.url], model="fake", api_key=key_file.read_text())
    (answer,) = run(client, query(), ready_timeout_s=2)
    assert answer.logits is not None
    for broken in ("s3c\nret", "s3c\x00ret", "s3crét"):
        with pytest.raises(UserError) as err:
            HttpTeacherClient([replica.url], model="fake", api_key=broken)
        assert "API key" in str(err.value) and "s3c" not in str(err.value)


# --- proxies -----------------------------------------------------------------------------------------------

PROXY_VARIABLES = ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def set_proxy(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    for name in PROXY_VARIABLES:
        monkeypatch.setenv(name, url)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)


@contextlib.contextmanager
def recording_proxy() -> Iterator[tuple[str, list[str]]]:
    """A loopback HTTP proxy that records each request line and answers 503 without forwarding."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            lines.append(self.requestline)
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    lines: list[str] = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", lines
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_proxy_variables_never_apply_to_loopback_replicas(replicas, monkeypatch) -> None:
    replica = replicas()
    set_proxy(monkeypatch, closed_url())  # a proxy that refuses every connection
    for url in (replica.url, replica.url.replace("127.0.0.1", "localhost")):
        (answer,) = run(HttpTeacherClient([url], model="fake"), query(), ready_timeout_s=2)
        assert answer.logits is not None
    assert replica.infers == 2


def test_proxy_variables_still_apply_to_remote_replicas(monkeypatch) -> None:
    with recording_proxy() as (proxy_url, lines):
        set_proxy(monkeypatch, proxy_url)
        with pytest.raises(TeacherUnavailableError) as err:
            asyncio.run(HttpTeacherClient(["http://teacher.invalid:8000"], model="fake").start(0.2))
    assert lines and lines[0] == "GET http://teacher.invalid:8000/v2/health/ready HTTP/1.1"
    assert "HTTP 503" in str(err.value)


# --- what is asked and what comes back -----------------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_asks_only_for_what_the_query_needs(replicas, binary: bool) -> None:
    replica = replicas()
    client = HttpTeacherClient([replica.url], model="fake", binary=binary, timeout_s=7)
    q1 = query(want_logits=True, cls_layers=(0, 2))
    q2 = query(batch=2, length=4, want_logits=False, token_layers=(1,), use_cache=False)

    a1, a2 = run(client, q1, q2)

    seen = {len(req.inputs["input_ids"]): (req, headers) for req, headers in replica.requests}
    req1, headers1 = seen[3]
    assert [o.name for o in req1.header.outputs] == ["logits", "hidden_cls"]
    assert requested_layers(req1.header, "hidden_cls") == (0, 2)
    assert req1.header.parameters == {"output_dtype": "FP32", "cache": True, "timeout_ms": 7000}
    assert all(wants_binary(req1.header, o.name) == binary for o in req1.header.outputs)
    assert (HEADER_LENGTH.lower() in headers1) == binary
    assert [i.datatype for i in req1.header.inputs] == ["INT32"] * 3
    torch.testing.assert_close(req1.inputs["input_ids"].long(), q1.input_ids, rtol=0, atol=0)
    req2, _ = seen[2]
    assert [o.name for o in req2.header.outputs] == ["hidden_states"]
    assert req2.header.parameters["cache"] is False

    want1, want2 = expected(q1), expected(q2)
    assert a1.logits.dtype == torch.float32 and a1.hidden_cls.shape == (3, 2, HIDDEN)
    torch.testing.assert_close(a1.logits, want1["logits"], rtol=0, atol=0)
    torch.testing.assert_close(a1.hidden_cls, want1["hidden_cls"], rtol=0, atol=0)
    assert a1.hidden_states is None and a2.logits is None and a2.hidden_cls is None
    torch.testing.assert_close(a2.hidden_states, want2["hidden_states"], rtol=0, atol=0)
    tokens = int(q1.attention_mask.sum())
    assert (a1.tokens, a1.padded_tokens, a1.teacher_flops, a1.cache_hits) == (tokens, 15, 1000 * tokens, 1)
    assert a2.cache_hits == 0 and a1.timings == Timings(queue_us=5.0, compute_us=7.5)


@pytest.mark.parametrize("output_dtype", ["FP16", "BF16"])
def test_half_precision_outputs_come_back_as_float32(replicas, output_dtype: str) -> None:
    replica = replicas()
    q = query(cls_layers=(1,))
    (answer,) = run(HttpTeacherClient([replica.url], model="fake", output_dtype=output_dtype.lower()), q)
    assert replica.requests[0][0].header.parameters["output_dtype"] == output_dtype
    assert answer.logits.dtype == torch.float32
    torch.testing.assert_close(answer.hidden_cls, expected(q, output_dtype)["hidden_cls"], rtol=0, atol=0)


class ImportRecorder(importlib.abc.MetaPathFinder):
    """Notes every module lookup that misses ``sys.modules`` (a failed import retries each time)."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def find_spec(self, name, path, target=None):  # noqa: ANN001 - the finder protocol
        self.names.append(name)
        return None  # let the real finders answer


def test_a_request_imports_nothing(replicas) -> None:
    """The trainer's hot path: a failed import is a walk of sys.path (~1 ms) each time; httpx's
    transport made one per request while ``sniffio`` was not installed."""
    replica, recorder = replicas(), ImportRecorder()
    client = HttpTeacherClient([replica.url], model="fake")

    async def main() -> None:
        await client.start(5)
        await client.infer(query())  # warm: the first request may import lazily
        sys.meta_path.insert(0, recorder)
        try:
            for _ in range(5):
                await client.infer(query())
        finally:
            sys.meta_path.remove(recorder)
            await client.aclose()

    asyncio.run(main())
    assert recorder.names == []


def test_sequential_requests_reuse_one_connection(replicas) -> None:
    """A trainer's step at small r is one small request: a new TCP connection each time would cost
    more than the request (keep-alive, also across the readiness and metadata calls)."""
    replica = replicas()
    client = HttpTeacherClient([replica.url], model="fake")

    async def main() -> None:
        await client.start(5)
        try:
            for _ in range(6):
                await client.infer(query())
        finally:
            await client.aclose()

    asyncio.run(main())
    assert len(replica.client_ports) == 6 and len(set(replica.client_ports)) == 1


# --- balancing ---------------------------------------------------------------------------------------------


def test_sequential_queries_alternate_between_idle_replicas(replicas) -> None:
    a, b = replicas(), replicas()
    client = HttpTeacherClient([a.url, b.url], model="fake")

    async def main() -> None:
        await client.start(5)
        for _ in range(10):
            await client.infer(query())
        await client.aclose()

    asyncio.run(main())
    assert (a.infers, b.infers) == (5, 5)


def test_least_outstanding_sends_most_work_to_the_faster_replica(replicas) -> None:
    slow, fast = replicas(latency_s=0.5), replicas()
    client = HttpTeacherClient([slow.url, fast.url], model="fake")

    async def main() -> None:
        await client.start(5)
        lanes = asyncio.Semaphore(2)

        async def one() -> None:
            async with lanes:
                await client.infer(query())

        await asyncio.gather(*(one() for _ in range(30)))
        await client.aclose()

    asyncio.run(main())
    assert slow.infers + fast.infers == 30
    assert fast.infers >= 3 * slow.infers, (slow.infers, fast.infers)


# --- retries, Retry-After, failover, timeouts -------------------------------------------------------------


def test_retry_after_is_honoured_on_429(replicas) -> None:
    replica = replicas()
    replica.plan = ["429:0.4"]
    began = time.monotonic()
    (answer,) = run(HttpTeacherClient([replica.url], model="fake", backoff_base_s=0.01), query())
    assert time.monotonic() - began >= 0.4
    assert replica.infers == 2 and answer.logits is not None


def test_429_fails_over_at_once_and_the_busy_replica_rests(replicas) -> None:
    busy, free = replicas(), replicas()
    busy.plan = ["429:5"]
    began = time.monotonic()
    answers = asyncio.run(_sequential(HttpTeacherClient([busy.url, free.url], model="fake"), 4))
    assert time.monotonic() - began < 4  # far below the 5 s the busy replica asked for
    assert (busy.infers, free.infers) == (1, 4) and len(answers) == 4


def test_when_every_replica_is_busy_the_one_free_soonest_is_asked(replicas) -> None:
    slow, soon = replicas(), replicas()
    slow.plan, soon.plan = ["429:3"], ["429:0.2"]
    began = time.monotonic()
    (answer,) = asyncio.run(_sequential(HttpTeacherClient([slow.url, soon.url], model="fake"), 1))
    assert 0.2 <= time.monotonic() - began < 2  # not the 3 s the slow one asked for
    assert (slow.infers, soon.infers) == (1, 2) and answer.logits is not None


def test_503_and_500_are_retried(replicas) -> None:
    replica = replicas()
    replica.plan = ["503", "500"]
    (answer,) = run(
        HttpTeacherClient([replica.url], model="fake", backoff_base_s=0.01, cooldown_s=0.01), query()
    )
    assert replica.infers == 3 and answer.logits is not None


def test_a_dropped_connection_is_retried(replicas) -> None:
    replica = replicas()
    replica.plan = ["drop"]
    (answer,) = run(HttpTeacherClient([replica.url], model="fake", backoff_base_s=0.01), query())
    assert replica.infers == 2
    torch.testing.assert_close(answer.logits, expected(query())["logits"], rtol=0, atol=0)


def test_a_dead_replica_is_skipped_for_its_cooldown_then_used_again(replicas) -> None:
    a, b = replicas(), replicas()
    client = HttpTeacherClient([a.url, b.url], model="fake", cooldown_s=0.5)

    async def main() -> None:
        await client.start(5)
        a.stop()
        for _ in range(6):
            await client.infer(query())
        assert b.infers == 6
        a.start()
        await asyncio.sleep(0.6)
        for _ in range(4):
            await client.infer(query())
        await client.aclose()

    asyncio.run(main())
    assert a.infers == 2 and b.infers == 8


def test_a_failed_replica_gets_real_traffic_only_once_its_health_probe_passes(replicas) -> None:
    a, b = replicas(), replicas()
    client = HttpTeacherClient(
        [a.url, b.url], model="fake", timeout_s=0.3, cooldown_s=0.05, cooldown_max_s=0.1
    )

    async def main() -> None:
        await client.start(5)
        a.plan, a.ready = ["sleep:5"], False  # hangs on the next infer, then says it is not ready
        a.health_checks.clear()
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            await client.infer(query())
        assert a.infers == 1 and len(a.health_checks) >= 3  # probed every <= 0.1 s, never sent work
        a.ready = True
        await asyncio.sleep(0.15)
        for _ in range(4):
            await client.infer(query())
        await client.aclose()

    asyncio.run(main())
    assert a.infers == 3  # back in the rotation: 2 of the last 4 queries


def test_the_cooldown_doubles_while_a_replica_keeps_failing_and_resets_once_it_answers(replicas) -> None:
    """Cool-down lengths are read from the client's state, and probe times are checked only from
    below (a probe can never come early), so a loaded machine cannot make this test fail."""
    a, b = replicas(), replicas()
    client = HttpTeacherClient([a.url, b.url], model="fake", cooldown_s=0.05, cooldown_max_s=0.4)
    seen: list[float] = []  # each cool-down length the failing replica went through, in order

    async def until(condition: Callable[[], bool], limit_s: float = 10.0) -> None:
        """Send queries one by one until ``condition`` holds, noting each new cool-down length."""
        deadline = time.monotonic() + limit_s
        while not condition():
            assert time.monotonic() < deadline, "condition never held"
            await client.infer(query())
            cooldown = client._replicas[0].cooldown
            if cooldown and (not seen or cooldown != seen[-1]):
                seen.append(cooldown)

    async def main() -> tuple[list[float], list[float]]:
        await client.start(5)
        a.plan, a.ready = ["503"], False
        a.health_checks.clear()
        await until(lambda: len(a.health_checks) >= 5)
        grown, probes = list(seen), list(a.health_checks)
        a.ready = True
        served = a.infers
        await until(lambda: a.infers > served)  # probe passed, an infer succeeded: no longer suspect
        assert client._replicas[0].cooldown == 0.0
        seen.clear()
        a.plan = ["503"]
        await until(lambda: a.infers > served + 1)
        await client.aclose()
        return grown, probes

    grown, probes = asyncio.run(main())
    assert grown == [0.05, 0.1, 0.2, 0.4], grown  # doubled per failure in a row, capped at 0.4
    gaps = [later - earlier for earlier, later in itertools.pairwise(probes)]
    floors = [0.1, 0.2, 0.4, 0.4]  # a probe never comes before its cool-down ends
    assert all(gap >= floor - 0.01 for gap, floor in zip(gaps[:4], floors, strict=True)), gaps
    assert seen == [0.05]  # after a success the next failure starts from cooldown_s again


def test_per_request_timeout_then_failover(replicas) -> None:
    stuck, ok = replicas(), replicas()
    stuck.plan = ["sleep:3"]
    began = time.monotonic()
    (answer,) = run(HttpTeacherClient([stuck.url, ok.url], model="fake", timeout_s=0.3), query())
    assert time.monotonic() - began < 2.5 and (stuck.infers, ok.infers) == (1, 1)  # the stuck one takes 3 s
    assert answer.logits is not None


def test_exhausted_retries_raise_a_clear_error(replicas) -> None:
    stuck = replicas()
    stuck.plan = ["sleep:3", "sleep:3"]
    began = time.monotonic()
    with pytest.raises(TeacherUnavailableError) as err:
        run(
            HttpTeacherClient([stuck.url], model="fake", timeout_s=0.3, max_retries=1, backoff_base_s=0.01),
            query(),
        )
    assert time.monotonic() - began < 3 and stuck.infers == 2  # 6 s without the timeout
    assert stuck.url in str(err.value) and "timed out after 0.3s" in str(err.value)


def test_an_outage_log_says_how_long_the_trainer_keeps_waiting(monkeypatch, caplog) -> None:
    """Every retry says when it comes and what budget is left; the readiness wait that follows says
    how long it lasts and keeps saying how long is left, rather than waiting silently."""
    monkeypatch.setattr(http, "READY_NOTE_S", 0.2)
    client = HttpTeacherClient(
        [closed_url()], model="large", timeout_s=2.0, max_retries=2, backoff_base_s=0.01
    )

    async def outage() -> None:
        try:
            await ask_teachers({"large": client}, {"large": query()}, ready_timeout_s=0.7)
        finally:
            await client.aclose()

    with caplog.at_level(logging.WARNING), pytest.raises(TeacherCallError):
        asyncio.run(outage())
    lines = [record.getMessage() for record in caplog.records]
    first, second = (line for line in lines if "unreachable" in line)
    assert first.startswith("teacher 'large' unreachable (attempt 1/3: http://127.0.0.1:")
    assert re.search(r"retrying in \d+\.\d s; 2 attempt\(s\) left, at most 4 s more$", first), first
    assert re.search(r"\(attempt 2/3: .*; 1 attempt\(s\) left, at most 2 s more$", second), second
    assert any("waiting up to 0.7 s for it to be ready again, then giving up" in line for line in lines)
    assert any(
        re.search(
            r"teacher 'large' not ready \(ClientConnectorError: Cannot connect.*\): giving up in 0 s$", line
        )
        for line in lines
    )


def test_every_replica_down_raises_naming_them_all(replicas) -> None:
    up = replicas()
    client = HttpTeacherClient([up.url, closed_url()], model="fake", max_retries=3, backoff_base_s=0.01)

    async def main() -> None:
        await client.start(5)
        up.stop()
        try:
            await client.infer(query())
        finally:
            await client.aclose()

    began = time.monotonic()
    with pytest.raises(TeacherUnavailableError) as err:
        asyncio.run(main())
    assert time.monotonic() - began < 3
    message = str(err.value)
    assert (
        all(url in message for url in client.urls)
        and "4 attempts" in message
        and "Cannot connect to host" in message
    )


def test_client_errors_are_not_retried_and_carry_the_server_text(replicas) -> None:
    replica = replicas()
    replica.plan = ["400"]
    with pytest.raises(TeacherRequestError) as err:
        run(HttpTeacherClient([replica.url], model="fake"), query())
    assert replica.infers == 1
    assert err.value.status == 400 and err.value.field == "inputs[0].data"
    assert "token id 9999 is outside the vocabulary" in str(err.value)


def test_the_client_survives_a_new_event_loop(replicas) -> None:
    replica = replicas()
    client = HttpTeacherClient([replica.url], model="fake")
    asyncio.run(client.start(5))
    answers = [asyncio.run(client.infer(query())) for _ in range(2)]
    asyncio.run(client.aclose())
    assert replica.infers == 2 and all(a.logits is not None for a in answers)


async def _sequential(client: HttpTeacherClient, n: int) -> list[TeacherAnswer]:
    await client.start(5)
    try:
        return [await client.infer(query()) for _ in range(n)]
    finally:
        await client.aclose()


# --- against the real teacher service -------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_service(tiny_teachers) -> Iterator[ServerThread]:
    """``teacher-server``'s own app with both tiny teachers, on a loopback port."""
    from teacher_server.app import create_app
    from teacher_server.config import ServerConfig, TeacherConfig

    config = ServerConfig(
        teachers=[
            TeacherConfig(name=name, path=str(path), max_queue_delay_ms=1)
            for name, path in tiny_teachers.items()
        ]
    )
    server = ServerThread(create_app(config, api_key="k3y"), lifespan="on").start()
    yield server
    server.stop()


def real_queries(num_layers: int) -> list[TeacherQuery]:
    generator = torch.Generator().manual_seed(num_layers)
    ids = torch.randint(5, 90, (4, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[3, 3:] = 0
    types = torch.zeros_like(ids)
    types[:, 5:] = 1
    short = torch.ones_like(ids)
    short[:, 6:] = 0  # the last 3 columns are padding in every row
    return [
        TeacherQuery(ids, mask, types, want_logits=True, cls_layers=(0, num_layers), use_cache=False),
        TeacherQuery(
            ids, mask, types, want_logits=False, cls_layers=(1,), token_layers=(0, 1), use_cache=False
        ),
        TeacherQuery(ids[:2, :7], mask[:2, :7], None, want_logits=True, use_cache=False),
        TeacherQuery(ids, short, types, want_logits=True, token_layers=(num_layers,), use_cache=False),
    ]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_real_service_answers_like_the_in_process_teacher(
    teacher_service, tiny_teachers, binary: bool
) -> None:
    from student_trainer.teachers.local import LocalTeacherClient

    async def main(name: str) -> None:
        remote = HttpTeacherClient([teacher_service.url], model=name, api_key="k3y", binary=binary)
        local = LocalTeacherClient(tiny_teachers[name], name=name)
        assert await remote.start(60) == await local.start(60)
        try:
            for q in real_queries(local.info.num_layers):
                got, want = await remote.infer(q), await local.infer(q)
                for output in ("logits", "hidden_cls", "hidden_states"):
                    if getattr(want, output) is None:
                        assert getattr(got, output) is None
                    else:
                        torch.testing.assert_close(
                            getattr(got, output), getattr(want, output), rtol=0, atol=1e-5
                        )
                assert (got.teacher_flops, got.tokens, got.padded_tokens) == (
                    want.teacher_flops,
                    want.tokens,
                    want.padded_tokens,
                )
                assert got.teacher_flops > 0 and got.cache_hits == 0
        finally:
            await remote.aclose()
            await local.aclose()

    for name in tiny_teachers:
        asyncio.run(main(name))


def test_the_in_process_teacher_skips_all_padding_columns(tiny_teachers) -> None:
    from student_trainer.teachers.local import LocalTeacherClient

    padded = real_queries(2)[3]
    trimmed = TeacherQuery(
        padded.input_ids[:, :6], padded.attention_mask[:, :6], padded.token_type_ids[:, :6],
        want_logits=True, token_layers=padded.token_layers, use_cache=False,
    )  # fmt: skip

    async def main() -> tuple[TeacherAnswer, TeacherAnswer]:
        local = LocalTeacherClient(tiny_teachers["small"], name="small")
        await local.start(60)
        try:
            return await local.infer(padded), await local.infer(trimmed)
        finally:
            await local.aclose()

    got, want = asyncio.run(main())
    assert (got.teacher_flops, got.tokens, got.padded_tokens) == (want.teacher_flops, 24, 24)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)
    assert got.hidden_states.shape == (4, 1, 9, 32)  # the query's own width, as the service answers
    torch.testing.assert_close(got.hidden_states[:, :, :6], want.hidden_states, rtol=0, atol=0)
    assert not got.hidden_states[:, :, 6:].any()


def test_real_service_reports_cache_hits_and_refuses_bad_input(teacher_service) -> None:
    async def main() -> tuple[TeacherAnswer, TeacherAnswer]:
        client = HttpTeacherClient([teacher_service.url], model="small", api_key="k3y")
        await client.start(60)
        try:
            q = real_queries(2)[0]
            q.use_cache = True
            first, second = await client.infer(q), await client.infer(q)
            q.input_ids = q.input_ids.clone()
            q.input_ids[0, 0] = 10_000
            with pytest.raises(TeacherRequestError) as err:
                await client.infer(q)
            assert err.value.status == 422 and "input_ids" in (err.value.field or "")
            return first, second
        finally:
            await client.aclose()

    first, second = asyncio.run(main())
    assert second.cache_hits > first.cache_hits
    torch.testing.assert_close(second.logits, first.logits, rtol=0, atol=0)


def test_distill_with_a_wrong_api_key_names_the_401_and_the_variable(replicas, tmp_path, monkeypatch, capsys):
    """A refused key is a configuration error said at once, not a teacher that was 'not ready'."""
    from shared.errors import EXIT_USAGE
    from student_trainer.cli import main
    from tests.distill_support import distill_argv, save_student, write_sentences

    replica = replicas(api_key="s3cret")
    monkeypatch.setenv("TEACHER_KEY", "wrong")
    train = write_sentences(tmp_path / "train.tsv", 16, seed=1)
    argv = distill_argv(
        save_student(tmp_path / "student"), train, tmp_path / "run", {"large": f"{replica.url}#fake"}
    )
    began = time.monotonic()
    code = main(["distill", *argv, "--api_key_env", "TEACHER_KEY"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_USAGE and time.monotonic() - began < 30
    assert "HTTP 401" in err[-1] and "TEACHER_KEY" in err[-1] and "not ready" not in err[-1], err


def test_a_v2_server_that_is_not_ours_answers_logits_costed_by_the_tokens_sent(replicas) -> None:
    replica = replicas()
    replica.foreign = True  # no teacher parameters in the metadata, no counts in the answers
    client = HttpTeacherClient([replica.url], model="fake")
    q = query()
    (answer,) = run(client, q)
    assert client.info is not None and client.info.num_labels == len(LABELS) and client.info.vocab_size == 0
    assert client.info.label_names == tuple(f"LABEL_{i}" for i in range(len(LABELS)))
    torch.testing.assert_close(answer.logits, expected(q)["logits"])
    assert (answer.tokens, answer.padded_tokens, answer.teacher_flops) == (
        int(q.attention_mask.sum()),
    ) * 2 + (0,)
    assert replica.infers == 2  # one row at start-up told its number of classes
