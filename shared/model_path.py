"""Telling a local model folder from a Hugging Face Hub repo id, so a typo in a path is reported
as a missing folder (one line) rather than as a malformed repo id."""

from __future__ import annotations

import os
from pathlib import Path

from shared.errors import UserError


def looks_like_path(name_or_path: str) -> bool:
    """True when the string can only mean a local path, never a Hugging Face Hub repo id
    (``name`` or ``namespace/name``): it starts with ``.``, ``/`` or ``~``, or it holds a
    separator a repo id cannot (a second ``/``, or the OS's own separator when that is not ``/``)."""
    seps = [sep for sep in (os.sep, os.altsep) if sep and sep != "/"]
    return (
        name_or_path.startswith((".", "/", "~"))
        or name_or_path.count("/") > 1
        or any(sep in name_or_path for sep in seps)
    )


def require_model_dir(name_or_path: str | Path) -> None:
    """Refuse a local path that is not a folder before ``transformers`` reports it as a bad repo id."""
    text = str(name_or_path)
    if not looks_like_path(text):
        return
    path = Path(text).expanduser()
    if not path.exists():
        raise UserError(f"no such directory: {text}")
    if not path.is_dir():
        raise UserError(f"not a directory: {text} (give the folder holding config.json)")
