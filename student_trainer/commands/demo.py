"""`student-trainer demo`: the whole system end to end on one machine (see student_trainer/demo.py)."""

from __future__ import annotations

import argparse
import dataclasses

from student_trainer.demo import DemoSettings, run_demo


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="fine-tune two teachers, serve them, distil a student over REST, print a report",
        description=__doc__,
    )
    for field in dataclasses.fields(DemoSettings):
        kind = type(field.default) if field.default is not None else str
        kind = int if field.name in ("max_train_samples", "max_eval_samples") else kind
        parser.add_argument(f"--{field.name}", type=kind, default=field.default)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = DemoSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DemoSettings)})
    run_demo(settings)
    return 0
