"""`student-trainer finetune`: fine-tune a teacher checkpoint that `teacher-server` can load."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing

from student_trainer.args.distill import FinetuneArguments


def _value_type(hint: typing.Any) -> type:
    """``int | None`` -> int."""
    if isinstance(hint, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "finetune",
        help="Fine-tune a teacher (optionally its first m layers) on a task.",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    hints = typing.get_type_hints(FinetuneArguments)
    for f in dataclasses.fields(FinetuneArguments):
        kind = _value_type(hints[f.name])
        if kind is bool:
            parser.add_argument(f"--{f.name}", action="store_true", help=f.metadata["help"])
        else:
            parser.add_argument(f"--{f.name}", type=kind, default=f.default, help=f.metadata["help"])
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    names = {f.name for f in dataclasses.fields(FinetuneArguments)}
    arguments = FinetuneArguments(**{k: v for k, v in vars(args).items() if k in names})
    from student_trainer.train.finetune import finetune  # torch + transformers: only when this command runs

    results = finetune(arguments)
    summary = ", ".join(
        f"{k}={v:.4f}" for k, v in results.items() if k.startswith("eval_") and isinstance(v, float)
    )
    print(f"saved the fine-tuned teacher to {arguments.output_dir} ({summary or 'no evaluation data'})")
    return 0
