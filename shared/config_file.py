"""Reading a YAML config file: every problem is one line naming the file (never a traceback)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from shared.errors import UserError


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """The file's top-level mapping (``{}`` for an empty file); ``what`` says what it must hold."""
    path = Path(path)
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise UserError(f"{path}: cannot read config: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {err.start}): is this the YAML config?") from None
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise UserError(f"{path}: the config must be a mapping {what}")
    return loaded
