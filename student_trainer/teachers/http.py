"""The HTTP teacher backend: KServe v2 replicas of one teacher behind client-side balancing.

Each query is one binary v2 request (token ids in — or, for a teacher with its own vocabulary, the
rows' raw text as BYTES — only the outputs the loss needs out) sent
to the replica with the fewest requests in flight. Failures are retried with exponential
backoff and full jitter: ``429``/``503`` wait at least the server's ``Retry-After`` (capped at
``backoff_max_s``) before that replica is asked again, other replicas are tried meanwhile (when
every replica is waiting out a ``Retry-After``, the one free soonest is asked); connection
errors, timeouts and other ``5xx`` fail over to another replica at once and put the failing
one in a cool-down so later queries skip it while another is healthy. Other ``4xx`` mean the
request itself is wrong, so they are raised at once with the server's error text.

A replica that fails is suspect until it answers an infer request again. Its cool-down starts
at ``cooldown_s`` and doubles with each failure in a row (capped at ``cooldown_max_s``), and
before real traffic goes back to it a ``GET /v2/health/ready`` must answer 200 within
``PROBE_TIMEOUT_S``; a failed probe counts as another failure. So a replica that hangs costs
one ``timeout_s`` when it first hangs and then at most one short probe per (growing)
cool-down, instead of a full ``timeout_s`` every ``cooldown_s``; one whose health check
passes but whose infer still hangs costs a ``timeout_s`` per cool-down, at most once per
``cooldown_max_s``.

Proxy variables (``HTTP_PROXY``, ``NO_PROXY``, …) apply to remote replicas, never to loopback
ones: a service on this machine is always reached directly.

The transport is aiohttp: a trainer at small ``r`` sends one small request per step, and
aiohttp's round trip costs ~0.4 ms on 2 cores where httpx's costs ~1.5 ms
(``benchmarks/bench_http_clients.py``).

``host`` sends every request with that ``Host`` header: a KServe InferenceService reached through
its ingress gateway's address is routed by the host name in its ``status.url``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import re
import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import torch

from shared.api_key import clean_api_key
from shared.codec import (
    HEADER_LENGTH,
    OUTPUT_DATATYPES,
    CodecError,
    Tensor,
    build_request_body,
    parse_response_body,
)
from shared.errors import UserError
from shared.protocol import ErrorBody, ModelMetadata
from shared.teacher_api import TeacherAnswer, TeacherInfo, TeacherQuery, TextQuery, Timings, query_rows
from student_trainer.kd.ledger import uncounted_flops
from student_trainer.teachers.client import TeacherRequestError, TeacherUnavailableError

log = logging.getLogger(__name__)

RETRY_STATUSES = (429, 503)
TRANSPORT_ERRORS = (aiohttp.ClientError, TimeoutError)  # the replica did not answer (TimeoutError: in time)
PROBE_TIMEOUT_S = 1.0  # a health check answers in milliseconds unless the replica is stuck
READY_NOTE_S = 10.0  # while waiting for readiness, say every this often how long the wait may last
HOST_PATTERN = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?(:\d{1,5})?")  # a Host header: name[:port]
FOREIGN_MAX_LENGTH = 512  # what a v2 model that does not publish its limit is sent at most
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")  # reached directly, whatever the proxy variables say


class _Retryable(Exception):
    """One failed attempt that another attempt (maybe on another replica) may fix."""

    def __init__(self, message: str, *, retry_after_s: float | None = None, replica_down: bool = True):
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.replica_down = replica_down


@dataclasses.dataclass(frozen=True)
class _Reply:
    """One HTTP answer, read in full (a few rows' outputs, or an error body)."""

    status_code: int
    content: bytes
    headers: Mapping[str, str]
    reason_phrase: str

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")


@dataclasses.dataclass
class _Replica:
    url: str
    session: aiohttp.ClientSession | None = None  # opened on the running event loop (see _pool)
    outstanding: int = 0
    last_pick: int = 0  # ties go to the least recently picked replica
    cool_until: float = 0.0  # skipped while another replica is healthy
    cooldown: float = 0.0  # length of the last cool-down; 0 once an infer succeeded (not suspect)
    retry_at: float = 0.0  # the server's Retry-After: never sent to before this

    def order(self, now: float) -> tuple[float, float, int, int]:
        """Sort key: free of Retry-After soonest, out of cool-down soonest, fewest in flight,
        least recently picked (replicas usable now tie on the first two at ``now``)."""
        return (max(self.retry_at, now), max(self.cool_until, now), self.outstanding, self.last_pick)


class HttpTeacherClient:
    """A :class:`~student_trainer.teachers.client.TeacherClient` for ``teacher-server`` replicas.

    ``timeout_s`` bounds each attempt end to end (and is sent as the server-side deadline);
    ``max_retries`` counts attempts after the first; ``cooldown_s`` is how long a replica that
    failed is skipped while another one is healthy, doubling per failure in a row up to
    ``cooldown_max_s``. ``api_key`` is stripped of surrounding whitespace (keys read from
    files end in a newline). Options of the in-process backend (device, dtype, …) are accepted
    and ignored so one set of trainer options fits both.
    """

    health_path = "/v2/health/ready"  # what a replica answers 200 on once it is ready

    def __init__(
        self,
        urls: list[str],
        *,
        model: str,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 5,
        backoff_base_s: float = 0.2,
        backoff_max_s: float = 10.0,
        cooldown_s: float = 5.0,
        cooldown_max_s: float = 120.0,
        output_dtype: str = "FP32",
        binary: bool = True,
        host: str | None = None,
        **ignored_local_options: object,
    ):
        if not urls:
            raise UserError(f"teacher {model!r}: no service URL given")
        bad = [url for url in urls if not url.startswith(("http://", "https://"))]
        if bad:
            raise UserError(f"teacher {model!r}: service URLs must start with http:// or https://, got {bad}")
        if output_dtype.upper() not in OUTPUT_DATATYPES:
            raise UserError(f"output_dtype {output_dtype!r} is not one of {list(OUTPUT_DATATYPES)}")
        if api_key is not None:
            api_key = clean_api_key(api_key, f"teacher {model!r}")
        if host is not None and not HOST_PATTERN.fullmatch(host):
            raise UserError(f"teacher {model!r}: {host!r} is not a host name (HOST or HOST:PORT)")
        self.host = host
        self.urls = [url.rstrip("/") for url in urls]
        self.model = model
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.cooldown_s = cooldown_s
        self.cooldown_max_s = max(cooldown_max_s, cooldown_s)
        self.output_dtype = output_dtype.upper()
        self.binary = binary
        self.info: TeacherInfo | None = None
        self._replicas = [_Replica(url) for url in self.urls]
        self._picks = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        if self.host:
            self._headers["Host"] = self.host

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self, ready_timeout_s: float = 300.0) -> TeacherInfo:
        """Poll until one replica and its model are ready (bounded), then fetch the metadata."""
        replicas = await self._pool()
        deadline = time.monotonic() + ready_timeout_s
        poll_s = 0.05
        next_note = time.monotonic() + READY_NOTE_S
        while True:
            reasons = await asyncio.gather(*(self._not_ready(r, deadline) for r in replicas))
            ready = [r for r, reason in zip(replicas, reasons, strict=True) if reason is None]
            if ready:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                detail = "; ".join(f"{r.url}: {reason}" for r, reason in zip(replicas, reasons, strict=True))
                raise TeacherUnavailableError(
                    f"teacher {self.model!r} was not ready after {ready_timeout_s:g}s ({detail})"
                )
            if time.monotonic() >= next_note:  # a long wait (an outage) is never silent
                log.warning("teacher %r not ready (%s): giving up in %.0f s", self.model, reasons[0], left)
                next_note += READY_NOTE_S
            await asyncio.sleep(min(poll_s, left))
            poll_s = min(poll_s * 2, 1.0)
        for replica in replicas:
            if replica not in ready:
                self._cool_down(replica)
        self.info = await self._fetch_info(ready[0])
        return self.info

    async def _fetch_info(self, replica: _Replica) -> TeacherInfo:
        """The model's v2 metadata, as the trainer's :class:`TeacherInfo`."""
        response = await self._get(replica, f"/v2/models/{self.model}", "model metadata")
        try:
            metadata = ModelMetadata.model_validate_json(response.content)
            if metadata.parameters is None:  # a v2 server that is not this service
                return await self._foreign_info(metadata)
            return metadata.teacher_info()
        except ValueError as err:
            raise TeacherRequestError(f"{replica.url}: bad model metadata for {self.model!r}: {err}") from err

    async def _foreign_info(self, metadata: ModelMetadata) -> TeacherInfo:
        """A model of another KServe v2 server (Triton, KServe's own) as a logits teacher: it reads
        ``text`` (BYTES) if it declares that input, else the student's token ids; one row tells
        its number of classes. Its FLOPs are unknown (0): it is costed by tokens and calls."""
        text = any(i.name == "text" and i.datatype == "BYTES" for i in metadata.inputs)
        ones = torch.ones(1, 1, dtype=torch.long)
        probe = await self.infer(TextQuery(["."]) if text else TeacherQuery(ones, ones))
        assert probe.logits is not None
        num_labels = int(probe.logits.shape[1])
        return TeacherInfo(
            name=metadata.name,
            num_layers=1,  # unknown, and asked for logits only
            hidden_size=0,
            num_labels=num_labels,
            label_names=tuple(f"LABEL_{i}" for i in range(num_labels)),
            vocab_size=0,  # unknown: its ids are taken to be the student's
            max_seq_length=FOREIGN_MAX_LENGTH,
            flops_config=uncounted_flops(num_labels),
            text_only=text,
        )

    async def _get(self, replica: _Replica, path: str, what: str) -> _Reply:
        """One GET at start-up that must answer 200 (else the server's refusal is raised)."""
        try:
            response = await _send(replica, "GET", path, timeout_s=self.timeout_s)
        except TRANSPORT_ERRORS as err:
            raise TeacherUnavailableError(f"{replica.url}: {what}: {_describe(err)}") from err
        if response.status_code != 200:
            raise self._refusal(replica, response)
        return response

    async def aclose(self) -> None:
        """Close the pooled connections; the client may be started again afterwards."""
        if self._loop is asyncio.get_running_loop():
            await asyncio.gather(*(r.session.close() for r in self._replicas if r.session is not None))
        self._disconnect()

    async def _not_ready(self, replica: _Replica, deadline: float) -> str | None:
        """None when the server and the model are ready, else why not (unknown model / bad key raise)."""
        timeout = max(0.05, min(self.timeout_s, 5.0, deadline - time.monotonic()))
        try:
            server = await _send(replica, "GET", self.health_path, timeout_s=timeout)
            if server.status_code in (401, 403):
                raise self._refusal(replica, server)
            if server.status_code != 200:
                return f"server not ready (HTTP {server.status_code})"
            model = await _send(replica, "GET", f"/v2/models/{self.model}/ready", timeout_s=timeout)
        except TRANSPORT_ERRORS as err:
            return _describe(err)
        if model.status_code == 200:
            return None
        if model.status_code in (401, 403, 404):
            raise self._refusal(replica, model)
        return f"model not ready (HTTP {model.status_code})"

    async def _pool(self) -> list[_Replica]:
        """The replicas, with connection pools opened on the running event loop."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._loop is not None:  # pooled connections belong to the loop that opened them
                log.info("event loop changed: new connections to teacher %r", self.model)
                self._disconnect()
            for replica in self._replicas:
                loopback = urlsplit(replica.url).hostname in LOOPBACK_HOSTS
                replica.session = aiohttp.ClientSession(
                    headers=self._headers,
                    connector=aiohttp.TCPConnector(limit=64),
                    trust_env=not loopback,  # proxy variables, for remote replicas only
                )
            self._loop = loop
        return self._replicas

    def _disconnect(self) -> None:
        """Forget the sessions; those of a loop that has ended are dropped without touching it."""
        for replica in self._replicas:
            session, replica.session = replica.session, None
            if session is not None and not session.closed:
                connector = session.connector
                session.detach()
                if connector is not None:
                    # the synchronous part of close(): its loop may have ended, so nothing can await
                    connector._close()
        self._loop = None

    # --- queries ------------------------------------------------------------------------------

    async def infer(self, query: TeacherQuery | TextQuery) -> TeacherAnswer:
        """Ask for exactly what ``query`` wants; return float32 CPU tensors and the service's counts."""
        outputs: dict[str, dict[str, str] | None] = {}
        if query.want_logits:
            outputs["logits"] = None
        if query.cls_layers:
            outputs["hidden_cls"] = {"layers": _layer_list(query.cls_layers)}
        if query.token_layers:
            outputs["hidden_states"] = {"layers": _layer_list(query.token_layers)}
        if not outputs:
            raise ValueError("the query asks for no teacher output (logits, cls_layers or token_layers)")
        inputs = _inputs(query)
        body, headers = build_request_body(
            inputs,
            outputs=outputs,
            parameters={
                "output_dtype": self.output_dtype,
                "cache": query.use_cache,
                "timeout_ms": int(self.timeout_s * 1000),
            },
            binary_inputs=self.binary,
            binary_outputs=self.binary,
        )
        replica, response = await self._post(f"/v2/models/{self.model}/infer", body, headers)
        try:
            decoded = parse_response_body(response.content, response.headers.get(HEADER_LENGTH))
        except CodecError as err:
            raise TeacherRequestError(f"{replica.url}: invalid v2 response: {err}", field=err.field) from err
        return self._answer(replica, query, decoded.outputs, decoded.header.parameters or {})

    def _answer(
        self,
        replica: _Replica,
        query: TeacherQuery | TextQuery,
        outputs: dict[str, Tensor],
        params: Mapping[str, object],
    ) -> TeacherAnswer:
        """Check every asked-for output came back with the query's batch and layer counts (and token
        length: a text query's is the teacher's own, whatever it is)."""
        batch = query_rows(query)
        length = None if isinstance(query, TextQuery) else int(query.input_ids.shape[1])

        def tensor(name: str, shape: tuple[int | None, ...]) -> torch.Tensor:
            value = outputs.get(name)
            if (
                not isinstance(value, torch.Tensor)
                or value.dim() != len(shape)
                or any(want is not None and got != want for got, want in zip(value.shape, shape, strict=True))
            ):
                got = list(value.shape) if isinstance(value, torch.Tensor) else value
                raise TeacherRequestError(
                    f"{replica.url}: output {name!r} is {got}, expected shape {list(shape)}"
                )
            return value.to(torch.float32)

        def number(name: str) -> float:
            value = params.get(name, 0)
            return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0

        def count(name: str) -> int:
            return int(number(name))

        cls_shape, token_shape = (
            (batch, len(query.cls_layers), None),
            (batch, len(query.token_layers), length, None),
        )
        return TeacherAnswer(
            logits=tensor("logits", (batch, None)) if query.want_logits else None,
            hidden_cls=tensor("hidden_cls", cls_shape) if query.cls_layers else None,
            hidden_states=tensor("hidden_states", token_shape) if query.token_layers else None,
            teacher_flops=count("teacher_flops"),
            tokens=count("tokens") if "tokens" in params else _real_tokens(query),
            padded_tokens=count("padded_tokens") if "padded_tokens" in params else _real_tokens(query),
            cache_hits=count("cache_hits"),
            timings=Timings(queue_us=number("queue_us"), compute_us=number("compute_us")),
        )

    async def _post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[_Replica, _Reply]:
        """Send one infer request, retrying and failing over until it succeeds or the budget is spent."""
        replicas = await self._pool()
        errors: list[str] = []
        failed: _Replica | None = None
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            now = time.monotonic()
            replica = min(replicas, key=lambda r: r.order(now))
            wait = replica.retry_at - now
            if failed is not None and (replica is failed or replica.cool_until > now):
                wait = max(wait, self._backoff(attempt))
            if errors:
                log.warning(
                    "teacher %r unreachable (attempt %d/%d: %s): retrying in %.1f s; %s",
                    self.model,
                    attempt,
                    attempts,
                    errors[-1],
                    max(wait, 0.0),
                    self._retries_left(attempt),
                )
            if wait > 0:
                await asyncio.sleep(wait)
            try:
                response = await self._attempt(replica, path, body, headers)
            except _Retryable as err:
                errors.append(f"{replica.url}: {err}")
                self._mark_failed(replica, err)
                failed = replica
                continue
            replica.cool_until = replica.cooldown = 0.0
            return replica, response
        raise TeacherUnavailableError(
            f"teacher {self.model!r} unavailable at {', '.join(self.urls)} after "
            f"{self.max_retries + 1} attempts; last error: {errors[-1]}"
        )

    def _retries_left(self, attempt: int) -> str:
        """What is left of the retry budget before attempt ``attempt`` (0-based): a refused
        connection fails at once, a hung replica costs ``timeout_s``, plus each retry's backoff."""
        left = self.max_retries + 1 - attempt
        backoffs = sum(
            min(self.backoff_max_s, self.backoff_base_s * 2 ** (a - 1))
            for a in range(attempt + 1, attempt + left)
        )
        return f"{left} attempt(s) left, at most {left * self.timeout_s + backoffs:.0f} s more"

    async def _attempt(self, replica: _Replica, path: str, body: bytes, headers: dict[str, str]) -> _Reply:
        """One request to one replica (health-probed first if suspect), bounded by ``timeout_s``."""
        self._picks += 1
        replica.outstanding += 1
        replica.last_pick = self._picks
        try:
            if replica.cooldown:
                await self._probe(replica)
            response = await _retryable(
                replica, "POST", path, timeout_s=self.timeout_s, body=body, headers=headers
            )
        finally:
            replica.outstanding -= 1
        if response.status_code == 200:
            return response
        if response.status_code in RETRY_STATUSES:
            raise _Retryable(
                f"HTTP {response.status_code} {_error_text(response)}",
                retry_after_s=_retry_after_s(response),
                replica_down=response.status_code == 503,
            )
        if response.status_code >= 500:
            raise _Retryable(f"HTTP {response.status_code} {_error_text(response)}")
        raise self._refusal(replica, response)

    async def _probe(self, replica: _Replica) -> None:
        """Let real traffic back to a suspect replica only if its health check answers 200 quickly."""
        probe_s = min(self.timeout_s, PROBE_TIMEOUT_S)
        try:
            health = await _retryable(replica, "GET", self.health_path, timeout_s=probe_s)
        except _Retryable as err:
            raise _Retryable(f"health probe {err}") from None
        if health.status_code != 200:
            raise _Retryable(f"health probe: HTTP {health.status_code}")

    def _mark_failed(self, replica: _Replica, err: _Retryable) -> None:
        if err.retry_after_s is not None:
            replica.retry_at = time.monotonic() + min(err.retry_after_s, self.backoff_max_s)
        if err.replica_down:
            self._cool_down(replica)

    def _cool_down(self, replica: _Replica) -> None:
        """Skip a failed replica for a while: ``cooldown_s``, doubled per failure in a row, capped."""
        replica.cooldown = (
            min(2 * replica.cooldown, self.cooldown_max_s) if replica.cooldown else self.cooldown_s
        )
        replica.cool_until = time.monotonic() + replica.cooldown

    def _backoff(self, attempt: int) -> float:
        """Full jitter before retry ``attempt`` (1 = the first retry): uniform in
        ``[0, min(backoff_max_s, backoff_base_s · 2^(attempt-1)))``."""
        return random.uniform(0.0, min(self.backoff_max_s, self.backoff_base_s * 2 ** (attempt - 1)))

    def _refusal(self, replica: _Replica, response: _Reply) -> TeacherRequestError:
        """A 4xx the user must fix, with the server's own words and the field it names."""
        try:
            error = ErrorBody.model_validate_json(response.content)
            text, bad_field = error.error, error.field
        except ValueError:
            text, bad_field = response.text[:500] or response.reason_phrase, None
        where = f" (field {bad_field})" if bad_field else ""
        return TeacherRequestError(
            f"teacher {self.model!r} at {replica.url} refused the request: "
            f"HTTP {response.status_code}: {text}{where}",
            status=response.status_code,
            field=bad_field,
        )


def _inputs(query: TeacherQuery | TextQuery) -> dict[str, Tensor]:
    """A query's v2 inputs: INT32 token ids, or BYTES text the service tokenizes itself."""
    if isinstance(query, TextQuery):
        inputs: dict[str, Tensor] = {"text": list(query.text)}
        if query.text_pair is not None:
            inputs["text_pair"] = list(query.text_pair)
        return inputs
    inputs = {
        "input_ids": query.input_ids.to(torch.int32),
        "attention_mask": query.attention_mask.to(torch.int32),
    }
    if query.token_type_ids is not None:
        inputs["token_type_ids"] = query.token_type_ids.to(torch.int32)
    return inputs


def _real_tokens(query: TeacherQuery | TextQuery) -> int:
    """The query's tokens, for a server that does not count them: its ids' (text: unknown, 0)."""
    return 0 if isinstance(query, TextQuery) else int(query.attention_mask.sum())


def _layer_list(layers: tuple[int, ...]) -> str:
    """v2 parameters are scalars, so layers travel as ``"0,6,12"``."""
    return ",".join(str(int(i)) for i in layers)


async def _send(
    replica: _Replica,
    method: str,
    path: str,
    *,
    timeout_s: float,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
) -> _Reply:
    """One HTTP exchange on the replica's pooled connections, ``timeout_s`` end to end."""
    assert replica.session is not None, "a replica is used only through _pool"
    async with replica.session.request(
        method,
        replica.url + path,
        data=body,
        headers=headers,
        timeout=aiohttp.ClientTimeout(total=timeout_s),
    ) as response:
        return _Reply(response.status, await response.read(), response.headers, response.reason or "")


async def _retryable(replica: _Replica, method: str, path: str, *, timeout_s: float, **send: Any) -> _Reply:
    """:func:`_send` (``send``: its body and headers), where a replica that did not answer is worth
    another attempt."""
    try:
        return await _send(replica, method, path, timeout_s=timeout_s, **send)
    except TRANSPORT_ERRORS as err:
        reason = f"timed out after {timeout_s:g}s" if isinstance(err, TimeoutError) else _describe(err)
        raise _Retryable(reason) from None


def _describe(err: Exception) -> str:
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


def _error_text(response: _Reply) -> str:
    try:
        return ErrorBody.model_validate_json(response.content).error
    except ValueError:
        return response.text[:200]


def _retry_after_s(response: _Reply) -> float | None:
    """``Retry-After`` as seconds (delta-seconds or an HTTP date), None when absent or unreadable."""
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None
