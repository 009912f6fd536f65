"""`student-trainer distill`: train a student with dynamic knowledge distillation.

Flags: the model and data options, the KD knobs and every Hugging Face ``TrainingArguments`` flag
(``--bf16``, ``--gradient_accumulation_steps``, ``--report_to``, ...; see
:mod:`student_trainer.args.distill`); ``--config FILE.yaml`` may hold any of them. ``torchrun
--nproc_per_node N student-trainer distill ...`` trains data-parallel.
"""

from __future__ import annotations

import argparse

from student_trainer.args.distill import DistillArguments


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "distill",
        help="distil teacher(s) into a smaller student (dynamic KD)",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    parser.add_options(DistillArguments)
    parser.set_defaults(func=run, parser=parser)


def run(namespace: argparse.Namespace) -> int:
    from student_trainer.train.distill import distill  # torch + transformers: only when this command runs

    distill(namespace.parser.arguments(namespace, DistillArguments))
    return 0
