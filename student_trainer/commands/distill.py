"""`student-trainer distill`: train a student with dynamic knowledge distillation.

Flags follow Hugging Face ``TrainingArguments`` (see :mod:`student_trainer.args.distill`);
``--config FILE.yaml`` may hold any of them. ``torchrun --nproc_per_node N student-trainer
distill ...`` trains data-parallel.
"""

from __future__ import annotations

import argparse

from student_trainer.args.builder import add_arguments, arguments_from_namespace
from student_trainer.args.distill import DistillArguments


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "distill",
        help="distil teacher(s) into a smaller student (dynamic KD)",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    add_arguments(parser, DistillArguments)
    parser.set_defaults(func=run)


def run(namespace: argparse.Namespace) -> int:
    from student_trainer.train.loop import train  # torch + transformers: only when this command runs

    train(arguments_from_namespace(namespace, DistillArguments))
    return 0
