"""A real causal LM as a prompted (zero-shot) teacher, in-process: SST-2 dev accuracy, the engine
against the model's own forward, and what a row costs.

    python scripts/fetch_smollm2.py        # prints the folder of the real SmolLM2-135M-Instruct
    python benchmarks/bench_prompted_teacher.py --teacher THAT_FOLDER --sentences 200

On the first ``--sentences`` SST-2 dev sentences (``../shared/data/sst2/dev.tsv``), in batches of
``--batch``: the class of the larger logit against the gold label (accuracy; the majority class
beside it), the largest absolute difference between the engine's class logits and the model's own
next-token logits of the label words (one word per class, so log-sum-exp is the word's logit),
``teacher_flops`` and prompt tokens per row, seconds per row. Writes JSON (``--output``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from shared.prompting import LabelPrompt
from shared.teacher_api import TeacherQuery
from teacher_engine.engine import TeacherEngine

ROOT = Path(__file__).resolve().parents[1]
SST2_DEV = ROOT.parent / "shared" / "data" / "sst2" / "dev.tsv"
PROMPT = {
    "prompt": "Review: {text}\nSentiment (positive or negative):",
    "label_words": {"negative": [" negative"], "positive": [" positive"]},
}


def load_rows(count: int) -> tuple[list[str], list[int]]:
    lines = SST2_DEV.read_text(encoding="utf-8").splitlines()[1 : count + 1]
    rows = [line.split("\t") for line in lines]
    return [row[0] for row in rows], [int(row[1]) for row in rows]  # as the trainer reads them


def own_label_logits(engine: TeacherEngine, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The model's own next-token logits of each class's (single) label word, right padding."""
    with torch.inference_mode():
        logits = engine.model(input_ids=ids, attention_mask=mask).logits
    after = logits[torch.arange(len(ids)), mask.sum(dim=1) - 1]
    words = [words[0] for words in PROMPT["label_words"].values()]
    return after[:, [engine.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in words]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="a causal LM checkpoint folder")
    parser.add_argument("--sentences", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument(
        "--chat", action="store_true", help="the prompt as the user's turn of the chat template"
    )
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "bench_prompted_teacher.json")
    args = parser.parse_args()
    prompt = LabelPrompt.from_mapping({**PROMPT, "chat": args.chat}, "bench_prompted_teacher")
    engine = TeacherEngine.load("zero-shot", args.teacher, prompt=prompt)
    engine.tokenizer.padding_side = "right"
    texts, gold = load_rows(args.sentences)
    predicted: list[int] = []
    worst = 0.0
    flops = tokens = 0
    seconds = 0.0
    for start in range(0, len(texts), args.batch):
        ids, mask, _ = engine.tokenize(texts[start : start + args.batch])
        tic = time.perf_counter()
        answer = engine.run(TeacherQuery(ids, mask, None, want_logits=True, use_cache=False))
        seconds += time.perf_counter() - tic
        worst = max(worst, float((answer.logits - own_label_logits(engine, ids, mask)).abs().max()))
        predicted += answer.logits.argmax(dim=1).tolist()
        flops, tokens = flops + answer.teacher_flops, tokens + answer.tokens
    rows = len(gold)
    result = {
        "teacher": str(args.teacher),
        "prompt": prompt.prompt,
        "chat": args.chat,
        "sentences": rows,
        "accuracy": sum(p == g for p, g in zip(predicted, gold, strict=True)) / rows,
        "majority": max(gold.count(0), gold.count(1)) / rows,
        "max_abs_diff_vs_own_forward": worst,
        "gflops_per_row": flops / rows / 1e9,
        "prompt_tokens_per_row": tokens / rows,
        "seconds_per_row": seconds / rows,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(result, indent=2))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
