"""The teacher on NVIDIA PyTriton: a Triton server whose Python model is one ``@batch`` function.

Triton's dynamic batcher merges concurrent requests (up to ``--max_batch_size`` rows, waiting at
most ``--max_queue_delay_ms``); the bound function tokenizes the merged texts and runs one pass.
Texts arrive as ``BYTES [B, 1]``.
"""

from __future__ import annotations

import signal

import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig
from teacher import MODEL_NAME, Teacher, as_texts, parse_args

if __name__ == "__main__":
    # PyTriton quits cleanly (Triton stopped, its workspace under ~/.cache/pytriton removed) on
    # SIGINT only; bench_peers.py stops servers with SIGTERM
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    args = parse_args()
    teacher = Teacher(args.model, args.threads, args.max_seq_length)

    @batch
    def infer(text: np.ndarray) -> dict[str, np.ndarray]:
        return {"logits": teacher.logits(as_texts(text)).numpy()}

    # Triton also opens gRPC and metrics ports: the two after --port (bench_peers.py checks them)
    config = TritonConfig(
        http_address="127.0.0.1", http_port=args.port,
        grpc_address="127.0.0.1", grpc_port=args.port + 1, metrics_port=args.port + 2,
    )  # fmt: skip
    batcher = DynamicBatcher(max_queue_delay_microseconds=int(1000 * args.max_queue_delay_ms))
    with Triton(config=config) as triton:
        triton.bind(
            model_name=MODEL_NAME,
            infer_func=infer,
            inputs=[Tensor(name="text", dtype=bytes, shape=(1,))],
            outputs=[Tensor(name="logits", dtype=np.float32, shape=(-1,))],
            config=ModelConfig(max_batch_size=args.max_batch_size, batcher=batcher),
        )
        triton.serve()
