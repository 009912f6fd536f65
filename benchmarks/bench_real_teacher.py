"""A real pretrained teacher of any supported family, checked and timed in-process and served.

    python scripts/fetch_mpnet.py                    # prints the folder of the real MPNet-base
    python benchmarks/bench_real_teacher.py --teacher ~/.cache/dkd/mpnet/all-mpnet-base-v2

On the first ``--sentences`` SST-2 dev sentences (``../shared/data/sst2/dev.tsv``):

1. in-process: the engine's early exit against the model's own forward on the real weights
   (largest absolute difference of logits and of every hidden state's pooled vector: [CLS], or a
   decoder classifier's last real token), and the
   time of a full pass against an exit after half the layers;
2. served: ``teacher-server`` in a subprocess on a loopback port, the sentences sent as
   ``text`` (the server tokenizes with the teacher's own tokenizer) in requests of ``--batch``,
   one at a time, the output cache off; its pooled vectors against the in-process forward (the
   classification head is freshly initialised in each process, so logits are compared
   in-process only), its ``tokens`` against the teacher tokenizer's own count, sequences/s.

Prints a table and the served metadata's family and tokenizer fields; writes JSON (``--output``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import httpx
import torch
from bench_server import thread_env

from shared.codec import HEADER_LENGTH, build_request_body, parse_response_body
from shared.teacher_api import TeacherQuery
from teacher_engine.engine import TeacherEngine
from teacher_server.launch import serve_in_subprocess

ROOT = Path(__file__).resolve().parents[1]
SST2_DEV = ROOT.parent / "shared" / "data" / "sst2" / "dev.tsv"


def load_sentences(count: int) -> list[str]:
    lines = SST2_DEV.read_text(encoding="utf-8").splitlines()[1 : count + 1]
    return [line.split("\t")[0].strip() for line in lines]


def in_process(engine: TeacherEngine, texts: list[str], batch: int) -> dict:
    """Early exit vs the model's own forward, and full vs half-depth time."""
    every = tuple(range(engine.info.num_layers + 1))
    worst_logits = worst_cls = 0.0
    full_s = half_s = 0.0
    cls: list[torch.Tensor] = []
    for start in range(0, len(texts), batch):
        ids, mask, types = engine.tokenize(texts[start : start + batch])
        kwargs = {"token_type_ids": types} if types is not None else {}
        with torch.inference_mode():
            own = engine.model(input_ids=ids, attention_mask=mask, output_hidden_states=True, **kwargs)
        tic = time.perf_counter()
        answer = engine.run(
            TeacherQuery(ids, mask, types, want_logits=True, cls_layers=every, use_cache=False)
        )
        full_s += time.perf_counter() - tic
        tic = time.perf_counter()
        engine.run(
            TeacherQuery(ids, mask, types, want_logits=False, cls_layers=(engine.info.num_layers // 2,))
        )
        half_s += time.perf_counter() - tic
        assert answer.logits is not None and answer.hidden_cls is not None
        worst_logits = max(worst_logits, float((answer.logits - own.logits).abs().max()))
        expected = torch.stack([engine.family.pooled(own.hidden_states[j], mask) for j in every], dim=1)
        worst_cls = max(worst_cls, float((answer.hidden_cls - expected).abs().max()))
        cls.append(expected)
    return {
        "max_abs_diff_logits": worst_logits,
        "max_abs_diff_hidden_cls": worst_cls,
        "full_seq_per_s": len(texts) / full_s,
        "half_depth_seq_per_s": len(texts) / half_s,
        "_cls": torch.cat(cls),
    }


def served(teacher: str, texts: list[str], batch: int, threads: int, reference_cls: torch.Tensor) -> dict:
    """The same sentences as ``text`` requests to a real ``teacher-server``."""
    config = {
        "cache_max_bytes": 0,
        "teachers": [{"name": "teacher", "path": teacher, "max_queue_delay_ms": 0}],
    }
    env = thread_env(threads)
    with tempfile.TemporaryDirectory() as tmp:
        config_path = Path(tmp) / "teacher.yaml"
        config_path.write_text(json.dumps(config))  # JSON is YAML
        with serve_in_subprocess(config_path, env=env, log_level="warning", colocated=False) as url:
            meta = httpx.get(f"{url}/v2/models/teacher", trust_env=False).json()["parameters"]
            layers = ",".join(str(j) for j in range(meta["num_layers"] + 1))
            tokens = flops = 0
            cls = []
            tic = time.perf_counter()
            for start in range(0, len(texts), batch):
                body, headers = build_request_body(
                    {"text": texts[start : start + batch]},
                    outputs={"logits": None, "hidden_cls": {"layers": layers}},
                    parameters={"cache": False},
                )
                response = httpx.post(
                    f"{url}/v2/models/teacher/infer",
                    content=body,
                    headers=headers,
                    trust_env=False,
                    timeout=600,
                )
                response.raise_for_status()
                parsed = parse_response_body(response.content, response.headers.get(HEADER_LENGTH))
                params = parsed.header.parameters or {}
                tokens += int(params["tokens"])
                flops += int(params["teacher_flops"])
                cls.append(parsed.outputs["hidden_cls"])
            wall = time.perf_counter() - tic
    return {
        "metadata": {k: meta.get(k) for k in ("model_type", "tokenizer_class", "tokenizer_vocab_sha256")},
        "flops_per_token": meta.get("flops_per_token"),
        "seq_per_s": len(texts) / wall,
        "tokens": tokens,
        "teacher_flops": flops,
        "max_abs_diff_hidden_cls_vs_in_process": float((torch.cat(cls) - reference_cls).abs().max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True, help="a checkpoint folder (e.g. the fetched MPNet-base)")
    parser.add_argument("--sentences", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    texts = load_sentences(args.sentences)
    engine = TeacherEngine.load("teacher", args.teacher)
    local = in_process(engine, texts, args.batch)
    own_tokens = sum(
        int(engine.tokenize(texts[i : i + args.batch])[1].sum()) for i in range(0, len(texts), args.batch)
    )
    remote = served(args.teacher, texts, args.batch, args.threads, local.pop("_cls"))
    result = {
        "teacher": args.teacher,
        "model_type": engine.info.model_type,
        "layers": engine.info.num_layers,
        "sentences": len(texts),
        "batch": args.batch,
        "threads": args.threads,
        "in_process": local,
        "served": remote,
        "teacher_own_tokens": own_tokens,
    }
    rows = [
        ("early exit vs own forward, logits (max |diff|)", f"{local['max_abs_diff_logits']:.2e}"),
        (
            "early exit vs own forward, pooled vector of every layer",
            f"{local['max_abs_diff_hidden_cls']:.2e}",
        ),
        (
            "served vs in-process, pooled vector of every layer",
            f"{remote['max_abs_diff_hidden_cls_vs_in_process']:.2e}",
        ),
        ("in-process, full depth + head (seq/s)", f"{local['full_seq_per_s']:.1f}"),
        (
            f"in-process, exit after layer {engine.info.num_layers // 2} (seq/s)",
            f"{local['half_depth_seq_per_s']:.1f}",
        ),
        ("served, text in, logits + every pooled vector (seq/s)", f"{remote['seq_per_s']:.1f}"),
        ("served tokens / teacher tokenizer's own count", f"{remote['tokens']} / {own_tokens}"),
        ("served teacher FLOPs per sentence (G)", f"{remote['teacher_flops'] / len(texts) / 1e9:.2f}"),
    ]
    print(f"{args.teacher}: {engine.info.model_type}, {len(texts)} SST-2 dev sentences, batch {args.batch}")
    for name, value in rows:
        print(f"  {name:<56} {value}")
    print("  served metadata:", json.dumps(remote["metadata"]))
    if args.output:
        args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
