"""The one teacher every peer server wraps: load a checkpoint, turn raw texts into logits.

Imported by the peer scripts beside it, inside each peer's own virtual environment, so it needs
only torch and transformers (never the project's package): every server tokenizes and runs the
model the same way, and only the serving stack around it differs.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

MODEL_NAME = "teacher"  # every server answers /v2/models/teacher/infer


def parse_args() -> argparse.Namespace:
    """The settings bench_peers.py passes to every peer script alike."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, help="checkpoint dir")
    parser.add_argument("--port", type=int, required=True, help="HTTP port on 127.0.0.1")
    parser.add_argument("--threads", type=int, required=True, help="torch threads")
    parser.add_argument("--max_batch_size", type=int, default=64, help="rows per pass (batching peers)")
    parser.add_argument("--max_queue_delay_ms", type=float, default=5.0, help="batcher wait (batching peers)")
    parser.add_argument("--rows_per_request", type=int, default=8, help="for batchers that count requests")
    parser.add_argument("--max_seq_length", type=int, default=128)
    return parser.parse_args()


def as_texts(values) -> list[str]:
    """Raw texts from a v2 ``BYTES`` tensor as a server hands it over (str or UTF-8 bytes, any shape)."""
    flat = values.ravel().tolist() if hasattr(values, "ravel") else list(values)
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in flat]


class Teacher:
    """A sequence classifier and its tokenizer; ``logits`` is one dynamically padded pass."""

    def __init__(self, path: str, threads: int, max_seq_length: int) -> None:
        torch.set_num_threads(threads)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
        self.max_seq_length = max_seq_length

    def logits(self, texts: list[str]) -> torch.Tensor:
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_seq_length, return_tensors="pt"
        )
        with torch.inference_mode():
            return self.model(**batch).logits.float()
