"""`student-trainer demo`: the whole system end to end on one machine, through the experiment runner
(see student_trainer/demo.py)."""

from __future__ import annotations

import argparse

from student_trainer.commands.experiment import add_data_flag


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="fine-tune two teachers, serve them, distil a student over REST, print a report",
        description=__doc__,
    )
    parser.add_argument(
        "--config", default="experiments/demo.yaml", help="the demo's runs (an experiment file)"
    )
    add_data_flag(parser)
    parser.add_argument(
        "--work_dir", default=".cache/demo", help="the fine-tuned teachers (reused) and a folder per demo run"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from student_trainer.demo import run_demo

    run_demo(args.config, data=args.data, work_dir=args.work_dir)
    return 0
