"""`student-trainer finetune`: fine-tune a teacher checkpoint that `teacher-server` can load.

``--config FILE.yaml`` may hold any of the flags (the same builder as `distill`).
"""

from __future__ import annotations

import argparse

from student_trainer.args.builder import add_arguments, arguments_from_namespace
from student_trainer.args.finetune import FinetuneArguments


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "finetune",
        help="Fine-tune a teacher (optionally its first m layers) on a task.",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    add_arguments(parser, FinetuneArguments)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    arguments = arguments_from_namespace(args, FinetuneArguments)
    from student_trainer.train.finetune import finetune  # torch + transformers: only when this command runs

    results = finetune(arguments)
    summary = ", ".join(
        f"{k}={v:.4f}" for k, v in results.items() if k.startswith("eval_") and isinstance(v, float)
    )
    print(f"saved the fine-tuned teacher to {arguments.output_dir} ({summary or 'no evaluation data'})")
    return 0
