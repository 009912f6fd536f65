"""`student-trainer finetune`: fine-tune a teacher checkpoint that `teacher-server` can load.

The same flags as `distill` but the KD knobs (every ``TrainingArguments`` flag; BERT's fine-tuning
recipe as defaults); ``--config FILE.yaml`` may hold any of them.
"""

from __future__ import annotations

import argparse

from student_trainer.args.finetune import FinetuneArguments


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "finetune",
        help="Fine-tune a teacher (optionally its first m layers) on a task.",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    parser.add_options(FinetuneArguments)
    parser.set_defaults(func=run, parser=parser)


def run(namespace: argparse.Namespace) -> int:
    arguments = namespace.parser.arguments(namespace, FinetuneArguments)
    from student_trainer.train.finetune import finetune  # torch + transformers: only when this command runs

    results = finetune(arguments)
    summary = ", ".join(
        f"{k}={v:.4f}" for k, v in results.items() if k.startswith("eval_") and isinstance(v, float)
    )
    print(f"saved the fine-tuned teacher to {arguments.output_dir} ({summary or 'no evaluation data'})")
    return 0
