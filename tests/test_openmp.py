"""Who chooses OpenMP's wait policy (shared/openmp.py): the trainer makes its idle workers sleep,
the server keeps OpenMP's default, and what starts a server beside itself asks it for PASSIVE.
libgomp reads the policy once, when torch loads, so it must be set before that."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared import openmp
from shared.errors import UserError
from shared.openmp import busy_cores_warning, colocated_env
from teacher_server import launch

PROBE = "import {package}, os, sys; print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)"


def policy_seen(package: str, **env: str) -> list[str]:
    base = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    command = [sys.executable, "-c", PROBE.format(package=package)]
    done = subprocess.run(command, env={**base, **env}, capture_output=True, text=True, check=True)
    return done.stdout.split()


def test_the_trainer_chooses_passive_waits_before_torch_loads() -> None:
    assert policy_seen("student_trainer") == ["PASSIVE", "False"]


@pytest.mark.parametrize("package", ["teacher_server", "teacher_engine"])
def test_the_server_and_its_engine_keep_openmps_default(package: str) -> None:
    assert policy_seen(package) == ["None", "False"]


@pytest.mark.parametrize("package", ["teacher_server", "student_trainer"])
def test_a_policy_the_user_set_is_kept(package: str) -> None:
    assert policy_seen(package, OMP_WAIT_POLICY="ACTIVE") == ["ACTIVE", "False"]


def test_a_colocated_child_sleeps_unless_told_otherwise() -> None:
    assert colocated_env({"PATH": "/bin"}) == {"PATH": "/bin", "OMP_WAIT_POLICY": "PASSIVE"}
    assert colocated_env({"OMP_WAIT_POLICY": "ACTIVE"}) == {"OMP_WAIT_POLICY": "ACTIVE"}


class ExitedAtOnce:
    """A server process that exits before it is ready; keeps the environment it was given."""

    envs: list[dict[str, str]] = []

    def __init__(self, command: list[str], **kwargs: object):
        assert isinstance(kwargs["env"], dict)
        self.envs.append(kwargs["env"])
        self.returncode = 3

    def poll(self) -> int:
        return self.returncode

    def send_signal(self, sig: int) -> None: ...

    def wait(self, timeout: float | None = None) -> int:
        return self.returncode


@pytest.mark.parametrize(
    ("colocated", "given", "expected"),
    [(True, None, "PASSIVE"), (True, "ACTIVE", "ACTIVE"), (False, None, None)],
)
def test_a_server_started_beside_its_caller_is_asked_for_passive_waits(
    colocated: bool, given: str | None, expected: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    env = {"OMP_WAIT_POLICY": given} if given else None
    assert policies_given_to_server(env, colocated, monkeypatch) == [expected]


@pytest.mark.parametrize(("shell", "expected"), [(None, None), ("ACTIVE", "ACTIVE")])
def test_a_server_alone_keeps_its_default_where_its_caller_chose_passive_for_itself(
    shell: str | None, expected: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMP_WAIT_POLICY", "restored after the test")  # so the undo removes what is set below
    monkeypatch.delenv("OMP_WAIT_POLICY")
    if shell:
        monkeypatch.setenv("OMP_WAIT_POLICY", shell)
    monkeypatch.setattr(openmp, "_injected", False)
    openmp.prefer_passive_wait()  # what `import student_trainer` does
    assert os.environ["OMP_WAIT_POLICY"] == (shell or "PASSIVE")
    assert policies_given_to_server(None, False, monkeypatch) == [expected]
    assert policies_given_to_server(None, True, monkeypatch) == [shell or "PASSIVE"]


def policies_given_to_server(
    env: dict[str, str] | None, colocated: bool, monkeypatch: pytest.MonkeyPatch
) -> list[str | None]:
    monkeypatch.setattr(launch.subprocess, "Popen", ExitedAtOnce)
    ExitedAtOnce.envs.clear()
    with (
        pytest.raises(UserError, match="exited with code 3"),
        launch.serve_in_subprocess(Path("teachers.yaml"), env=env, colocated=colocated),
    ):
        pass
    return [e.get("OMP_WAIT_POLICY") for e in ExitedAtOnce.envs]


def test_a_server_that_would_spin_on_busy_cores_says_how_to_stop_it() -> None:
    warning = busy_cores_warning({}, load=3.5, cores=2)
    assert warning is not None and "3.5 on 2 cores" in warning and "OMP_WAIT_POLICY=PASSIVE" in warning
    assert busy_cores_warning({}, load=0.4, cores=2) is None  # room on the cores
    assert busy_cores_warning({"OMP_WAIT_POLICY": "ACTIVE"}, load=3.5, cores=2) is None  # chosen


SERIAL_PROBE = """
import os, threading, torch
from shared.openmp import serial_thread
torch.set_num_threads(2)
big = torch.randn(1000, 1000)

def workers_started(serial):
    def work():
        if serial:
            serial_thread()
        before = len(os.listdir("/proc/self/task"))
        (big * 2 + 1).sum()  # large enough for torch to start a team of OpenMP workers
        print(len(os.listdir("/proc/self/task")) - before, torch.get_num_threads())
    thread = threading.Thread(target=work)
    thread.start()
    thread.join()

workers_started(serial=True)
workers_started(serial=False)
print(torch.get_num_threads())
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc (Linux)")
def test_a_serial_thread_starts_no_openmp_workers_and_leaves_other_threads_their_count() -> None:
    done = subprocess.run([sys.executable, "-c", SERIAL_PROBE], capture_output=True, text=True, check=True)
    serial, plain, main = done.stdout.splitlines()
    assert serial == "0 1"  # no new thread, one thread of its own
    assert plain == "1 2"  # the same work on a thread left alone starts a worker
    assert main == "2"
