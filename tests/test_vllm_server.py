"""Starting vLLM's OpenAI-compatible server (a stand-in for it: tests/fake_vllm.py): its command line
and environment as its CPU guide says, ready once /v1/models answers, a one-line error quoting its log
when it dies, and nothing of its process group left after the block."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from shared.errors import UserError
from student_trainer.teachers.vllm_server import VllmServer, vllm_python
from tests.fake_vllm import fake_vllm_python


def flags(command: list[str]) -> dict[str, str]:
    return dict(zip(command[3::2], command[4::2], strict=True))


def test_the_command_line_and_environment_are_those_of_its_cpu_guide() -> None:
    server = VllmServer(
        "/v/python", "/ckpt", "large", max_model_len=128, options=("--enforce-eager",), threads=2
    )
    command = server.command(8123)
    assert command[:3] == ["/v/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert "--enforce-eager" in command
    command.remove("--enforce-eager")
    assert flags(command) == {
        "--model": "/ckpt", "--served-model-name": "large", "--max-model-len": "128", "--dtype": "float32",
        "--host": "127.0.0.1", "--port": "8123",
    }  # fmt: skip
    assert server.env == {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1"}
    assert VllmServer("p", "m", "n").env == {"VLLM_CPU_KVCACHE_SPACE": "1"}  # its own choice of cores
    gpu = VllmServer("p", "m", "n", dtype=None, cpu=False)
    assert gpu.env == {} and "--dtype" not in gpu.command(1)


def test_vllms_python_comes_from_the_flag_or_the_environment_and_a_wrong_one_is_one_line(
    tmp_path, monkeypatch
) -> None:
    python = fake_vllm_python(tmp_path)
    monkeypatch.delenv("DKD_VLLM_PYTHON", raising=False)
    with pytest.raises(UserError, match="give --vllm_python or set DKD_VLLM_PYTHON") as missing:
        vllm_python(None)
    assert "\n" not in str(missing.value)
    assert vllm_python(str(python)) == str(python)
    monkeypatch.setenv("DKD_VLLM_PYTHON", str(python))
    assert vllm_python(None) == str(python)
    with pytest.raises(UserError, match="is not an executable python"):
        vllm_python(str(tmp_path))


def test_a_server_that_dies_starting_is_one_line_quoting_the_end_of_its_log(tmp_path) -> None:
    python = tmp_path / "dying-python"
    python.write_text(
        "#!/bin/sh\necho loading the model\necho 'ValueError: no config.json in /ckpt' >&2\nexit 1\n"
    )
    python.chmod(0o755)
    serving = VllmServer(str(python), "/ckpt", "large").serve(tmp_path / "vllm.log", ready_timeout_s=30)
    with pytest.raises(UserError) as died, serving:
        raise AssertionError("entered the block of a server that died")
    message = str(died.value)
    assert "\n" not in message and "vLLM exited with code 1" in message
    assert message.endswith("loading the model | ValueError: no config.json in /ckpt"), message


def test_it_serves_until_the_block_ends_and_then_nothing_of_its_group_is_left(tmp_path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    log = tmp_path / "vllm.log"
    with VllmServer(str(fake_vllm_python(tmp_path)), str(model), "large", threads=1).serve(log) as url:
        listed = httpx.get(f"{url}/v1/models", trust_env=False).json()["data"][0]
        assert (listed["id"], listed["root"]) == ("large", str(model))
        engine = int(re.search(r"engine core pid (\d+)", log.read_text()).group(1))
        assert Path(f"/proc/{engine}").exists()
        assert "'VLLM_CPU_OMP_THREADS_BIND': '0'" in log.read_text()
    assert not alive(engine), "the engine core outlived its server"
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/v1/models", trust_env=False, timeout=2)


def alive(pid: int) -> bool:
    """Running: a zombie (exited, not yet reaped by whoever inherited it) is not."""
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
