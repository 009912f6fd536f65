"""A checkpoint's checksums: ``checksums.sha256`` holds the SHA-256 of every other file of the folder,
in ``sha256sum``'s format (``cd checkpoint-N && sha256sum -c checksums.sha256`` checks it by hand).

It is written last, once every file is in place, so a folder that has it was written whole; a file
changed since (bits flipped in place, a file cut short or replaced) no longer matches it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

CHECKSUMS = "checksums.sha256"


def file_sha256(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def write_checksums(folder: Path) -> None:
    lines = [
        f"{file_sha256(path)}  {path.name}\n"
        for path in sorted(folder.iterdir())
        if path.is_file() and path.name != CHECKSUMS
    ]
    (folder / CHECKSUMS).write_text("".join(lines), encoding="utf-8")


def checksum_mismatch(folder: Path) -> str | None:
    """The first file of ``folder`` that is missing or no longer matches its checksum, in words
    naming it; ``None`` when every file matches."""
    listed: dict[str, str] = {}
    for line in (folder / CHECKSUMS).read_text(encoding="utf-8", errors="replace").splitlines():
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name:
            return f"{CHECKSUMS} is damaged (line {line[:40]!r})"
        listed[name] = digest
    if not listed:
        return f"{CHECKSUMS} is empty"
    for name, digest in listed.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing (listed in {CHECKSUMS})"
        if file_sha256(path) != digest:
            return f"{name} does not match its checksum (damaged since it was written)"
    return None
