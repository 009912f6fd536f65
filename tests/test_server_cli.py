"""`teacher-server`: config validation, one-line errors, JSON logs, graceful shutdown."""

from __future__ import annotations

import collections
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn

from shared.errors import EXIT_INTERRUPTED, EXIT_USAGE, UserError
from teacher_server.cli import build_parser, main, read_api_key
from teacher_server.config import load_config
from teacher_server.launch import serve_in_subprocess


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("teachers: [", "not valid YAML"),
        ("- just a list", "must be a mapping"),
        ("cache_max_bytes: 10", "teachers: Field required"),
        ("teachers: []", "teachers: List should have at least 1 item"),
        ("teachers:\n  - {name: a, path: m, max_batch_tokns: 5}", "teachers.0.max_batch_tokns: Extra inputs"),
        (
            "teachers:\n  - {name: a, path: m, max_batch_size: 0}",
            "teachers.0.max_batch_size: Input should be greater",
        ),
        ("teachers:\n  - {name: a, path: m, dtype: int8}", "teachers.0.dtype: Input should be 'fp32'"),
        (
            "teachers:\n  - {name: a, path: m, device: gpu0}",
            "teachers.0.device: Value error, 'gpu0' is not cpu",
        ),
        ("teachers:\n  - {name: 'a b', path: m}", "teachers.0.name: String should match pattern"),
        (
            "teachers:\n  - {name: a, path: m, max_batch_tokens: 64}",
            "max_batch_tokens (64) must be >= max_seq_length",
        ),
        (
            "teachers:\n  - {name: a, path: m}\n  - {name: a, path: n}",
            "teachers: Value error, teacher names must be",
        ),
        ("teachers:\n  - {name: a, path: ./missing}", "teachers.0.path: no such directory: ./missing"),
        (
            "teachers:\n  - {name: a, path: models/not/there}",
            "teachers.0.path: no such directory: models/not",
        ),
        (
            "teachers:\n  - {name: a, path: '~no-such-user-x9/model'}",
            "teachers.0.path: '~no-such-user-x9/model': cannot expand '~'",
        ),
    ],
)
def test_bad_config_is_one_line_naming_file_and_key(tmp_path, yaml_text, expected):
    path = write(tmp_path / "teachers.yaml", yaml_text)
    with pytest.raises(UserError) as err:
        load_config(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and expected in message and "\n" not in message


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="cannot read config"):
        load_config(tmp_path / "nope.yaml")


def test_config_that_is_not_utf8_text(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_bytes(b"teachers:\n  - {name: a, path: m\xff\xfe}\n")
    with pytest.raises(UserError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: not UTF-8 text")


def test_paths_are_relative_to_the_config_file(tmp_path, tiny_teachers):
    (tmp_path / "models").mkdir()
    os.symlink(tiny_teachers["small"], tmp_path / "models" / "small")
    config = load_config(
        write(
            tmp_path / "t.yaml", "teachers:\n  - {name: s, path: models/small}\n  - {name: h, path: org/bert}"
        )
    )
    assert Path(config.teachers[0].path) == (tmp_path / "models" / "small").resolve()
    assert config.teachers[1].path == "org/bert"  # not on disk: a hub id
    assert config.teachers[0].max_batch_tokens == 8192 and config.cache_max_bytes > 0


def test_the_example_config_is_valid():
    config = load_config(Path(__file__).resolve().parents[1] / "examples" / "teachers.yaml")
    assert [t.name for t in config.teachers] == ["small", "large"]


def test_cli_prints_one_line_and_exits_2(tmp_path, capsys, monkeypatch):
    path = write(tmp_path / "t.yaml", "teachers:\n  - {name: a, path: m, dtype: fp64}")
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("teacher-server: error: ") and "teachers.0.dtype" in err and "\n" not in err
    missing = write(tmp_path / "missing.yaml", "teachers:\n  - {name: a, path: ./not/there}")
    assert main(["--config", str(missing)]) == 2
    assert capsys.readouterr().err == (
        f"teacher-server: error: {missing}: teachers.0.path: no such directory: ./not/there\n"
    )
    good = write(tmp_path / "good.yaml", "teachers:\n  - {name: a, path: org/model}")
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    assert main(["--config", str(good), "--api_key_env", "NO_SUCH_KEY_VAR"]) == 2
    assert "NO_SUCH_KEY_VAR: the API key is empty or unset" in capsys.readouterr().err
    assert main(["--config", str(good), "--key_for_docs_and_metrics"]) == 2
    assert capsys.readouterr().err == (
        "teacher-server: error: --key_for_docs_and_metrics needs an API key: give --api_key_env too\n"
    )


def test_api_key_from_a_secret_file_loses_its_newline(monkeypatch, capsys):
    monkeypatch.setenv("TEACHER_KEY", "sekret\n")
    assert read_api_key("TEACHER_KEY") == "sekret"
    monkeypatch.setenv("TEACHER_KEY", "sek\x07ret")
    with pytest.raises(UserError, match="control or non-ASCII characters") as error:
        read_api_key("TEACHER_KEY")
    assert "sek" not in str(error.value)  # the key itself is never echoed


def test_launcher_refuses_a_port_in_use(tmp_path):
    """Another server on the port would answer the readiness poll in the child's name."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        launch = serve_in_subprocess(tmp_path / "never-read.yaml", port=port)
        with pytest.raises(UserError, match=f"port {port} on 127.0.0.1 is in use"):
            launch.__enter__()


@pytest.mark.parametrize(("drain", "seconds"), [(".inf", float("inf")), ("0.5", 0.5)])
def test_drain_timeout_reaches_uvicorn_as_given(tmp_path, monkeypatch, drain, seconds):
    seen = {}
    monkeypatch.setattr(
        uvicorn.Server, "run", lambda self: seen.update(timeout=self.config.timeout_graceful_shutdown)
    )
    path = write(
        tmp_path / "t.yaml", f"drain_timeout_s: {drain}\nteachers:\n  - {{name: a, path: org/model}}"
    )
    main(["--config", str(path)])  # not started: uvicorn's run is replaced
    assert seen["timeout"] == seconds


@pytest.mark.parametrize("port", ["70000", "-1", "0", "http"])
def test_port_outside_1_to_65535_is_a_usage_error(capsys, port):
    with pytest.raises(SystemExit) as exit_:
        main(["--config", "never-read.yaml", f"--port={port}"])
    assert exit_.value.code == 2 and "argument --port: " in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [["--api_key_env", "KEY", "--log_level", "debug"], ["--api-key-env", "KEY", "--log-level", "debug"]],
    ids=["snake_case", "old-kebab-case"],
)
def test_one_flag_spelling_with_the_old_one_still_accepted(argv, capsys):
    """The trainer's ``--snake_case`` everywhere; scripts using the old spelling keep working."""
    args = build_parser().parse_args(["--config", "c.yaml", *argv])
    assert (args.api_key_env, args.log_level) == ("KEY", "debug")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--config", "c.yaml", "--log-level", "loud"])
    assert "invalid choice: 'loud'" in capsys.readouterr().err
    usage = build_parser().format_help()
    assert "--api_key_env" in usage and "--log_level" in usage
    assert "--api-key-env" not in usage and "--log-level" not in usage
    assert build_parser().parse_args(["--config", "c.yaml"]).log_level == "info"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_cli(
    config: Path, port: int, env: dict[str, str] | None = None, *, sigint_ignored: bool = False
) -> subprocess.Popen:
    """``sigint_ignored``: as a shell starts a background job (the server still drains on SIGINT)."""
    command = [sys.executable, "-m", "teacher_server.cli", "--config", str(config), "--port", str(port)]
    return subprocess.Popen(
        command + (["--api_key_env", "TEACHER_KEY"] if env else []),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None,
    )


def reap(process: subprocess.Popen) -> None:
    """Kill the server if it still runs: a failed test leaves none behind."""
    if process.poll() is None:
        process.kill()
        process.wait()


def wait_until_ready(process: subprocess.Popen, url: str, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        assert process.poll() is None, process.stderr.read()
        try:
            if httpx.get(f"{url}/v2/health/ready", trust_env=False).status_code == 200:
                return
        except httpx.TransportError:
            pass  # not listening yet
        assert time.monotonic() < deadline, "server did not become ready"
        time.sleep(0.2)


def wait_until_queued(url: str, model: str, timeout_s: float = 30) -> None:
    """Until the service's own gauge shows a request waiting in ``model``'s batcher (a fixed sleep
    lost the race on a loaded machine: the signal came first and the request got a correct 503)."""
    deadline = time.monotonic() + timeout_s
    gauge = f'teacher_queue_depth{{model="{model}"}} '
    while not any(
        line.startswith(gauge) and float(line.split()[-1]) >= 1
        for line in httpx.get(f"{url}/metrics", trust_env=False).text.splitlines()
    ):
        assert time.monotonic() < deadline, "the request never reached the queue"
        time.sleep(0.01)


@pytest.mark.slow
def test_served_from_the_cli_with_json_logs_and_a_draining_shutdown(tmp_path, tiny_teachers):
    config = write(
        tmp_path / "t.yaml",
        f"teachers:\n  - {{name: small, path: {tiny_teachers['small']}, max_queue_delay_ms: 1500}}\n",
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_cli(config, port, env={"TEACHER_KEY": "k3y", "OMP_WAIT_POLICY": "PASSIVE"})
    try:
        wait_until_ready(process, url)
        result: dict[str, httpx.Response] = {}
        body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["in flight"]}]}

        def in_flight() -> None:
            result["response"] = httpx.post(
                f"{url}/v2/models/small/infer",
                json=body,
                headers={"Authorization": "Bearer k3y"},
                trust_env=False,
                timeout=30,
            )

        thread = threading.Thread(target=in_flight)
        thread.start()
        wait_until_queued(url, "small")  # waiting out its 1.5 s delay: in flight when the signal comes
        process.send_signal(signal.SIGTERM)
        thread.join(30)
        assert process.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained
    finally:
        reap(process)
    assert result["response"].status_code == 200
    assert result["response"].json()["outputs"][0]["name"] == "logits"
    logs = [json.loads(line) for line in process.stderr.read().splitlines() if line.startswith("{")]
    events = [entry.get("event") for entry in logs]
    assert "teacher_ready" in events and "ready" in events and "drained" in events
    assert next(entry for entry in logs if entry.get("event") == "ready")["omp_wait_policy"] == "PASSIVE"
    assert all({"ts", "level", "logger", "msg"} <= set(entry) for entry in logs)
    assert any(entry.get("path") == "/v2/models/small/infer" and entry.get("status") == 200 for entry in logs)


@pytest.mark.slow
@pytest.mark.parametrize("sigint_ignored", [False, True], ids=["terminal", "background job"])
def test_ctrl_c_drains_and_exits_130_without_a_traceback(tmp_path, tiny_teachers, sigint_ignored):
    """uvicorn raises SIGINT again once drained: a terminal's Ctrl-C must not end in a traceback, and
    where SIGINT was ignored at start (that raise does nothing) the exit code still says SIGINT."""
    config = write(tmp_path / "t.yaml", f"teachers:\n  - {{name: small, path: {tiny_teachers['small']}}}\n")
    port = free_port()
    process = start_cli(config, port, sigint_ignored=sigint_ignored)
    try:
        wait_until_ready(process, f"http://127.0.0.1:{port}")
        process.send_signal(signal.SIGINT)
        code = process.wait(30)
    finally:
        reap(process)
    stderr = process.stderr.read()
    assert code == EXIT_INTERRUPTED, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert any(
        json.loads(line).get("event") == "drained" for line in stderr.splitlines() if line.startswith("{")
    )


@pytest.mark.slow
def test_a_teacher_that_cannot_load_stops_the_server_with_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    config = write(tmp_path / "t.yaml", "teachers:\n  - {name: broken, path: ./empty}\n")
    process = start_cli(config, free_port())
    try:
        code = process.wait(90)
    finally:
        reap(process)
    stderr = process.stderr.read()
    assert code == EXIT_USAGE
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("teacher-server: error: teacher 'broken' failed to load")


@pytest.mark.slow
def test_sigterm_turns_ready_and_new_requests_503_with_connection_close_answers_in_flight_then_exits(
    tmp_path, tiny_teachers
):
    config = write(
        tmp_path / "t.yaml",
        "drain_grace_s: 1.5\n"
        f"teachers:\n  - {{name: small, path: {tiny_teachers['small']}, max_queue_delay_ms: 1500}}\n",
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_cli(config, port)
    body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["in flight"]}]}
    result: dict[str, httpx.Response] = {}
    try:
        wait_until_ready(process, url)
        with httpx.Client(trust_env=False, timeout=30) as keep_alive:
            assert keep_alive.get(f"{url}/v2/health/ready").status_code == 200  # a kept-alive connection

            def in_flight() -> None:
                result["response"] = keep_alive.post(f"{url}/v2/models/small/infer", json=body)

            thread = threading.Thread(target=in_flight)
            thread.start()
            time.sleep(0.5)  # queued, waiting out its 1.5 s delay
            process.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            with httpx.Client(trust_env=False, timeout=5) as newcomer:
                ready = newcomer.get(f"{url}/v2/health/ready")
                new = newcomer.post(f"{url}/v2/models/small/infer", json=body)
            thread.join(30)
        assert ready.status_code == 503 and ready.headers["connection"] == "close"
        assert new.status_code == 503 and new.headers["connection"] == "close" and new.json()["field"]
        answered = result["response"]
        assert answered.status_code == 200 and answered.headers["connection"] == "close"
        assert process.wait(30) in (0, -signal.SIGTERM)
    finally:
        reap(process)


@pytest.mark.slow
def test_requests_sent_as_the_drain_ends_are_answered_or_refused_never_reset(tmp_path, tiny_teachers):
    """Clients open a new connection per request through the whole drain: each gets 200, then
    503, then a refused connection; none is reset or closed unanswered (closing the listener
    outright reset 2-4 of them per drain)."""
    config = write(
        tmp_path / "t.yaml",
        f"drain_grace_s: 0.3\nteachers:\n  - {{name: small, path: {tiny_teachers['small']}}}\n",
    )
    port = free_port()
    command = [sys.executable, "-m", "teacher_server.cli", "--config", str(config), "--port", str(port)]
    process = subprocess.Popen([*command, "--log_level", "warning"], stderr=subprocess.PIPE, text=True)
    outcomes: collections.Counter[str] = collections.Counter()
    stop = threading.Event()

    def one_request_per_connection() -> None:
        while not stop.is_set():
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            except ConnectionRefusedError:
                outcomes["refused"] += 1
                time.sleep(0.01)
                continue
            with sock:
                try:
                    sock.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: t\r\n\r\n")
                    answer = sock.recv(4096)
                    outcomes[answer.split(b" ", 2)[1].decode() if answer else "closed unanswered"] += 1
                except OSError as err:
                    outcomes[type(err).__name__] += 1

    clients = [threading.Thread(target=one_request_per_connection) for _ in range(4)]
    try:
        wait_until_ready(process, f"http://127.0.0.1:{port}")
        for client in clients:
            client.start()
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) in (0, -signal.SIGTERM)
        time.sleep(0.3)
    finally:
        stop.set()
        for client in clients:
            client.join(30)
        reap(process)
    assert outcomes["200"] and outcomes["503"] and outcomes["refused"], outcomes
    assert set(outcomes) == {"200", "503", "refused"}, outcomes


def read_until_closed(sock: socket.socket, limit_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    started, received = time.monotonic(), b""
    sock.settimeout(limit_s)
    while chunk := sock.recv(65536):
        received += chunk
    return received, time.monotonic() - started


@pytest.mark.slow
def test_stalled_headers_and_bodies_are_answered_408_and_closed(tmp_path, tiny_teachers):
    config = write(
        tmp_path / "t.yaml",
        f"read_timeout_s: 1\nteachers:\n  - {{name: small, path: {tiny_teachers['small']}}}\n",
    )
    port = free_port()
    process = start_cli(config, port)
    try:
        wait_until_ready(process, f"http://127.0.0.1:{port}")
        request = f"POST /v2/models/small/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode()
        with socket.create_connection(("127.0.0.1", port)) as headers_only:
            headers_only.sendall(request)  # and never the blank line
            received, seconds = read_until_closed(headers_only, 10)
        assert received.startswith(b"HTTP/1.1 408") and b'"field":"headers"' in received and seconds < 5
        with socket.create_connection(("127.0.0.1", port)) as half_body:
            half_body.sendall(request + b'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"in')
            received, seconds = read_until_closed(half_body, 10)
        assert received.startswith(b"HTTP/1.1 408") and b'"field":"body"' in received and seconds < 5
        assert process.poll() is None  # and the server goes on serving
    finally:
        process.terminate()
        process.wait(30)
