"""Encode and decode times and sizes of a large teacher answer on the wire: JSON vs binary.

    python benchmarks/bench_codec.py [--batch 8] [--seq_len 128] [--layers 7] [--hidden 384]

The answer is what ``outputs: [{"name": "hidden_states"}]`` returns for a batch: a float32
tensor ``[batch, layers, seq_len, hidden]`` (defaults: MiniLM-L6's 7 hidden states at 128
tokens; ``--layers 13`` gives about 100 MB of stdlib JSON) plus its logits. The service
encodes it on its event loop, so the encode time is time during which no other request is
served. Rows:

* ``json (orjson)`` / ``binary``: :func:`shared.codec.build_response_body` and
  :func:`shared.codec.parse_response_body`, what the service and the trainer run;
* ``json (stdlib lists)``: the same document through ``json.dumps`` of ``tensor.tolist()``,
  the plain way (and this codec's encoder before orjson), for reference.

Best of ``--repeats``. Prints a table and writes JSON (``--output``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from shared.codec import HEADER_LENGTH, build_response_body, parse_response_body

ROOT = Path(__file__).resolve().parents[1]


def best_time(action: Callable[[], object], repeats: int) -> tuple[float, object]:
    """The fastest of ``repeats`` runs, and what the last one returned."""
    best, result = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        result = action()
        best = min(best, time.perf_counter() - started)
    return best, result


def stdlib_json(outputs: dict[str, torch.Tensor]) -> bytes:
    document = {
        "model_name": "m",
        "outputs": [
            {"name": n, "shape": list(t.shape), "datatype": "FP32", "data": t.reshape(-1).tolist()}
            for n, t in outputs.items()
        ],
    }
    return json.dumps(document, separators=(",", ":")).encode("utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--layers", type=int, default=7)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=str(ROOT / "runs" / "bench_codec.json"))
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    outputs = {
        "hidden_states": torch.randn(args.batch, args.layers, args.seq_len, args.hidden, generator=generator),
        "logits": torch.randn(args.batch, 2, generator=generator),
    }
    rows = []
    for wire in ("json (orjson)", "binary"):
        binary = list(outputs) if wire == "binary" else []
        encode_s, (body, headers) = best_time(
            lambda binary=binary: build_response_body("m", outputs, binary_outputs=binary, model_version="1"),
            args.repeats,
        )
        length = int(headers[HEADER_LENGTH]) if HEADER_LENGTH in headers else None
        decode_s, decoded = best_time(lambda body=body, length=length: parse_response_body(body, length), 1)
        exact = all(torch.equal(decoded.outputs[n], t) for n, t in outputs.items())
        rows.append(
            {"wire": wire, "encode_s": encode_s, "decode_s": decode_s, "mb": len(body) / 1e6, "exact": exact}
        )
    encode_s, body = best_time(lambda: stdlib_json(outputs), args.repeats)
    rows.append(
        {"wire": "json (stdlib lists)", "encode_s": encode_s, "decode_s": None, "mb": len(body) / 1e6}
    )

    print(f"answer: hidden_states {list(outputs['hidden_states'].shape)} float32 + logits")
    print(f"{'wire':<22}{'encode s':>10}{'decode s':>10}{'MB':>9}  round trip")
    for row in rows:
        decode = f"{row['decode_s']:10.3f}" if row["decode_s"] is not None else f"{'-':>10}"
        exact = {True: "exact", False: "DIFFERS", None: "-"}[row.get("exact")]
        print(f"{row['wire']:<22}{row['encode_s']:10.3f}{decode}{row['mb']:9.1f}  {exact}")
    report = {
        "command": "python benchmarks/bench_codec.py "
        + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
        "machine": {
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
            "python": platform.python_version(),
        },
        "rows": rows,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
