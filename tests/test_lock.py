"""requirements.lock, what `make install` installs: every requirement of pyproject.toml (with the
extras the Makefile installs) pinned at a version that satisfies it, torch without a build label,
and no path of the machine that wrote it. `make lock-check` re-resolves it against PyPI."""

from __future__ import annotations

import re

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.distill_support import REPO

tomllib = pytest.importorskip("tomllib")


def lock_pins() -> dict[str, Version]:
    text = (REPO / "requirements.lock").read_text()
    return {canonicalize_name(n): Version(v) for n, v in re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", text, re.M)}


def installed_requirements() -> list[Requirement]:
    """pyproject.toml's dependencies and those of the extras the Makefile's EXTRAS names."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = re.search(r"^EXTRAS\s*:=\s*(.+)$", (REPO / "Makefile").read_text(), re.M)
    assert extras, "the Makefile names the extras it installs in EXTRAS"
    wanted = list(project["dependencies"])
    for extra in extras.group(1).split():
        wanted += project["optional-dependencies"][extra]
    return [Requirement(line) for line in wanted]


def test_the_lock_pins_every_requirement_at_a_version_that_satisfies_it():
    pins = lock_pins()
    for requirement in installed_requirements():
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} is not in requirements.lock: make lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), f"{requirement} vs {pins[name]}"


def test_the_lock_pins_torch_without_a_build_label_and_holds_no_machine_path():
    """A CUDA build of the pinned version, installed first, satisfies ``torch==X``; ``+cpu`` would not."""
    assert lock_pins()["torch"].local is None
    entries = [
        line for line in (REPO / "requirements.lock").read_text().splitlines() if not line.startswith("#")
    ]
    assert not [line for line in entries if re.search(r"file:|--find-links|--index-url|/work/|/opt/", line)]
