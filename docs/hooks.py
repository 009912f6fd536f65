"""MkDocs hook: publish ``results/`` (experiment reports, their plots, benchmark JSON) with the docs.

The results live beside the code that writes them, not in ``docs/``; this hook adds them to the
site under ``results/`` so pages link to the report or JSON a figure comes from, and a link to
one that does not exist fails ``mkdocs build --strict``.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File, Files

# Docstrings cross-reference in reStructuredText (``:func:`x```); the rendered page keeps the name.
SPHINX_ROLE = re.compile(r":(?:mod|func|class|meth|attr|data|exc):(?=<code>)")

PUBLISHED = ("*/*/report.md", "*/*/*.png", "cuda/README.md", "benchmarks/*/*.json")


def on_files(files: Files, config) -> Files:
    root = Path(config["docs_dir"]).parent
    for pattern in PUBLISHED:
        for path in sorted((root / "results").glob(pattern)):
            relative = path.relative_to(root).as_posix()
            files.append(
                File(
                    relative,
                    src_dir=str(root),
                    dest_dir=config["site_dir"],
                    use_directory_urls=config["use_directory_urls"],
                )
            )
    return files


def on_page_content(html: str, page, config, files) -> str:
    return SPHINX_ROLE.sub("", html)
