"""What a result was made with: the versions that decide its last digits, and the project's commit.

Every result records it (``results.json`` of ``distill``, the experiment report), so a number can be
traced to the software that made it; docs/reproducibility.md says what reproduces exactly.
"""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "transformers", "tokenizers")
REPO = Path(__file__).resolve().parents[1]


def made_with() -> dict[str, str | None]:
    """``{"python": "3.11.7", "torch": "2.13.0+cpu", ..., "commit": "<sha>[-dirty]"}`` (None: unknown)."""
    record: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            record[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            record[name] = None
    record["commit"] = commit()
    return record


def commit() -> str | None:
    """HEAD of the checkout this code runs from, ``-dirty`` when tracked files differ from it; None
    outside a git checkout (an installed wheel) or without git."""
    try:
        head = _git("rev-parse", "HEAD")
        changed = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if changed else "")


def _git(*args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10, check=True
    )
    return done.stdout.strip()
