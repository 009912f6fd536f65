"""The dynamic batcher and the output cache, driven directly (no HTTP)."""

from __future__ import annotations

import asyncio
import gc
import json
import subprocess
import sys
import threading
import tracemalloc
from pathlib import Path

import pytest
import torch

from shared.flops import encoder_forward_flops
from shared.teacher_api import TeacherQuery
from teacher_engine.engine import OutputSpec, QueryError, TeacherEngine
from teacher_server.batcher import (
    DeadlineExceededError,
    DynamicBatcher,
    QueueFullError,
    Row,
    ShuttingDownError,
    plan_batches,
)
from teacher_server.cache import OutputCache, RowOutputs, row_key, row_tensors
from teacher_server.config import ServerConfig, TeacherConfig
from teacher_server.metrics import ServiceMetrics
from teacher_server.service import TeacherService

ROOT = Path(__file__).resolve().parents[1]
SENTENCES = [
    "a good movie",
    "the plot was boring and the acting awful , really bad",
    "fun !",
    "i like it but the music is not great and the story is dull",
    "best film",
    "it was a very very long and very very sad story about one actor",
]


class CountingEngine(TeacherEngine):
    """The real engine, recording the shape of every pass it runs."""

    passes: list[tuple[int, int]]
    pass_rows: list[set[tuple[int, ...]]]  # each pass's rows, their real tokens

    def compute(self, query):
        self.passes.append(tuple(query.input_ids.shape))
        real = zip(query.input_ids.tolist(), query.attention_mask.tolist(), strict=True)
        self.pass_rows.append({tuple(i for i, m in zip(ids, mask, strict=True) if m) for ids, mask in real})
        return super().compute(query)


@pytest.fixture(scope="module")
def engine(tiny_teachers) -> CountingEngine:
    """A padded engine: these tests read the bucketing's padding pass by pass."""
    loaded = CountingEngine.load("large", tiny_teachers["large"])
    loaded.passes, loaded.pass_rows = [], []
    loaded.packs = False
    return loaded


@pytest.fixture(scope="module")
def packed_engine(tiny_teachers) -> CountingEngine:
    loaded = CountingEngine.load("large", tiny_teachers["large"])
    loaded.passes, loaded.pass_rows = [], []
    assert loaded.packs  # BERT packs
    return loaded


def make_batcher(engine, cache_bytes=0, **limits) -> DynamicBatcher:
    engine.passes.clear()
    engine.pass_rows.clear()
    config = TeacherConfig(name="large", path="unused", **limits)
    return DynamicBatcher(engine, config, cache=OutputCache(cache_bytes), metrics=ServiceMetrics())


async def infer_once(batcher: DynamicBatcher, q: TeacherQuery):
    """Start the batcher, answer one query, close it."""
    (answer,) = await infer_together(batcher, [q])
    return answer


async def infer_together(batcher: DynamicBatcher, queries: list[TeacherQuery]) -> list:
    """Start the batcher, answer the queries concurrently, close it."""
    batcher.start()
    answers = await asyncio.gather(*(batcher.infer(q) for q in queries))
    await batcher.close(5)
    return answers


def sample(metrics: ServiceMetrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, {"model": "large", **labels}) or 0.0


def query(engine, texts, **outputs) -> TeacherQuery:
    ids, mask, types = engine.tokenize(texts)
    return TeacherQuery(ids, mask, types, **{"want_logits": True, **outputs})


def test_plan_batches_buckets_by_length_within_budgets():
    rows = [Row(None, i, n) for i, n in enumerate([5, 30, 6, 31, 7, 29, 8])]
    expensive = plan_batches(rows, max_rows=3, max_tokens=64, pass_overhead_tokens=1000)
    assert [[r.length for r in b] for b in expensive] == [[5, 6, 7], [8, 29], [30, 31]]
    cheap = plan_batches(rows, max_rows=3, max_tokens=64, pass_overhead_tokens=8)
    assert [[r.length for r in b] for b in cheap] == [[5, 6, 7], [8], [29, 30], [31]]  # 8 not padded to 29
    for batch in expensive + cheap:
        assert len(batch) <= 3 and len(batch) * max(r.length for r in batch) <= 64


def test_on_cpu_a_trainers_few_short_rows_run_as_one_pass():
    """A pass costs ~35-63 padded tokens of fixed time on CPU (bench_pass_overhead.py): three rows of
    10, 14 and 30 tokens (r = 0.1 of a batch) are cheaper padded together than in two passes."""
    overhead = TeacherConfig(name="t", path="unused", device="cpu").effective_pass_overhead_tokens
    rows = [Row(None, i, n) for i, n in enumerate([30, 10, 14])]
    plan = plan_batches(rows, max_rows=64, max_tokens=8192, pass_overhead_tokens=overhead)
    assert [[r.length for r in b] for b in plan] == [[10, 14, 30]]


def test_a_packed_engine_pays_padding_only_for_attention_so_it_buckets_less(engine, packed_engine):
    """Packed, padding a row costs attention pairs only: rows of mixed sentence lengths share a
    pass that a padded engine would split, and only a long tail still gets a pass of its own."""
    rows = [Row(None, i, n) for i, n in enumerate([5, 6, 7, 8, 29, 30, 31])]
    padded = plan_batches(rows, 64, 8192, 32, engine.padding_cost)
    assert [[r.length for r in b] for b in padded] == [[5, 6, 7, 8], [29, 30, 31]]
    packed = plan_batches(rows, 64, 8192, 32, packed_engine.padding_cost)
    assert [[r.length for r in b] for b in packed] == [[5, 6, 7, 8, 29, 30, 31]]
    tail = [Row(None, i, 5) for i in range(40)] + [Row(None, 40, 120)]
    assert [len(b) for b in plan_batches(tail, 64, 8192, 32, packed_engine.padding_cost)] == [40, 1]


def test_each_request_is_validated_once_on_arrival_not_again_in_its_pass(engine, monkeypatch):
    """Validation runs on the event loop as a request arrives; the forward thread computes merged
    passes of validated rows without checking them a second time."""
    calls = []
    validate = engine.validate
    monkeypatch.setattr(engine, "validate", lambda q: calls.append(threading.get_ident()) or validate(q))
    batcher = make_batcher(engine)

    async def two_requests():
        batcher.start()
        await asyncio.gather(
            batcher.infer(query(engine, SENTENCES[:2])), batcher.infer(query(engine, SENTENCES[2:]))
        )
        await batcher.close(5)

    asyncio.run(two_requests())
    assert engine.passes and calls == [threading.get_ident()] * 2


def test_a_packed_pass_charges_each_row_its_own_tokens(packed_engine):
    batcher = make_batcher(packed_engine, max_queue_delay_ms=200)
    q = query(packed_engine, SENTENCES)

    answer = asyncio.run(infer_once(batcher, q))
    alone = TeacherEngine.compute(packed_engine, q)
    assert packed_engine.passes == [tuple(q.input_ids.shape)]  # one pass, not length buckets
    assert answer.padded_tokens == answer.tokens == alone.padded_tokens == int(q.attention_mask.sum())
    assert answer.teacher_flops == alone.teacher_flops
    torch.testing.assert_close(answer.logits, alone.logits, atol=1e-5, rtol=0)


def test_concurrent_requests_share_a_pass_and_get_their_own_rows(engine):
    batcher = make_batcher(engine, max_queue_delay_ms=200, max_batch_size=16, pass_overhead_tokens=10_000)
    queries = [
        query(engine, SENTENCES[:2]),
        query(engine, SENTENCES[2:3], want_logits=False, cls_layers=(0, 3)),
        query(engine, SENTENCES[3:6], cls_layers=(4,), token_layers=(1,)),
    ]

    answers = asyncio.run(infer_together(batcher, queries))
    short = int(queries[1].attention_mask.sum())
    longest = max(int(q.attention_mask.sum(dim=1).max()) for q in (queries[0], queries[2]))
    # two depths (logits need 4 layers; the second request only layer 3) → two passes, not three
    assert sorted(engine.passes) == sorted([(1, short), (5, longest)])
    assert sample(batcher.metrics, "teacher_batch_requests_sum") == 3
    for q, answer in zip(queries, answers, strict=True):
        alone = TeacherEngine.compute(engine, q)
        for name in ("logits", "hidden_cls", "hidden_states"):
            got, want = getattr(answer, name), getattr(alone, name)
            assert (got is None) == (want is None)
            if want is not None:
                assert got.shape == want.shape
                torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        assert answer.tokens == int(q.attention_mask.sum())
    # FLOPs: each row pays its share of the pass it rode in, at that pass's padded length
    assert answers[1].teacher_flops == encoder_forward_flops(engine.config, [short], 3, with_head=False)
    assert answers[0].teacher_flops == encoder_forward_flops(engine.config, [longest, longest])
    total = sum(a.teacher_flops for a in answers)
    assert total == sample(batcher.metrics, "teacher_flops_total")
    assert sum(a.padded_tokens for a in answers) == short + 5 * longest


def test_a_pass_merges_requests_of_any_width_and_dtype_whatever_they_padded_with(engine, monkeypatch):
    """Rows of one pass come from requests padded to other widths (cut or padded to the pass's), as
    int32 from the binary protocol, with or without token types, with anything a client put at its
    padding: the pass sees the pad id and type 0 there, and each answer is its request's alone."""
    batcher = make_batcher(engine, max_queue_delay_ms=200, max_batch_size=16, pass_overhead_tokens=10_000)
    clean = [query(engine, SENTENCES[i : i + 2]) for i in (0, 2, 4)]

    def wider(t: torch.Tensor, value: int = 0) -> torch.Tensor:  # than any of its rows
        return torch.nn.functional.pad(t, (0, 3), value=value)

    junk = []
    for k, q in enumerate(clean):
        padding = q.attention_mask == 0
        ids = q.input_ids.masked_fill(padding, 7).to(torch.int32)  # a real token, not the pad id
        types = None if k == 1 else wider(q.token_type_ids.masked_fill(padding, 1), 1)
        junk.append(TeacherQuery(wider(ids, 9), wider(q.attention_mask), types, want_logits=True))
    seen: list[TeacherQuery] = []
    compute = engine.compute
    monkeypatch.setattr(engine, "compute", lambda q: seen.append(q) or compute(q))

    answers = asyncio.run(infer_together(batcher, junk))
    (merged,) = seen  # all six rows in one pass
    padding = merged.attention_mask == 0
    assert padding.any() and (merged.input_ids[padding] == engine.config.pad_token_id).all()
    assert (merged.token_type_ids[padding] == 0).all()
    for q, answer in zip(clean, answers, strict=True):
        torch.testing.assert_close(answer.logits, TeacherEngine.compute(engine, q).logits, atol=1e-5, rtol=0)


def test_token_budget_splits_passes_by_length(engine):
    batcher = make_batcher(engine, max_queue_delay_ms=200, max_batch_tokens=40, max_seq_length=20)
    q = query(engine, SENTENCES)

    answer = asyncio.run(infer_once(batcher, q))
    assert all(rows * length <= 40 for rows, length in engine.passes)
    assert sum(rows for rows, _ in engine.passes) == 6 and len(engine.passes) > 1
    torch.testing.assert_close(answer.logits, TeacherEngine.compute(engine, q).logits, atol=1e-5, rtol=0)
    assert answer.padded_tokens == sum(rows * length for rows, length in engine.passes)
    assert answer.padded_tokens < q.input_ids.numel()  # bucketing beat padding every row to the longest


def test_cache_answers_repeated_rows_and_can_be_bypassed(engine):
    batcher = make_batcher(engine, cache_bytes=10**6, max_queue_delay_ms=0)
    first = query(engine, SENTENCES[:3], cls_layers=(2,))
    again = query(engine, SENTENCES[1:4], cls_layers=(2,))  # two rows seen before (other padding)

    async def scenario():
        batcher.start()
        a = await batcher.infer(first)
        b = await batcher.infer(again)
        c = await batcher.infer(TeacherQuery(**{**vars(again), "use_cache": False}))
        await batcher.close(5)
        return a, b, c

    a, b, c = asyncio.run(scenario())
    assert (a.cache_hits, b.cache_hits, c.cache_hits) == (0, 2, 0)
    assert sample(batcher.metrics, "teacher_cache_hits_total") == 2
    assert sample(batcher.metrics, "teacher_cache_misses_total") == 3 + 1
    assert engine.passes[1][0] == 1  # only the new sentence ran
    assert b.teacher_flops < c.teacher_flops
    torch.testing.assert_close(b.logits, c.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(b.hidden_cls, c.hidden_cls, atol=1e-5, rtol=0)


def test_cached_rows_do_not_fill_the_token_budget(engine):
    """A request whose rows are mostly cached still waits for company: only rows to compute count."""
    batcher = make_batcher(
        engine, cache_bytes=10**6, max_queue_delay_ms=1000, max_batch_tokens=32, max_seq_length=20
    )
    seen = query(engine, SENTENCES[:4])
    mostly_cached = query(engine, SENTENCES[:5])  # 4 cached rows (38 tokens) + "best film"
    company = query(engine, SENTENCES[2:3])  # "fun !", not cached

    async def scenario():
        batcher.start()
        await batcher.infer(seen)
        engine.passes.clear()
        first = asyncio.ensure_future(batcher.infer(mostly_cached))
        await asyncio.sleep(0.05)
        await batcher.infer(TeacherQuery(**{**vars(company), "use_cache": False}))
        answer = await first
        await batcher.close(5)
        return answer

    assert int(seen.attention_mask.sum()) > 32
    answer = asyncio.run(scenario())
    assert answer.cache_hits == 4
    assert [rows for rows, _ in engine.passes] == [2]  # one pass for both requests, not one each


def test_full_queue_rejects_with_retry_after(engine):
    batcher = make_batcher(engine, max_queue_delay_ms=300, max_queue_size=1)
    q = query(engine, SENTENCES[:1])

    async def scenario():
        batcher.start()
        waiting = asyncio.ensure_future(batcher.infer(q))
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFullError) as err:
            await batcher.infer(q)
        await waiting
        await batcher.close(5)
        return err.value

    err = asyncio.run(scenario())
    assert err.retry_after_s >= 1
    assert sample(batcher.metrics, "teacher_rejected_total", reason="queue_full") == 1


def test_expired_and_cancelled_requests_are_dropped_before_compute(engine):
    batcher = make_batcher(engine, max_queue_delay_ms=300)
    q = query(engine, SENTENCES[:2])

    async def scenario():
        batcher.start()
        with pytest.raises(DeadlineExceededError):
            await batcher.infer(q, timeout_s=0.02)
        abandoned = asyncio.ensure_future(batcher.infer(q))
        await asyncio.sleep(0.02)
        abandoned.cancel()
        await asyncio.sleep(0.4)  # past the queue delay: a pass would have run by now
        await batcher.close(5)

    asyncio.run(scenario())
    assert engine.passes == []
    assert sample(batcher.metrics, "teacher_rejected_total", reason="deadline") == 1
    assert sample(batcher.metrics, "teacher_rejected_total", reason="cancelled") == 1


def test_a_pass_that_fails_outside_the_forward_pass_fails_its_requests_and_serving_goes_on(
    engine, monkeypatch
):
    batcher = make_batcher(engine, max_queue_delay_ms=0)
    merge = batcher._merge
    calls = []

    def merge_once_broken(rows, spec):
        calls.append(len(rows))
        if len(calls) == 1:
            raise MemoryError("no room for the batch")
        return merge(rows, spec)

    monkeypatch.setattr(batcher, "_merge", merge_once_broken)

    async def scenario():
        batcher.start()
        with pytest.raises(MemoryError):
            await asyncio.wait_for(batcher.infer(query(engine, SENTENCES[:2])), 5)
        answer = await asyncio.wait_for(batcher.infer(query(engine, SENTENCES[2:3])), 5)
        await batcher.close(5)
        return answer

    assert asyncio.run(scenario()).logits.shape == (1, 2)


class Gate:
    """Holds the engine's next forward passes in the worker thread until opened."""

    def __init__(self, monkeypatch, engine):
        self.entered, self.opened = threading.Event(), threading.Event()
        compute = engine.compute

        def gated(query):
            self.entered.set()
            assert self.opened.wait(10), "the test never opened the gate"
            return compute(query)

        monkeypatch.setattr(engine, "compute", gated)

    async def wait_until_a_pass_runs(self):
        for _ in range(500):
            if self.entered.is_set():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("no pass started")


def test_given_up_requests_free_their_queue_slot_at_once(engine, monkeypatch):
    """A request that got 504 or whose client left must not hold a slot while a pass runs."""
    batcher = make_batcher(engine, max_queue_delay_ms=0, max_queue_size=1)
    gate = Gate(monkeypatch, engine)
    depth = lambda: sample(batcher.metrics, "teacher_queue_depth")  # noqa: E731

    async def scenario():
        batcher.start()
        running = asyncio.ensure_future(batcher.infer(query(engine, SENTENCES[:1])))
        await gate.wait_until_a_pass_runs()
        with pytest.raises(DeadlineExceededError):
            await batcher.infer(query(engine, SENTENCES[1:2]), timeout_s=0.02)
        assert depth() == 0
        abandoned = asyncio.ensure_future(batcher.infer(query(engine, SENTENCES[2:3])))
        await asyncio.sleep(0.02)
        assert depth() == 1
        abandoned.cancel()
        await asyncio.sleep(0)
        assert depth() == 0
        live = asyncio.ensure_future(batcher.infer(query(engine, SENTENCES[3:4])))  # not QueueFullError
        await asyncio.sleep(0.02)
        assert depth() == 1
        gate.opened.set()
        answers = await asyncio.gather(running, live)
        await batcher.close(5)
        return answers

    try:
        answers = asyncio.run(asyncio.wait_for(scenario(), 10))
    finally:
        gate.opened.set()
    assert [a.logits.shape for a in answers] == [(1, 2), (1, 2)]
    assert sample(batcher.metrics, "teacher_rejected_total", reason="queue_full") == 0
    assert len(engine.passes) == 2  # the given-up requests never ran


def finished_while_a_pass_waits(monkeypatch, batcher, engine, later) -> list[str]:
    """Start ``batcher`` with one request, ``first``; while its pass is held, send ``later``
    (``(name, texts)`` pairs), then let every pass run. The requests' names as they finish."""
    gate = Gate(monkeypatch, engine)
    finished: list[str] = []

    async def scenario():
        batcher.start()

        def send(name, texts):
            task = asyncio.ensure_future(batcher.infer(query(engine, texts)))
            task.add_done_callback(lambda _: finished.append(name))
            return task

        tasks = [send("first", SENTENCES[:1])]
        await gate.wait_until_a_pass_runs()
        tasks += [send(name, texts) for name, texts in later]
        for _ in range(500):  # until every one of them waits in the queue
            if sample(batcher.metrics, "teacher_queue_depth") == len(later):
                break
            await asyncio.sleep(0.01)
        gate.opened.set()
        await asyncio.gather(*tasks)
        await batcher.close(5)

    try:
        asyncio.run(asyncio.wait_for(scenario(), 10))
    finally:
        gate.opened.set()
    return finished


def test_what_arrives_during_a_pass_joins_the_next_and_the_oldest_request_goes_first(engine, monkeypatch):
    """Continuous batching: the idle engine starts the first request alone at once; requests that
    arrive meanwhile are planned together, and the bucket of the oldest of them runs first: its
    long rows are not held back behind passes of short rows that came later."""
    batcher = make_batcher(engine, max_batch_size=2, pass_overhead_tokens=0)  # default: no queue delay
    long_pair, short = [SENTENCES[1], SENTENCES[3]], SENTENCES[2:3] + SENTENCES[4:5]
    later = [("long", long_pair), *((f"short{i}", short) for i in range(3))]
    finished = finished_while_a_pass_waits(monkeypatch, batcher, engine, later)
    assert engine.passes[0][0] == 1  # the first request ran alone, without waiting for company
    assert finished[:2] == ["first", "long"], finished  # then the oldest waiting request's bucket
    assert sum(rows for rows, _ in engine.passes) == 1 + 2 + 3 * 2


def test_a_packed_engine_takes_the_oldest_requests_whole_so_they_finish_in_turn(packed_engine, monkeypatch):
    """Requests that queue during a pass, each with a short and a long row: a packed engine's next
    pass takes the oldest of them whole, as many as fit, so they finish a pass apart in arrival
    order, not all together after passes that each took a row of every one (length bucketing over a
    wider window, as an engine that pads every row still plans)."""
    batcher = make_batcher(packed_engine, max_batch_size=4, pass_overhead_tokens=10_000)
    shorts = ["fun ! fun", "best film", "i like it", "great acting"]  # none is another row
    longs = [*SENTENCES[1::2], "the music was really quite good but the story was very very dull"]
    later = [(f"r{i}", [short, long]) for i, (short, long) in enumerate(zip(shorts, longs, strict=True))]
    finished = finished_while_a_pass_waits(monkeypatch, batcher, packed_engine, later)
    assert [rows for rows, _ in packed_engine.passes] == [1, 4, 4]
    assert passes_that_ran(packed_engine, later) == {"r0": {1}, "r1": {1}, "r2": {2}, "r3": {2}}
    assert [set(finished[1:3]), set(finished[3:])] == [{"r0", "r1"}, {"r2", "r3"}]


def test_a_packed_engines_passes_stay_full_when_requests_do_not_divide_them(packed_engine, monkeypatch):
    """Requests of 3 rows, passes of 4: each pass takes the oldest rows in turn, the last request
    it reaches split, so no pass runs short while rows wait."""
    batcher = make_batcher(packed_engine, max_batch_size=4, pass_overhead_tokens=10_000)
    texts = "good movie,bad film,fun story,great plot,awful acting,dull music,sad scene,happy actor,"
    texts += "best movie,worst film,boring story,funny plot"
    rows = texts.split(",")
    later = [(f"r{i}", rows[3 * i : 3 * i + 3]) for i in range(4)]
    finished_while_a_pass_waits(monkeypatch, batcher, packed_engine, later)
    assert [rows for rows, _ in packed_engine.passes] == [1, 4, 4, 4]
    assert passes_that_ran(packed_engine, later) == {"r0": {1}, "r1": {1, 2}, "r2": {2, 3}, "r3": {3}}


def passes_that_ran(engine, requests) -> dict[str, set[int]]:
    """For each ``(name, texts)``, the passes of ``engine`` that ran one of its rows."""
    alone = [
        (name, {tuple(engine.tokenize([text])[0][0].tolist()) for text in texts}) for name, texts in requests
    ]
    return {name: {p for p, rows in enumerate(engine.pass_rows) if ids & rows} for name, ids in alone}


def test_close_fails_the_pass_in_flight_when_the_drain_times_out(engine, monkeypatch):
    batcher = make_batcher(engine, max_queue_delay_ms=0, max_batch_size=2, pass_overhead_tokens=10_000)
    gate = Gate(monkeypatch, engine)

    async def scenario():
        batcher.start()
        # one request per pass: three requests, the first pass held at the gate
        tasks = [asyncio.ensure_future(batcher.infer(query(engine, SENTENCES[i : i + 2]))) for i in (0, 2, 4)]
        await gate.wait_until_a_pass_runs()
        await batcher.close(0.05)
        done, pending = await asyncio.wait(tasks, timeout=2)
        return done, pending

    try:
        done, pending = asyncio.run(scenario())
    finally:
        gate.opened.set()
    assert not pending
    assert all(isinstance(task.exception(), ShuttingDownError) for task in done)


def test_close_finishes_queued_work_then_refuses(engine):
    batcher = make_batcher(engine, max_queue_delay_ms=10_000)
    q = query(engine, SENTENCES[:2])

    async def scenario():
        batcher.start()
        waiting = asyncio.ensure_future(batcher.infer(q))
        await asyncio.sleep(0.02)
        await batcher.close(5)  # does not wait out the 10 s delay
        with pytest.raises(ShuttingDownError):
            await batcher.infer(q)
        return await waiting

    answer = asyncio.run(asyncio.wait_for(scenario(), 5))
    assert answer.logits.shape == (2, 2)


def test_request_larger_than_max_batch_size_is_refused(engine):
    batcher = make_batcher(engine, max_batch_size=2)
    with pytest.raises(QueryError) as err:
        asyncio.run(batcher.infer(query(engine, SENTENCES[:3])))
    assert err.value.field == "input_ids"


def test_cache_is_lru_within_its_byte_budget():
    spec = OutputSpec(True, (), ())
    row = RowOutputs(torch.zeros(4), None, None)
    keys = [row_key("m", "r1", torch.tensor([2, i]), torch.zeros(2), spec) for i in range(3)]
    probe = OutputCache(max_bytes=10_000)
    probe.put(keys[0], row)
    entry = probe.bytes_used  # what one entry really costs: far more than its 16 tensor bytes
    assert entry > 16 + len(keys[0])
    cache = OutputCache(max_bytes=2 * entry + entry // 2)
    cache.put(keys[0], row)
    cache.put(keys[1], row)
    assert cache.get(keys[0]) is not None  # now most recent
    cache.put(keys[2], row)  # evicts keys[1], the least recently used
    assert cache.get(keys[1]) is None and cache.get(keys[0]) is not None and cache.get(keys[2]) is not None
    assert cache.bytes_used == 2 * entry and len(cache) == 2
    cache.put(keys[1], RowOutputs(torch.zeros(3 * entry), None, None))  # larger than the whole budget
    assert cache.get(keys[1]) is None


def test_cache_counts_all_the_memory_it_keeps():
    """A flood of unique 3-logit rows: the Python memory the cache holds stays within its budget
    (tensor bytes alone were 12 per row against ~960 really kept)."""
    budget, spec, types = 256 * 1024, OutputSpec(True, (), ()), torch.zeros(4)
    cache = OutputCache(max_bytes=budget)
    logits = torch.randn(64, 3)
    keys = [row_key("m", "r", torch.tensor([2, i, i, 3]), types, spec) for i in range(20_000)]
    gc.collect()
    tracemalloc.start()
    try:
        for i, key in enumerate(keys):
            cache.put(key, RowOutputs(logits[i % 64], None, None))
        gc.collect()
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    keys_kept = sum(sys.getsizeof(key) for key in keys[-len(cache) :])  # created before tracing began
    assert cache.bytes_used <= budget
    assert held + keys_kept <= budget * 1.05, (held, keys_kept, len(cache))
    assert len(cache) > 400  # a small row still costs hundreds of bytes, not kilobytes
    row = cache.get(keys[-1])
    assert row is not None and row.logits.tolist() == logits[(len(keys) - 1) % 64].tolist()


@pytest.mark.slow
def test_cache_resident_memory_grows_by_about_its_budget(tmp_path):
    """A flood that turns a 4 MiB cache over ~28 times, in a fresh process: RSS grew by 1.9 x the
    budget while the entries were counted at their Python objects' size alone."""
    output = tmp_path / "rss.json"
    command = [sys.executable, "benchmarks/bench_cache_rss.py", "--rows", "200000", "--budget_mib", "4"]
    subprocess.run(
        [*command, "--output", str(output)], check=True, cwd=ROOT, capture_output=True, timeout=600
    )
    [result] = json.loads(output.read_text())["results"]
    assert result["rows_kept"] < result["rows_put"] / 10  # turned over many times: the steady state
    assert 0.6 <= result["rss_growth_over_budget"] <= 1.15, result


def test_cache_rows_keep_every_output_with_its_shape_and_dtype():
    cache = OutputCache(max_bytes=100_000)
    key = row_key("m", None, torch.tensor([1]), torch.tensor([0]), OutputSpec(True, (0, 2), (1,)))
    row = RowOutputs(torch.randn(3), torch.randn(2, 8).to(torch.bfloat16), torch.randn(1, 5, 8))
    cache.put(key, row)
    got = cache.get(key)
    for mine, theirs in zip(row_tensors(got), row_tensors(row), strict=True):
        assert mine.dtype == theirs.dtype and torch.equal(mine, theirs)


def test_cache_keys_depend_on_everything_the_answer_depends_on():
    ids, types = torch.tensor([2, 7, 3]), torch.zeros(3)
    base = row_key("m", "r1", ids, types, OutputSpec(True, (), ()))
    assert base == row_key("m", "r1", ids.int(), types.long(), OutputSpec(True, (), ()))
    variants = [
        row_key("other", "r1", ids, types, OutputSpec(True, (), ())),
        row_key("m", "r2", ids, types, OutputSpec(True, (), ())),
        row_key("m", "r1", torch.tensor([2, 8, 3]), types, OutputSpec(True, (), ())),
        row_key("m", "r1", ids, torch.tensor([0, 1, 1]), OutputSpec(True, (), ())),
        row_key("m", "r1", ids, types, OutputSpec(True, (1,), ())),
        row_key("m", "r1", ids, types, OutputSpec(False, (), (1,))),
    ]
    assert len({base, *variants}) == 1 + len(variants)


def test_cached_rows_are_private_copies():
    batch = torch.arange(8.0).reshape(2, 4)
    cache = OutputCache(max_bytes=1000)
    key = row_key("m", None, torch.tensor([1]), torch.tensor([0]), OutputSpec(True, (), ()))
    cache.put(key, RowOutputs(batch[0], None, None))
    batch.zero_()
    assert cache.get(key).logits.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert cache.get(key).logits.untyped_storage().data_ptr() != batch.untyped_storage().data_ptr()


def test_without_dynamic_batching_each_request_runs_alone_as_sent(engine):
    batcher = make_batcher(engine, dynamic_batching=False, max_queue_delay_ms=200)
    queries = [query(engine, SENTENCES[:2]), query(engine, SENTENCES[2:6])]

    answers = asyncio.run(infer_together(batcher, queries))
    assert engine.passes == [tuple(q.input_ids.shape) for q in queries]  # one pass each, no re-bucketing
    for q, answer in zip(queries, answers, strict=True):
        assert answer.padded_tokens == q.input_ids.numel()


def test_the_teachers_of_a_device_are_loaded_warmed_up_and_run_on_one_thread(tiny_teachers, monkeypatch):
    """OpenMP keeps a worker pool per calling thread: a teacher loaded on one thread and run on
    another, or two teachers on two threads, left two pools on the same cores (slower passes,
    benchmarks/bench_teacher_thread.py)."""
    threads: dict[str, set[int]] = {"load": set(), "run": set()}
    from_config, compute = TeacherEngine.from_config.__func__, TeacherEngine.compute

    def loading(cls, teacher):
        threads["load"].add(threading.get_ident())
        return from_config(cls, teacher)

    def running(self, query):
        threads["run"].add(threading.get_ident())
        return compute(self, query)

    monkeypatch.setattr(TeacherEngine, "from_config", classmethod(loading))
    monkeypatch.setattr(TeacherEngine, "compute", running)
    teachers = [{"name": name, "path": str(path)} for name, path in tiny_teachers.items()]
    service = TeacherService(ServerConfig(teachers=teachers))

    async def scenario():
        await service.load()
        for batcher in service.batchers.values():
            await batcher.infer(query(batcher.engine, SENTENCES[:2]))
        await service.close()

    asyncio.run(scenario())
    assert len(service.batchers) == 2
    assert len(threads["load"]) == 1 and threads["run"] == threads["load"]  # warm-up and passes included


def test_only_the_compute_thread_starts_openmp_workers(tiny_teachers):
    """Every other thread of the service runs torch's operators serially (shared.openmp): a second
    pool of workers in the process made every later pass slower. Run on a thread of its own, since
    the event loop's setting stays with its thread."""
    service = TeacherService(ServerConfig(teachers=[{"name": "small", "path": str(tiny_teachers["small"])}]))
    seen: dict[str, int] = {}

    async def scenario():
        await service.load()
        compute = service.compute_threads["cpu"]
        seen["event loop"] = torch.get_num_threads()
        seen["worker"] = await asyncio.to_thread(torch.get_num_threads)
        seen["tokenizer"] = await service.batchers["small"].preprocess(torch.get_num_threads)
        seen["compute"] = await asyncio.get_running_loop().run_in_executor(compute, torch.get_num_threads)
        await service.close()

    threads_before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runner = threading.Thread(target=asyncio.run, args=(scenario(),))
        runner.start()
        runner.join()
    finally:
        torch.set_num_threads(threads_before)
    assert seen == {"event loop": 1, "worker": 1, "tokenizer": 1, "compute": 2}
