"""One asyncio dynamic batcher per teacher: many small requests in, few full forward passes out.

Requests are split into rows (instances). Rows answered by the cache never queue; the rest are
served by *continuous batching*: an idle engine starts at once (``max_queue_delay_ms`` > 0 makes
it wait that long at most for company), and whatever arrives during a pass joins the next one.
Before every pass the rows waiting (a window of a few passes' worth, oldest requests first) are
planned afresh: rows of the same output depth, sorted by length and cut into buckets
(:func:`plan_batches`) within ``max_batch_size`` rows and ``max_batch_tokens`` padded tokens;
the bucket holding a row of the oldest request runs. So length bucketing has choice under load,
yet no request waits behind a whole round of later ones. Forward passes run one at a time in a
worker thread, so the event loop keeps answering health checks and metrics. Every request gets
its own rows back and, per row, an exact share of the FLOPs of the pass it rode in (rows of one
pass have the same padded length).

A request whose client went away or whose deadline passed is cancelled by its handler: it
leaves the queue at once (its slot is free for live requests) and, if already begun, its
remaining rows are left out of the next plan.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from shared.openmp import serial_thread
from shared.teacher_api import TeacherAnswer, TeacherQuery, Timings
from teacher_engine.engine import OutputSpec, QueryError, TeacherEngine, padded_cost, realigned, right_aligned
from teacher_server.cache import OutputCache, RowOutputs, row_key
from teacher_server.config import TeacherConfig
from teacher_server.errors import ServiceError
from teacher_server.metrics import ServiceMetrics

# Each plan looks ahead at this many passes' worth of waiting rows: enough choice for length
# bucketing; only the bucket with the oldest request's row runs, so a wide window holds no one back.
WINDOW_PASSES = 4

log = logging.getLogger(__name__)
T = TypeVar("T")


class QueueFullError(ServiceError):
    """The bounded queue is full; retry after ``retry_after_s`` seconds."""

    status = 429

    def __init__(self, retry_after_s: int):
        super().__init__(
            f"queue is full, retry after {retry_after_s} s", headers={"Retry-After": str(retry_after_s)}
        )
        self.retry_after_s = retry_after_s


class DeadlineExceededError(ServiceError):
    """The request's own deadline passed before its answer was ready."""

    status = 504

    def __init__(self, message: str):
        super().__init__(message, "parameters.timeout_ms")


class ShuttingDownError(ServiceError):
    """The service is draining and takes no new work."""

    status = 503

    def __init__(self, message: str):
        super().__init__(message, headers={"Retry-After": "1"})


@dataclass(eq=False)
class _Request:
    query: TeacherQuery
    spec: OutputSpec
    lengths: list[int]
    enqueued: float
    future: asyncio.Future[TeacherAnswer]
    outputs: list[RowOutputs | None]
    cache_keys: list[bytes | None]
    cache_hits: int
    todo: int  # rows still to compute
    todo_tokens: int  # their real tokens: what the batcher's budgets count (cached rows cost nothing)
    flops: int = 0
    padded_tokens: int = 0
    compute_s: float = 0.0
    started: float | None = None

    def pending_rows(self) -> list[int]:
        return [i for i, out in enumerate(self.outputs) if out is None]


def compute_thread(device: str) -> ThreadPoolExecutor:
    """The one thread that loads, warms up and runs every teacher on ``device``. OpenMP keeps a
    pool of workers per calling thread, and a second pool on the same cores slows every pass: a
    teacher loaded on one thread and run on another (``benchmarks/bench_teacher_thread.py``), or two
    teachers on two threads (1.4x slower passes at 2 threads, :mod:`shared.openmp`). Passes on
    one device's cores run one at a time anyway."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"compute-{device}")


@dataclass(frozen=True)
class Row:
    request: _Request
    index: int
    length: int


def plan_batches(
    rows: list[Row],
    max_rows: int,
    max_tokens: int,
    pass_overhead_tokens: int,
    padding_cost: Callable[[int, int, int], float] = padded_cost,
) -> list[list[Row]]:
    """Sort rows by length and cut them into passes (length bucketing).

    A pass ends at ``max_rows`` rows or ``max_tokens`` padded tokens (rows × longest row), or
    when taking the next, longer row would cost the rows already in the pass more padding
    (``padding_cost``, in tokens) than a separate pass costs (``pass_overhead_tokens``): cheap
    passes (CPU) make short, tight buckets, expensive ones (GPU kernel launches) make few,
    large passes, and a packed engine, whose padding costs only attention, makes fewer still.
    """
    batches: list[list[Row]] = []
    current: list[Row] = []
    for row in sorted(rows, key=lambda r: r.length):
        if current:
            longest = current[-1].length
            full = len(current) + 1 > max_rows or (len(current) + 1) * row.length > max_tokens
            if full or padding_cost(len(current), longest, row.length) > pass_overhead_tokens:
                batches.append(current)
                current = []
        current.append(row)
    if current:
        batches.append(current)
    return batches


def _copy_rows(into: torch.Tensor, given: torch.Tensor, indices: list[int]) -> None:
    """``given``'s rows ``indices`` into ``into`` (as many columns as both have): one copy, and no
    index tensor where they are all of ``given``'s rows in order (a request in one pass)."""
    width = min(into.shape[1], given.shape[1])
    whole = indices == list(range(given.shape[0]))
    into[:, :width] = (given if whole else given[torch.tensor(indices)])[:, :width]


def slice_row(answer: TeacherAnswer, j: int, length: int, *, ran: OutputSpec, want: OutputSpec) -> RowOutputs:
    """Row ``j`` of a pass that computed ``ran``, cut down to the layers ``want`` asked for."""
    cls_index = [ran.cls_layers.index(k) for k in want.cls_layers]
    token_index = [ran.token_layers.index(k) for k in want.token_layers]
    return RowOutputs(
        logits=answer.logits[j] if want.want_logits else None,
        hidden_cls=answer.hidden_cls[j, cls_index] if cls_index else None,
        hidden_states=answer.hidden_states[j, token_index, :length] if token_index else None,
    )


class DynamicBatcher:
    """Queue, plan and run one teacher's work; :meth:`infer` is the only entry point."""

    def __init__(
        self,
        engine: TeacherEngine,
        config: TeacherConfig,
        *,
        cache: OutputCache,
        metrics: ServiceMetrics,
        executor: ThreadPoolExecutor | None = None,
    ):
        self.engine = engine
        self.config = config
        self.cache = cache
        self.metrics = metrics
        self.name = engine.info.name
        self._queue: deque[_Request] = deque()  # not begun, FIFO
        self._active: list[_Request] = []  # some rows computed or being computed
        self._wakeup = asyncio.Event()
        self._closing = False
        # forward passes, one at a time, on the thread that loaded the engine (compute_thread):
        # the service's, shared by the device's teachers, or one of this batcher's own
        self._owns_executor = executor is None
        self._executor = executor or compute_thread(config.device)
        # tokenizing requests: one at a time (a fast tokenizer must not be called from two threads
        # at once), beside the forward passes, not behind them; large ones off the event loop
        self._preprocessor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"tokenize-{self.name}", initializer=serial_thread
        )
        self._tokenizer_lock = threading.Lock()
        self._task: asyncio.Task[None] | None = None
        self._seconds_per_row = 0.05  # refined after every pass; only used for Retry-After
        self._pad_id = int(engine.config.pad_token_id or 0)

    def start(self) -> None:
        self._task = asyncio.create_task(self._serve(), name=f"batcher-{self.name}")

    async def preprocess(self, work: Callable[..., T], *args: Any, inline: bool = False) -> T:
        """Run ``work(*args)`` (tokenize a request), holding the tokenizer: on the event loop when
        ``inline`` (a small request) and the tokenizer is free at once, else on this teacher's
        preprocessing thread (the loop never waits for the lock)."""
        if inline and self._tokenizer_lock.acquire(blocking=False):
            try:
                return work(*args)
            finally:
                self._tokenizer_lock.release()
        return await asyncio.get_running_loop().run_in_executor(self._preprocessor, self._locked, work, *args)

    def _locked(self, work: Callable[..., T], *args: Any) -> T:
        with self._tokenizer_lock:
            return work(*args)

    async def infer(self, query: TeacherQuery, *, timeout_s: float | None = None) -> TeacherAnswer:
        """Answer one request; raises QueryError, QueueFullError, DeadlineExceededError, ShuttingDownError."""
        if self._closing:
            self.metrics.rejected.labels(self.name, "shutting_down").inc()
            raise ShuttingDownError(f"teacher {self.name!r} is shutting down")
        self.engine.validate(query)
        rows = query.input_ids.shape[0]
        if rows > self.config.max_batch_size:
            raise QueryError("input_ids", f"{rows} rows exceed max_batch_size {self.config.max_batch_size}")
        query, pads = right_aligned(query)  # a decoder's left-padded rows: real tokens first, as merged
        return realigned(await self._infer(query, timeout_s), pads)

    async def _infer(self, query: TeacherQuery, timeout_s: float | None) -> TeacherAnswer:
        request = self._prepare(query)
        if request.todo == 0:
            return self._answer(request)
        if len(self._queue) >= self.config.max_queue_size:
            self.metrics.rejected.labels(self.name, "queue_full").inc()
            raise QueueFullError(self._retry_after_s())
        self._queue.append(request)
        self.metrics.queue_depth.labels(self.name).set(len(self._queue))
        self._wakeup.set()
        try:
            return await asyncio.wait_for(request.future, timeout_s)
        except TimeoutError:
            self._withdraw(request)
            self.metrics.rejected.labels(self.name, "deadline").inc()
            raise DeadlineExceededError(f"no answer within {timeout_s * 1000:.0f} ms") from None
        except asyncio.CancelledError:  # the handler gave up: its client disconnected
            self._withdraw(request)
            self.metrics.rejected.labels(self.name, "cancelled").inc()
            raise

    async def close(self, timeout_s: float) -> None:
        """Stop taking work, finish what is queued (bounded by ``timeout_s``), fail the rest."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
            except TimeoutError:
                self._task.cancel()
        for request in [*self._active, *self._queue]:  # a cancelled pass leaves its requests unanswered
            if not request.future.done():
                request.future.set_exception(
                    ShuttingDownError("the service stopped before this request was answered")
                )
        self._active = []
        self._queue.clear()
        if self._owns_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self._preprocessor.shutdown(wait=False, cancel_futures=True)

    # -- admission ------------------------------------------------------------------------------

    def _prepare(self, query: TeacherQuery) -> _Request:
        """Split into rows and answer what the cache already knows."""
        spec = OutputSpec.of(query)
        lengths = [int(n) for n in query.attention_mask.sum(dim=1).tolist()]
        types = (
            query.token_type_ids if query.token_type_ids is not None else torch.zeros_like(query.input_ids)
        )
        outputs: list[RowOutputs | None] = [None] * len(lengths)
        keys: list[bytes | None] = [None] * len(lengths)
        use_cache = query.use_cache and self.cache.max_bytes > 0
        for i, length in enumerate(lengths if use_cache else ()):
            key = row_key(
                self.name, self.engine.revision, query.input_ids[i, :length], types[i, :length], spec
            )
            outputs[i] = self.cache.get(key)
            keys[i] = key if outputs[i] is None else None
        hits = sum(out is not None for out in outputs)
        if use_cache:
            self.metrics.cache_hits.labels(self.name).inc(hits)
            self.metrics.cache_misses.labels(self.name).inc(len(lengths) - hits)
        loop = asyncio.get_running_loop()
        return _Request(
            query=query,
            spec=spec,
            lengths=lengths,
            enqueued=loop.time(),
            future=loop.create_future(),
            outputs=outputs,
            cache_keys=keys,
            cache_hits=hits,
            todo=len(lengths) - hits,
            todo_tokens=sum(n for n, out in zip(lengths, outputs, strict=True) if out is None),
        )

    def _withdraw(self, request: _Request) -> None:
        """Take a request its handler gave up on out of the queue, so it neither holds a slot a live
        request could use nor counts in the queue depth and Retry-After."""
        with contextlib.suppress(ValueError):  # already begun: its remaining rows are skipped
            self._queue.remove(request)
            self.metrics.queue_depth.labels(self.name).set(len(self._queue))

    def _retry_after_s(self) -> int:
        queued_rows = sum(r.todo for r in self._queue)
        return max(1, min(60, math.ceil(queued_rows * self._seconds_per_row)))

    # -- scheduling -----------------------------------------------------------------------------

    async def _serve(self) -> None:
        while await self._work_is_due():
            rows, spec = self._next_pass()
            try:
                await self._run_pass(rows, spec)
            except Exception as err:  # a bug outside the forward pass: fail these requests, keep serving
                log.exception("teacher %s: a pass failed", self.name)
                for request in {row.request for row in rows}:
                    if not request.future.done():
                        request.future.set_exception(err)

    async def _work_is_due(self) -> bool:
        """Wait for work; an idle engine starts at once unless ``max_queue_delay_ms`` asks it to
        wait (at most that long) for a pass's worth of company. False once closed and drained."""
        loop = asyncio.get_running_loop()
        delay = self.config.max_queue_delay_ms / 1000
        while True:
            self._active = [r for r in self._active if not r.future.done()]
            if any(r.future.done() for r in self._queue):  # failed by close() or a pass
                self._queue = deque(r for r in self._queue if not r.future.done())
            if self._active:
                return True  # requests already begun come first, with no delay
            if not self._queue:
                if self._closing:
                    return False
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            wait = self._queue[0].enqueued + delay - loop.time()
            if not self.config.dynamic_batching or self._closing or wait <= 0 or self._a_pass_is_full():
                return True
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), wait)

    def _a_pass_is_full(self) -> bool:
        rows = sum(r.todo for r in self._queue)
        tokens = sum(r.todo_tokens for r in self._queue)
        return rows >= self.config.max_batch_size or tokens >= self.config.max_batch_tokens

    def _window(self) -> list[_Request]:
        """The requests the next pass may draw rows from: those begun, then the queue FIFO,
        up to ``WINDOW_PASSES`` passes' worth of rows (alone without dynamic batching)."""
        window = list(self._active)
        rows = sum(r.todo for r in window)
        tokens = sum(r.todo_tokens for r in window)
        for request in self._queue:
            if window and (
                not self.config.dynamic_batching
                or rows >= WINDOW_PASSES * self.config.max_batch_size
                or tokens >= WINDOW_PASSES * self.config.max_batch_tokens
            ):
                break
            window.append(request)
            rows += request.todo
            tokens += request.todo_tokens
        return window

    def _next_pass(self) -> tuple[list[Row], OutputSpec]:
        """Plan the window's rows into length buckets and take the bucket holding a row of the
        oldest request: a request finishes within a few passes of its start, however busy the
        queue, and what arrives during a pass joins the next plan (continuous batching). Its rows
        come by request, so that each request's go into the pass at once (:meth:`_merge`).

        A packed engine plans from the oldest rows alone, one pass's worth in arrival order: mixed
        lengths cost it only attention, which its pass groups by length itself, and planned from the
        whole window each pass took a length bucket of every waiting request's rows, so requests
        finished together, a pass or two late (``docs/benchmarks.md``)."""
        window = self._window()  # never empty: _work_is_due saw live work
        depth = self.engine.info.num_layers
        group = lambda r: (r.spec.depth(depth), r.spec.want_logits)  # noqa: E731 - rows of one pass share it
        oldest = window[0]
        peers = [r for r in window if group(r) == group(oldest)]
        rows = [Row(r, i, r.lengths[i]) for r in peers for i in r.pending_rows()]
        if self.engine.packs:  # the oldest rows, one pass's worth: requests run whole, in turn
            rows = rows[: self.config.max_batch_size]
        # without dynamic batching a request runs as sent: never split to save padding
        overhead = (
            self.config.effective_pass_overhead_tokens
            if self.config.dynamic_batching
            else self.config.max_batch_tokens
        )
        # batch-invariant: one row per pass, so each row's FLOPs share is its own exact cost
        max_rows = 1 if self.engine.batch_invariant else self.config.max_batch_size
        passes = plan_batches(
            rows, max_rows, self.config.max_batch_tokens, overhead, self.engine.padding_cost
        )
        chosen = next(p for p in passes if any(row.request is oldest for row in p))
        requests = list(dict.fromkeys(row.request for row in chosen))
        for request in requests:
            if request not in self._active:
                self._queue.remove(request)
                self._active.append(request)
        self.metrics.queue_depth.labels(self.name).set(len(self._queue))
        spec = OutputSpec(
            oldest.spec.want_logits,
            tuple(sorted({k for r in requests for k in r.spec.cls_layers})),
            tuple(sorted({k for r in requests for k in r.spec.token_layers})),
        )
        position = {request: i for i, request in enumerate(requests)}
        return sorted(chosen, key=lambda row: position[row.request]), spec

    # -- one forward pass -----------------------------------------------------------------------

    async def _run_pass(self, rows: list[Row], spec: OutputSpec) -> None:
        loop = asyncio.get_running_loop()
        query = self._merge(rows, spec)
        requests = list(dict.fromkeys(row.request for row in rows))
        started = loop.time()
        for request in requests:
            if request.started is None:
                request.started = started
                self.metrics.queue_wait.labels(self.name).observe(started - request.enqueued)
        clock = time.perf_counter()
        try:
            answer = await loop.run_in_executor(self._executor, self.engine.compute, query)
        except Exception as err:  # a bug or out of memory: fail these requests, keep serving
            for request in requests:
                if not request.future.done():
                    request.future.set_exception(err)
            return
        seconds = time.perf_counter() - clock
        self._record_pass(rows, requests, answer, seconds)
        self._scatter(rows, requests, spec, answer, seconds)

    def _merge(self, rows: list[Row], spec: OutputSpec) -> TeacherQuery:
        """The rows (by request) as one batch padded to the longest, which bucketing kept short:
        a copy per request and tensor, not a few per row (they kept the engine waiting for its
        next pass while a full pass's rows were merged)."""
        length = max(row.length for row in rows)
        ids = torch.empty((len(rows), length), dtype=torch.long)  # every place copied, or padding below
        types = torch.zeros((len(rows), length), dtype=torch.long)
        start = 0
        for request, group in itertools.groupby(rows, key=lambda row: row.request):
            indices = [row.index for row in group]
            for merged, given in ((ids, request.query.input_ids), (types, request.query.token_type_ids)):
                if given is not None:
                    _copy_rows(merged[start : start + len(indices)], given, indices)
            start += len(indices)
        mask = (torch.arange(length) < torch.tensor([row.length for row in rows])[:, None]).long()
        ids.masked_fill_(mask == 0, self._pad_id)  # whatever a client put at its padding
        types.mul_(mask)
        return TeacherQuery(ids, mask, types, spec.want_logits, spec.cls_layers, spec.token_layers)

    def _record_pass(
        self, rows: list[Row], requests: list[_Request], answer: TeacherAnswer, seconds: float
    ) -> None:
        m, name = self.metrics, self.name
        m.batch_compute.labels(name).observe(seconds)
        m.batch_size.labels(name).observe(len(rows))
        m.batch_requests.labels(name).observe(len(requests))
        m.padding_efficiency.labels(name).observe(answer.tokens / answer.padded_tokens)
        m.tokens.labels(name).inc(answer.tokens)
        m.padded_tokens.labels(name).inc(answer.padded_tokens)
        m.flops.labels(name).inc(answer.teacher_flops)
        self._seconds_per_row = 0.8 * self._seconds_per_row + 0.2 * seconds / len(rows)

    def _scatter(
        self,
        rows: list[Row],
        requests: list[_Request],
        spec: OutputSpec,
        answer: TeacherAnswer,
        seconds: float,
    ) -> None:
        """Give each row its outputs (only the layers its request asked for) and its FLOPs share."""
        flops_per_row, leftover = divmod(answer.teacher_flops, len(rows))  # the first rows take the rest
        padded_length = answer.padded_tokens // len(rows)
        unpadded = answer.padded_tokens == answer.tokens  # packed (or equal lengths): rows ran their own
        for request in requests:
            request.compute_s += seconds
        for j, row in enumerate(rows):
            request = row.request
            out = slice_row(answer, j, row.length, ran=spec, want=request.spec)
            request.outputs[row.index] = out
            key = request.cache_keys[row.index]
            if key is not None:
                self.cache.put(key, out)
            request.flops += flops_per_row + (j < leftover)
            request.padded_tokens += row.length if unpadded else padded_length
            request.todo -= 1
            request.todo_tokens -= row.length
            if request.todo == 0 and not request.future.done():
                request.future.set_result(self._answer(request))
        self.metrics.cache_bytes.set(self.cache.bytes_used)

    def _answer(self, request: _Request) -> TeacherAnswer:
        """Stack the rows back into the request's own shapes ([B, …, L, H] padded with zeros)."""
        outputs = [out for out in request.outputs if out is not None]
        want, length = request.spec, request.query.input_ids.shape[1]
        hidden_states = None
        if want.token_layers:
            hidden_states = torch.stack(
                [
                    torch.nn.functional.pad(out.hidden_states, (0, 0, 0, length - out.hidden_states.shape[1]))
                    for out in outputs
                ]
            )
        queue_s = (request.started - request.enqueued) if request.started is not None else 0.0
        return TeacherAnswer(
            logits=torch.stack([out.logits for out in outputs]) if want.want_logits else None,
            hidden_cls=torch.stack([out.hidden_cls for out in outputs]) if want.cls_layers else None,
            hidden_states=hidden_states,
            teacher_flops=request.flops,
            tokens=sum(request.lengths),
            padded_tokens=request.padded_tokens,
            cache_hits=request.cache_hits,
            timings=Timings(queue_us=round(queue_s * 1e6), compute_us=round(request.compute_s * 1e6)),
        )
