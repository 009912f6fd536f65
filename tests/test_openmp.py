"""Both commands make idle OpenMP workers sleep unless the user chose otherwise (shared/openmp.py):
libgomp reads the policy once, when torch loads, so it must be set before that."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = "import {package}, os, sys; print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)"


def policy_seen(package: str, **env: str) -> list[str]:
    base = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    command = [sys.executable, "-c", PROBE.format(package=package)]
    done = subprocess.run(command, env={**base, **env}, capture_output=True, text=True, check=True)
    return done.stdout.split()


@pytest.mark.parametrize("package", ["teacher_server", "student_trainer"])
def test_a_command_package_chooses_passive_waits_before_torch_loads(package: str) -> None:
    assert policy_seen(package) == ["PASSIVE", "False"]


@pytest.mark.parametrize("package", ["teacher_server", "student_trainer"])
def test_a_policy_the_user_set_is_kept(package: str) -> None:
    assert policy_seen(package, OMP_WAIT_POLICY="ACTIVE") == ["ACTIVE", "False"]
