"""`student-trainer` command line: one sub-command per module.

Each command module exposes ``register(subparsers)`` which adds its parser and sets
``func`` to a callable ``run(args) -> int``. Errors the user can fix surface as one line
on stderr and a non-zero exit code (see :class:`shared.errors.UserError`).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from shared.errors import UserError

COMMANDS = ("distill", "finetune", "augment", "demo", "experiment")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="student-trainer",
        description="Distil BERT teachers into a smaller student with dynamic knowledge distillation.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"student_trainer.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"student-trainer {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"student-trainer {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
