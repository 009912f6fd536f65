"""The service behind the routes: load, ready and close of every teacher's engine and batcher
(Triton's python-backend shape: it knows nothing about HTTP).

Teachers load and warm up after start-up, so ``/v2/health/live`` answers at once and ``ready``
turns true only when every teacher can serve. Each device's teachers load and run on one thread of
their own; every other thread of the service (the event loop, its worker threads, the tokenizers)
runs torch's operators serially, so that the process holds one pool of OpenMP workers per device.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from shared.heap import freeze_heap
from shared.openmp import POLICY, serial_thread
from shared.teacher_api import TeacherQuery
from teacher_engine.engine import TeacherEngine
from teacher_server.batcher import DynamicBatcher, compute_thread
from teacher_server.cache import OutputCache
from teacher_server.config import ServerConfig
from teacher_server.metrics import ServiceMetrics

logger = logging.getLogger("teacher_server")


@dataclass
class TeacherService:
    """What the app holds: config, one batcher per loaded teacher, the cache and the metrics."""

    config: ServerConfig
    api_key: str | None = None
    on_load_failure: Callable[[str], None] | None = None
    metrics: ServiceMetrics = field(default_factory=ServiceMetrics)
    batchers: dict[str, DynamicBatcher] = field(default_factory=dict)
    compute_threads: dict[str, ThreadPoolExecutor] = field(default_factory=dict)  # by device
    loaded: bool = False
    draining: bool = False  # set on SIGTERM: readiness and new work answer 503
    in_flight: int = 0  # HTTP requests being answered (teacher_server.drain counts them)
    heap_frozen: bool = False  # once every teacher is ready

    def __post_init__(self) -> None:
        self.cache = OutputCache(self.config.cache_max_bytes)

    @property
    def ready(self) -> bool:
        return self.loaded and not self.draining

    async def load(self) -> None:
        """Load and warm up every teacher (on its device's thread); a failure is one log line,
        never ready. Called on the event loop, which it makes serial, with its worker threads."""
        loop = asyncio.get_running_loop()
        serial_thread()
        loop.set_default_executor(ThreadPoolExecutor(thread_name_prefix="io", initializer=serial_thread))
        for teacher in self.config.teachers:
            started = time.perf_counter()
            if teacher.device not in self.compute_threads:
                self.compute_threads[teacher.device] = compute_thread(teacher.device)
            thread = self.compute_threads[teacher.device]  # loads, warms up and later runs the teacher
            try:
                engine = await loop.run_in_executor(thread, TeacherEngine.from_config, teacher)
                if self.config.warmup:
                    await loop.run_in_executor(thread, _warm_up, engine)
            except Exception as err:
                message = f"teacher {teacher.name!r} failed to load from {teacher.path}: {err}"
                logger.error(" ".join(message.split()), extra={"event": "load_failed", "model": teacher.name})
                if self.on_load_failure is not None:
                    self.on_load_failure(message)
                return
            batcher = DynamicBatcher(engine, teacher, cache=self.cache, metrics=self.metrics, executor=thread)
            batcher.start()
            self.batchers[teacher.name] = batcher
            logger.info(
                "teacher ready",
                extra={
                    "event": "teacher_ready",
                    "model": teacher.name,
                    "device": teacher.device,
                    "dtype": teacher.dtype,
                    "load_s": round(time.perf_counter() - started, 3),
                },
            )
        freeze_heap()  # the teachers included: see shared.heap
        self.heap_frozen = True
        self.loaded = True
        policy = os.environ.get(POLICY, "OpenMP's default")
        logger.info(
            "all teachers ready",
            extra={"event": "ready", "models": list(self.batchers), "omp_wait_policy": policy},
        )

    async def close(self) -> None:
        """Stop taking work and let each batcher finish what it queued."""
        self.draining = True
        await asyncio.gather(*(b.close(self.config.drain_timeout_s) for b in self.batchers.values()))
        for thread in self.compute_threads.values():
            thread.shutdown(wait=False, cancel_futures=True)
        if self.heap_frozen:  # in process (a test): freezing is per process, so this thaws it all
            gc.unfreeze()
        logger.info("drained", extra={"event": "drained"})


def _warm_up(engine: TeacherEngine) -> None:
    """One full pass so the first real request does not pay for lazy initialisation."""
    ids, mask, types = engine.tokenize(["warm up the teacher", "a second, longer warm-up sentence"])
    every_layer = tuple(range(engine.info.num_layers + 1))
    engine.run(TeacherQuery(ids, mask, types, want_logits=True, cls_layers=every_layer, use_cache=False))
