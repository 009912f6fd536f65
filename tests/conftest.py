"""Fixtures every test module may use: tiny teachers and the reference data folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_models import save_tiny_bert

REFERENCE_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def reference_data() -> Path:
    """``../shared/data`` beside the repo; tests that need it skip on a user's fresh clone."""
    if not REFERENCE_DATA.is_dir():
        pytest.skip("../shared/data is not beside this checkout")
    return REFERENCE_DATA


@pytest.fixture(scope="session")
def tiny_teachers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny random teachers: ``small`` (2 layers) and ``large`` (4 layers, wider)."""
    root = tmp_path_factory.mktemp("teachers")
    return {
        "small": save_tiny_bert(root / "small", num_layers=2, hidden_size=32, seed=1),
        "large": save_tiny_bert(root / "large", num_layers=4, hidden_size=48, num_heads=4, seed=2),
    }
