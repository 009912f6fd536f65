"""Prometheus metrics of the service, in a registry per app so several apps can live in one process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
RATIO_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


class ServiceMetrics:
    """Every metric the service exports; labels are the teacher name (and outcome where useful)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "teacher_requests", "Inference requests by outcome.", ["model", "code"], registry=r
        )
        self.latency = Histogram(
            "teacher_request_seconds",
            "Inference request latency.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "teacher_queue_seconds",
            "Time a request waited for its first batch.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_compute = Histogram(
            "teacher_batch_compute_seconds",
            "Forward-pass time per batch.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "teacher_batch_size", "Rows per forward pass.", ["model"], buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_requests = Histogram(
            "teacher_batch_requests",
            "Requests merged into one forward pass.",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.padding_efficiency = Histogram(
            "teacher_padding_efficiency",
            "Real tokens / padded tokens per batch.",
            ["model"],
            buckets=RATIO_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "teacher_queue_depth", "Requests waiting in the batcher.", ["model"], registry=r
        )
        self.tokens = Counter("teacher_tokens", "Real tokens run through the encoder.", ["model"], registry=r)
        self.padded_tokens = Counter(
            "teacher_padded_tokens", "Tokens run including padding.", ["model"], registry=r
        )
        self.flops = Counter("teacher_flops", "Forward FLOPs actually run.", ["model"], registry=r)
        self.cache_hits = Counter(
            "teacher_cache_hits", "Rows answered from the cache.", ["model"], registry=r
        )
        self.cache_misses = Counter("teacher_cache_misses", "Rows not in the cache.", ["model"], registry=r)
        self.cache_bytes = Gauge("teacher_cache_bytes", "Bytes held by the output cache.", registry=r)
        self.rejected = Counter(
            "teacher_rejected",
            "Requests not (fully) computed: queue_full, deadline, cancelled, shutting_down.",
            ["model", "reason"],
            registry=r,
        )

    def render(self) -> tuple[bytes, str]:
        """The text exposition format and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
