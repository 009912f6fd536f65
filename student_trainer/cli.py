"""`student-trainer` command line: one sub-command per module.

Each command module exposes ``register(subparsers)`` which adds its parser and sets
``func`` to a callable ``run(args) -> int``. Errors the user can fix surface as one line
on stderr and a non-zero exit code (see :class:`shared.errors.UserError`).

Exit codes: 0 done; 2 usage or set-up error (bad flags, files, config, a damaged checkpoint to
resume from; argparse's own code); 3 a teacher became unavailable mid-run (a resumable checkpoint
was written); 4 the training loss was NaN or infinite (stopped before the optimizer step); 5 a
checkpoint could not be written (a full disk: the partial one removed); 130 interrupted by
SIGINT/SIGTERM (after a checkpoint of the last completed step, in ``distill``).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from shared.errors import EXIT_INTERRUPTED, EXIT_USAGE, UserError
from student_trainer.args.parser import CommandParser
from student_trainer.train.errors import CheckpointWriteError, Interrupted, NonFiniteLoss, TeacherUnavailable

EXIT_CODES = {TeacherUnavailable: 3, NonFiniteLoss: 4, CheckpointWriteError: 5}  # else EXIT_USAGE

COMMANDS = ("distill", "finetune", "augment", "demo", "experiment")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="student-trainer",
        description="Distil BERT teachers into a smaller student with dynamic knowledge distillation.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=CommandParser)
    for name in COMMANDS:
        importlib.import_module(f"student_trainer.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UserError as err:  # a --config file's key or value
        command = (argv if argv is not None else sys.argv[1:])[0]
        print(f"student-trainer {command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except Interrupted as err:
        print(f"student-trainer {args.command}: {err}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except UserError as err:
        print(f"student-trainer {args.command}: error: {err}", file=sys.stderr)
        return next((code for kind, code in EXIT_CODES.items() if isinstance(err, kind)), EXIT_USAGE)
    except KeyboardInterrupt:
        print(f"student-trainer {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
