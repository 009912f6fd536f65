"""One spelling per flag: the trainer's ``--snake_case`` everywhere; an old ``--kebab-case``
spelling still parses (scripts and manifests written before) but is not shown in ``--help``."""

from __future__ import annotations

import argparse
from typing import Any


def add_flag(parser: argparse.ArgumentParser, flag: str, *, old: str | None = None, **options: Any) -> None:
    """``parser.add_argument(flag, **options)``, plus ``old`` as a hidden alias of the same option."""
    action = parser.add_argument(flag, **options)
    if old is not None:
        hidden = {k: v for k, v in options.items() if k in ("type", "choices", "action", "metavar")}
        parser.add_argument(
            old, dest=action.dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **hidden
        )
