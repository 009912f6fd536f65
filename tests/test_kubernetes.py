"""deploy/kubernetes/: every manifest checked against its schema, cross-checked, and run outside a cluster.

CI has no cluster. So (1) each manifest validates against the Kubernetes schemas of
kubernetes-validate (strict: an unknown field fails) and the custom resources (KServe
ServingRuntime / InferenceService, Kubeflow PyTorchJob, ServiceMonitor) against schemas generated
from their SDKs (tests/data/crd-schemas/, scripts/generate_crd_schemas.py); a kind or apiVersion
with no schema fails too. (2) What no schema sees is cross-checked: Secret keys, ConfigMaps and
volume claims that exist, ports that agree (container, probes, ``--port``, Service, ServiceMonitor,
the trainer's URLs), modules and flags of the container commands. (3) The containers' command lines
run here, with their args and environment (paths, ports and cluster host names mapped, the
Training Operator's PET_* variables for torchrun), as tests/test_docker.py does for compose; the
trainer's client then talks to the KServe runtime through a stand-in for KServe's ingress that
routes by Host header and returns 429/503 when told to.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import functools
import http.client
import importlib.util
import json
import re
import shlex
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import StringIO
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from tests.test_docker import (
    DOCKERFILE,
    VENV_BIN,
    Container,
    free_port,
    image_env,
    last,
    parse_dockerfile,
    target_instructions,
    write_tiny_sst2,
)

pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (dev extra)")

REPO = Path(__file__).resolve().parents[1]
MANIFEST_DIR = REPO / "deploy" / "kubernetes"
MANIFESTS = sorted(MANIFEST_DIR.rglob("*.yaml"))
CRD_SCHEMAS = Path(__file__).parent / "data" / "crd-schemas"
# The oldest Kubernetes release the manifests are checked against (preStop `sleep` needs 1.30+).
K8S_VERSION = "1.31.0"
NAMESPACE = "dynamic-kd"
CLUSTER_DOMAIN = "svc.cluster.local"
API_KEY = "k8s-test-key"  # what `kubectl create secret generic teacher-api-key` would hold
# image -> the docker/Dockerfile target it is built from
IMAGES = {"dynamic-kd/teacher-server": "teacher-server", "dynamic-kd/student-trainer": "student-trainer"}
PROGRAMS = {  # executable or module -> the argparse parser of that program
    "teacher-server": "teacher_server.cli",
    "student-trainer": "student_trainer.cli",
    "student_trainer.cli": "student_trainer.cli",
}


# -- reading the manifests ----------------------------------------------------------------------------


def load_documents() -> list[dict]:
    docs = []
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                doc.setdefault("metadata", {})["__file__"] = str(path.relative_to(REPO))
                docs.append(doc)
    return docs


@functools.cache
def documents() -> tuple[dict, ...]:
    return tuple(load_documents())


def where(doc: dict) -> str:
    return f"{doc['metadata'].get('__file__', '?')}: {doc.get('kind')}/{doc['metadata'].get('name')}"


def without_marks(doc: dict) -> dict:
    clean = copy.deepcopy(doc)
    clean["metadata"].pop("__file__", None)
    return clean


def find(docs: list[dict] | tuple[dict, ...], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def pod_spec(doc: dict) -> dict | None:
    """The pod template of a workload (Deployment, each PyTorchJob replica) or a runtime's pod fields."""
    kind = doc["kind"]
    if kind in ("Deployment", "Job"):
        return doc["spec"]["template"]["spec"]
    if kind == "ServingRuntime":
        return doc["spec"]
    if kind == "InferenceService":
        predictor = doc["spec"]["predictor"]
        return {**predictor, "containers": [predictor["model"]] if "model" in predictor else []}
    return None


def pod_specs(doc: dict) -> list[dict]:
    if doc["kind"] == "PyTorchJob":
        return [r["template"]["spec"] for r in doc["spec"]["pytorchReplicaSpecs"].values()]
    spec = pod_spec(doc)
    return [spec] if spec is not None else []


# -- (1) schemas --------------------------------------------------------------------------------------


@functools.cache
def k8s_registry() -> Any:
    """kubernetes-validate's definitions (the strict ones: no unknown fields) for K8S_VERSION."""
    import referencing
    from kubernetes_validate.utils import schema_contents

    defs = schema_contents(
        f"kubernetes-json-schema/v{K8S_VERSION}-local-strict/_definitions.json", K8S_VERSION
    )
    return referencing.Registry().with_resource(defs["$id"], referencing.Resource.from_contents(defs))


@functools.cache
def validator(kind: str, api_version: str) -> Any:
    """The schema of a kind at an API version: a CRD's from tests/data/crd-schemas/, else
    kubernetes-validate's (``apps/v1`` Deployment -> ``deployment-apps-v1.json``); None if neither."""
    import jsonschema
    from kubernetes_validate.utils import schema_contents

    crd = CRD_SCHEMAS / f"{kind.lower()}-{api_version.replace('/', '-')}.json"
    if crd.is_file():
        schema = json.loads(crd.read_text())
    else:
        group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
        try:
            schema = schema_contents(
                f"kubernetes-json-schema/v{K8S_VERSION}-local-strict/{kind.lower()}-{group_version}.json",
                K8S_VERSION,
            )
        except FileNotFoundError:
            return None
    return jsonschema.Draft202012Validator(schema, registry=k8s_registry())


def schema_errors(doc: dict) -> list[str]:
    """Why ``doc`` fails its schema (empty when it passes); no schema for its kind/apiVersion is an error."""
    manifest = without_marks(doc)
    kind, api_version = str(manifest.get("kind")), str(manifest.get("apiVersion"))
    check = validator(kind, api_version)
    if check is None:
        return [f"{where(doc)}: no schema for {kind} {api_version}"]
    return [
        f"{where(doc)}: {'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in check.iter_errors(manifest)
    ]


# -- (2) cross-checks ---------------------------------------------------------------------------------


def containers(doc: dict) -> list[dict]:
    return [c for spec in pod_specs(doc) for c in spec.get("containers", [])]


def secret_key_errors(docs: list[dict]) -> list[str]:
    keys = {
        s["metadata"]["name"]: set(s.get("data", {})) | set(s.get("stringData", {}))
        for s in find(docs, "Secret")
    }
    errors = []
    for doc in docs:
        for container in containers(doc):
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref and ref["key"] not in keys.get(ref["name"], set()):
                    errors.append(
                        f"{where(doc)}: env {env['name']}: Secret {ref['name']} has no key {ref['key']!r}"
                    )
    return errors


def volume_errors(docs: list[dict]) -> list[str]:
    config_maps = {d["metadata"]["name"] for d in find(docs, "ConfigMap")}
    claims = {d["metadata"]["name"] for d in find(docs, "PersistentVolumeClaim")}
    errors = []
    for doc in docs:
        for spec in pod_specs(doc):
            volumes = {v["name"]: v for v in spec.get("volumes", [])}
            for volume in volumes.values():
                if "configMap" in volume and volume["configMap"]["name"] not in config_maps:
                    errors.append(
                        f"{where(doc)}: volume {volume['name']}: no ConfigMap {volume['configMap']['name']}"
                    )
                claim = volume.get("persistentVolumeClaim", {}).get("claimName")
                if claim is not None and claim not in claims:
                    errors.append(f"{where(doc)}: volume {volume['name']}: no PersistentVolumeClaim {claim}")
            for container in spec.get("containers", []):
                for mount in container.get("volumeMounts", []):
                    if mount["name"] not in volumes:
                        errors.append(
                            f"{where(doc)}: {container['name']} mounts undeclared volume {mount['name']}"
                        )
        if doc["kind"] == "InferenceService":
            uri = doc["spec"]["predictor"]["model"].get("storageUri", "")
            if uri.startswith("pvc://") and uri[len("pvc://") :].split("/")[0] not in claims:
                errors.append(f"{where(doc)}: storageUri {uri}: no such PersistentVolumeClaim")
    return errors


def container_ports(container: dict) -> dict[str | int, int]:
    """Port names and numbers -> number."""
    ports: dict[str | int, int] = {}
    for port in container.get("ports", []):
        ports[port["containerPort"]] = port["containerPort"]
        if "name" in port:
            ports[port["name"]] = port["containerPort"]
    return ports


def option(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


def port_errors(docs: list[dict]) -> list[str]:
    errors = []
    served: list[tuple[dict, dict, int]] = []  # (labels, container, port) of every pod that listens
    for doc in docs:
        for container in containers(doc):
            ports = container_ports(container)
            listen = option(container.get("args", []), "--port")
            if listen is not None and int(listen) not in ports.values():
                declared = sorted(set(ports.values()))
                errors.append(f"{where(doc)}: {container['name']} listens on {listen}, declares {declared}")
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                port = container.get(probe, {}).get("httpGet", {}).get("port")
                if port is not None and port not in ports:
                    errors.append(
                        f"{where(doc)}: {container['name']} {probe} port {port!r} is not a container port"
                    )
        if doc["kind"] == "Deployment":
            labels = doc["spec"]["template"]["metadata"]["labels"]
            if not doc["spec"]["selector"]["matchLabels"].items() <= labels.items():
                errors.append(f"{where(doc)}: selector does not match the pod labels")
            served += [(labels, c, p) for c in containers(doc) for p in container_ports(c).values()]
    for service in find(docs, "Service"):
        pods = [
            (c, labels) for labels, c, _ in served if service["spec"]["selector"].items() <= labels.items()
        ]
        if not pods:
            errors.append(f"{where(service)}: selector matches no pod template")
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            if pods and not all(target in container_ports(c) for c, _ in pods):
                errors.append(f"{where(service)}: targetPort {target!r} is not a port of the selected pods")
    for monitor in find(docs, "ServiceMonitor"):
        services = [
            s
            for s in find(docs, "Service")
            if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"].get("labels", {}).items()
        ]
        for endpoint in monitor["spec"]["endpoints"]:
            if not any(endpoint["port"] == p.get("name") for s in services for p in s["spec"]["ports"]):
                errors.append(f"{where(monitor)}: no selected Service has a port named {endpoint['port']!r}")
    for doc in docs:
        for container in containers(doc):
            errors += [f"{where(doc)}: {e}" for e in url_errors(docs, container.get("args", []))]
    return errors


def teacher_urls(args: list[str]) -> list[str]:
    specs = [args[i + 1].split("=", 1)[1] for i, arg in enumerate(args[:-1]) if arg == "--teacher"]
    return [url for spec in specs for url in spec.split("#")[0].split(",")]


def url_errors(docs: list[dict], args: list[str]) -> list[str]:
    """Each teacher URL names a Service (and one of its ports) or a KServe predictor of these manifests."""
    errors = []
    for url in teacher_urls(args):
        parts = urlsplit(url)
        name, _, rest = (parts.hostname or "").partition(".")
        if rest != f"{NAMESPACE}.{CLUSTER_DOMAIN}":
            errors.append(f"teacher URL {url}: not a Service of namespace {NAMESPACE}")
            continue
        services = find(docs, "Service", name)
        predictors = find(docs, "InferenceService", name.removesuffix("-predictor"))
        if services and parts.port not in [p["port"] for p in services[0]["spec"]["ports"]]:
            errors.append(f"teacher URL {url}: Service {name} has no port {parts.port}")
        elif predictors and parts.port not in (None, 80):
            errors.append(f"teacher URL {url}: a KServe predictor listens on port 80")
        elif not services and not (name.endswith("-predictor") and predictors):
            errors.append(f"teacher URL {url}: no Service or InferenceService {name}")
    return errors


def kserve_errors(docs: list[dict]) -> list[str]:
    formats = {
        r["metadata"]["name"]: {f["name"] for f in r["spec"]["supportedModelFormats"]}
        for r in find(docs, "ServingRuntime")
    }
    errors = []
    for service in find(docs, "InferenceService"):
        model = service["spec"]["predictor"]["model"]
        runtime = model.get("runtime")
        if runtime not in formats:
            errors.append(f"{where(service)}: no ServingRuntime {runtime!r}")
        elif model["modelFormat"]["name"] not in formats[runtime]:
            errors.append(
                f"{where(service)}: runtime {runtime} does not serve {model['modelFormat']['name']!r}"
            )
    return errors


def image_argv(container: dict) -> list[str]:
    """What the container runs: its command (or the image's ENTRYPOINT) and its args."""
    image = container["image"].rsplit(":", 1)[0]
    if image not in IMAGES:
        raise AssertionError(
            f"{container['name']}: image {container['image']} is not built from docker/Dockerfile"
        )
    command = container.get("command")
    if command is None:
        command = json.loads(
            last(target_instructions(parse_dockerfile(DOCKERFILE), IMAGES[image]), "ENTRYPOINT")
        )
    return [*command, *container.get("args", [])]


def completion_indexes(doc: dict) -> list[dict[str, str]]:
    """What an Indexed Job's pods see as JOB_COMPLETION_INDEX, one mapping per index (else one empty)."""
    spec = doc.get("spec", {})
    if doc["kind"] != "Job" or spec.get("completionMode") != "Indexed":
        return [{}]
    return [{"JOB_COMPLETION_INDEX": str(i)} for i in range(spec["completions"])]


def expand(args: list[str], container: dict, downward: dict[str, str]) -> list[str]:
    """``$(NAME)`` as the kubelet expands it: from the container's env (literal values, or the downward
    API's value in ``downward``); a reference to anything else stays as written."""
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    env |= {e["name"]: downward[e["name"]] for e in container.get("env", []) if e["name"] in downward}
    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), a) for a in args]


def shard_errors(doc: dict, container: dict) -> list[str]:
    """An Indexed Job's ``--shard I/N``: N is its completions, so every run of the grid has a task."""
    shard = option(container.get("args", []), "--shard")
    if shard is None:
        return []
    count = shard.rpartition("/")[2]
    completions = doc["spec"].get("completions") if doc["kind"] == "Job" else None
    if str(completions) != count:
        return [f"{where(doc)}: --shard {shard} splits the grid {count} ways, completions is {completions}"]
    return []


def command_errors(docs: list[dict]) -> list[str]:
    """The executable exists, a ``-m`` module imports, the program's own parser accepts the arguments
    (for each index of an Indexed Job)."""
    errors = []
    for doc in docs:
        for container in containers(doc):
            if "image" not in container:
                continue  # an InferenceService's model takes its image from the ServingRuntime
            errors += shard_errors(doc, container)
            for downward in completion_indexes(doc):
                errors += argv_errors(doc, expand(image_argv(container), container, downward))
    return errors


def argv_errors(doc: dict, argv: list[str]) -> list[str]:
    """One container command line: the executable, a ``-m`` module, the program's own parser."""
    program, args = argv[0], argv[1:]
    if shutil.which(program, path=str(VENV_BIN)) is None:
        return [f"{where(doc)}: {program}: no such executable in the image"]
    if program == "torchrun":
        module = option(args, "-m")
        if module is None or importlib.util.find_spec(module) is None:
            return [f"{where(doc)}: torchrun -m {module}: no such module"]
        program, args = module, args[args.index("-m") + 2 :]
    if program not in PROGRAMS:
        return [f"{where(doc)}: {program}: a program these tests cannot check"]
    parser = importlib.import_module(PROGRAMS[program]).build_parser()
    with redirect_stderr(StringIO()) as stderr:
        try:
            parser.parse_args(args)
        except SystemExit:
            return [f"{where(doc)}: {program} {shlex.join(args)}: {stderr.getvalue().strip()}"]
    return []


CROSS_CHECKS = (secret_key_errors, volume_errors, port_errors, kserve_errors, command_errors)


def all_errors(docs: list[dict]) -> list[str]:
    """Schemas, then the cross-checks; a check that trips over a malformed manifest says so."""
    errors = [e for doc in docs for e in schema_errors(doc)]
    for check in CROSS_CHECKS:
        try:
            errors += check(docs)
        except (KeyError, TypeError, ValueError) as err:
            errors.append(f"{check.__name__} could not read the manifests: {type(err).__name__}: {err}")
    return errors


@pytest.mark.parametrize("doc", documents(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_manifest_matches_its_schema(doc: dict) -> None:
    assert schema_errors(doc) == []


@pytest.mark.parametrize("check", CROSS_CHECKS, ids=lambda c: c.__name__)
def test_manifests_agree_with_each_other(check: Any) -> None:
    assert check(list(documents())) == []


def test_every_kind_the_issue_asks_for_is_there() -> None:
    kinds = {d["kind"] for d in documents()}
    assert {
        "ServingRuntime",
        "InferenceService",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "ServiceMonitor",
        "Secret",
        "PyTorchJob",
        "Job",
        "ConfigMap",
        "PersistentVolumeClaim",
    } <= kinds
    for doc in documents():
        assert doc["kind"] == "Namespace" or doc["metadata"].get("namespace") == NAMESPACE, where(doc)


def edit(kind: str, name: str, change: Any) -> list[dict]:
    docs = [copy.deepcopy(d) for d in documents()]
    change(find(docs, kind, name)[0])
    return docs


def rename_key(mapping: dict, old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


def deployment_container(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]["containers"][0]


def worker(doc: dict) -> dict:
    return doc["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]


GRID_JOB = "grid-single-teacher"


BREAKAGES = {  # the five the issue names, some in more than one place; each must fail
    "misspelt field: Deployment containerPrt": (
        (
            "Deployment",
            "teacher-server",
            lambda d: rename_key(deployment_container(d)["ports"][0], "containerPort", "containerPrt"),
        ),
        "containerPrt",
    ),
    "misspelt field: InferenceService minReplica": (
        (
            "InferenceService",
            "teacher-small",
            lambda d: rename_key(d["spec"]["predictor"], "minReplicas", "minReplica"),
        ),
        "minReplica",
    ),
    "misspelt field: PyTorchJob rdzvBakend": (
        (
            "PyTorchJob",
            "distill-sst2",
            lambda d: rename_key(d["spec"]["elasticPolicy"], "rdzvBackend", "rdzvBakend"),
        ),
        "rdzvBakend",
    ),
    "wrong port: container listens on 8000, declares 8001": (
        (
            "Deployment",
            "teacher-server",
            lambda d: deployment_container(d)["ports"][0].update(containerPort=8001),
        ),
        "listens on 8000",
    ),
    "wrong port: Service targetPort 8080": (
        ("Service", "teacher-server", lambda d: d["spec"]["ports"][0].update(targetPort=8080)),
        "targetPort 8080",
    ),
    "wrong port: trainer asks the Service on 8080": (
        (
            "PyTorchJob",
            "distill-sst2",
            lambda d: worker(d).update(args=[a.replace(":8000", ":8080") for a in worker(d)["args"]]),
        ),
        "has no port 8080",
    ),
    "wrong port: ServingRuntime probes 8000": (
        (
            "ServingRuntime",
            "teacher-server",
            lambda d: d["spec"]["containers"][0]["readinessProbe"]["httpGet"].update(port=8000),
        ),
        "readinessProbe port 8000",
    ),
    "bad module path: torchrun -m student_trainer.clii": (
        ("PyTorchJob", "distill-sst2", lambda d: worker(d)["args"].__setitem__(1, "student_trainer.clii")),
        "no such module",
    ),
    "bad flag: --selection_ration": (
        (
            "PyTorchJob",
            "distill-sst2",
            lambda d: worker(d)["args"].__setitem__(
                worker(d)["args"].index("--selection_ratio"), "--selection_ration"
            ),
        ),
        "unrecognized arguments",
    ),
    "grid split 8 ways by 4 tasks": (
        ("Job", GRID_JOB, lambda d: d["spec"].update(completions=4)),
        "completions is 4",
    ),
    "grid shard index not expanded: $(JOB_INDEX)": (
        (
            "Job",
            GRID_JOB,
            lambda d: deployment_container(d).update(
                args=[a.replace("JOB_COMPLETION_INDEX", "JOB_INDEX") for a in deployment_container(d)["args"]]
            ),
        ),
        "is not I/N",
    ),
    "missing Secret key: apikey": (
        (
            "Deployment",
            "teacher-server",
            lambda d: deployment_container(d)["env"][0]["valueFrom"]["secretKeyRef"].update(key="apikey"),
        ),
        "has no key 'apikey'",
    ),
    "wrong API version: autoscaling/v2beta3": (
        ("HorizontalPodAutoscaler", "teacher-server", lambda d: d.update(apiVersion="autoscaling/v2beta3")),
        "no schema for HorizontalPodAutoscaler autoscaling/v2beta3",
    ),
    "wrong API version: serving.kserve.io/v1beta2": (
        ("InferenceService", "teacher-large", lambda d: d.update(apiVersion="serving.kserve.io/v1beta2")),
        "no schema for InferenceService serving.kserve.io/v1beta2",
    ),
    "wrong API version: PodDisruptionBudget policy/v1beta1 (removed in 1.25)": (
        ("PodDisruptionBudget", "teacher-server", lambda d: d.update(apiVersion="policy/v1beta1")),
        "no schema for PodDisruptionBudget policy/v1beta1",
    ),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_a_broken_manifest_fails_validation(breakage: str) -> None:
    (kind, name, change), expected = BREAKAGES[breakage]
    errors = all_errors(edit(kind, name, change))
    assert any(expected in e for e in errors), errors


# -- (3) the command lines, run here ------------------------------------------------------------------


def embedded_config(docs: tuple[dict, ...], config_map: str) -> str:
    return find(docs, "ConfigMap", config_map)[0]["data"]["teachers.yaml"]


def test_plain_deployment_serves_the_docker_gpu_config() -> None:
    embedded = yaml.safe_load(embedded_config(documents(), "teacher-server-config"))
    assert embedded == yaml.safe_load((REPO / "docker" / "teachers.gpu.yaml").read_text())


@pytest.mark.parametrize(
    "config_map", ["teacher-server-config", "teacher-small-config", "teacher-large-config"]
)
def test_embedded_teacher_configs_load(
    config_map: str, tiny_teachers: dict[str, Path], tmp_path: Path
) -> None:
    from teacher_server.config import load_config

    text = embedded_config(documents(), config_map).replace("/models/", f"{tiny_teachers['small'].parent}/")
    for name, path in tiny_teachers.items():  # storageUri pvc://teacher-models/NAME at /mnt/models
        text = text.replace("/mnt/models", str(path)) if f"name: {name}" in text else text
    (tmp_path / "teachers.yaml").write_text(text)
    teachers = load_config(tmp_path / "teachers.yaml").teachers
    expected = ["small", "large"] if config_map == "teacher-server-config" else [config_map.split("-")[1]]
    assert [t.name for t in teachers] == expected
    assert {t.device for t in teachers} == {"cuda:0"}


def resolve_env(container: dict, secrets: dict[str, dict[str, str]]) -> dict[str, str]:
    """The container's env as the kubelet fills it: values and secretKeyRefs."""
    env = {}
    for item in container.get("env", []):
        ref = item.get("valueFrom", {}).get("secretKeyRef")
        env[item["name"]] = secrets[ref["name"]][ref["key"]] if ref else item["value"]
    return env


SECRETS = {"teacher-api-key": {"api-key": API_KEY}}


@dataclass
class Pod:
    """One container started here: argv and env from the manifest, mapped by ``container``."""

    container: Container
    argv: list[str]
    env: dict[str, str]
    log: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def probe(self, spec: dict) -> int:
        """An httpGet probe as the kubelet sends it: no headers, to the pod's port."""
        port = spec["httpGet"]["port"]
        url = f"http://127.0.0.1:{self.container.port}{spec['httpGet']['path']}"
        assert port in (self.container.container_port, int(self.container.container_port), "http"), port
        try:
            return httpx.get(url, timeout=spec.get("timeoutSeconds", 1)).status_code
        except httpx.HTTPError:
            return 0


@contextmanager
def run_pod(doc: dict, root: Path, config_map: str, mounts: dict[str, Path]) -> Iterator[Pod]:
    """Start a teacher container's command line here; yield once its readiness probe passes."""
    (container_spec,) = [c for c in containers(doc) if "image" in c]
    listen = option(container_spec["args"], "--port")
    assert listen is not None
    config_dir = root / "config"
    config_dir.mkdir()
    text = embedded_config(documents(), config_map)
    for inside, stand_in in mounts.items():
        text = text.replace(f"{inside}/", f"{stand_in}/").replace(f"{inside} ", f"{stand_in} ")
    # No GPU here: the one change to the manifests' teachers (their GPU form is loaded above).
    text = text.replace("device: cuda:0", "device: cpu").replace("dtype: bf16", "dtype: fp32")
    (config_dir / "teachers.yaml").write_text(text)
    container = Container(
        paths={"/etc/teacher-server": config_dir, "/home/app": root, **mounts},
        port=free_port(),
        container_port=listen,
    )
    image = target_instructions(
        parse_dockerfile(DOCKERFILE), IMAGES[container_spec["image"].rsplit(":", 1)[0]]
    )
    pod = Pod(
        container,
        container.argv(image_argv(container_spec)),
        container.env(image_env(image), resolve_env(container_spec, SECRETS)),
        root / "pod.log",
    )
    with pod.log.open("w") as log:
        pod.process = subprocess.Popen(pod.argv, env=pod.env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while pod.probe(container_spec["readinessProbe"]) != 200:
            assert pod.process.poll() is None, f"{shlex.join(pod.argv)} exited:\n{pod.log.read_text()}"
            assert time.monotonic() < deadline, f"not ready after 90 s:\n{pod.log.read_text()}"
            time.sleep(0.3)
        assert pod.probe(container_spec["livenessProbe"]) == 200
        yield pod
    finally:
        pod.process.send_signal(signal.SIGTERM)  # what the kubelet sends after preStop
        try:
            pod.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pod.process.kill()
            pod.process.wait()
            raise AssertionError(f"teacher-server ignored SIGTERM:\n{pod.log.read_text()}") from None


@pytest.fixture(scope="module")
def volumes(tiny_teachers: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The PVCs: teacher-models (small/, large/, student-init/) and trainer-data (tiny SST-2)."""
    root = tmp_path_factory.mktemp("volumes")
    models = root / "teacher-models"
    models.mkdir()
    for name, target in {**tiny_teachers, "student-init": tiny_teachers["small"]}.items():
        (models / name).symlink_to(target)
    write_tiny_sst2(root / "trainer-data")
    return {"/models": models, "/data": root / "trainer-data", "/outputs": root / "trainer-outputs"}


@pytest.fixture(scope="module")
def plain_pod(volumes: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pod]:
    deployment = find(documents(), "Deployment", "teacher-server")[0]
    root = tmp_path_factory.mktemp("teacher-server-pod")
    with run_pod(deployment, root, "teacher-server-config", {"/models": volumes["/models"]}) as pod:
        yield pod


@pytest.fixture(scope="module")
def kserve_pod(volumes: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pod]:
    """The ServingRuntime's container with teacher-small's ConfigMap and storageUri (/mnt/models)."""
    runtime = find(documents(), "ServingRuntime", "teacher-server")[0]
    storage_uri = find(documents(), "InferenceService", "teacher-small")[0]["spec"]["predictor"]["model"][
        "storageUri"
    ]
    claim, _, sub_path = storage_uri.removeprefix("pvc://").partition("/")
    assert claim == "teacher-models"
    root = tmp_path_factory.mktemp("teacher-small-predictor")
    mounts = {"/mnt/models": volumes["/models"] / sub_path}
    with run_pod(runtime, root, "teacher-small-config", mounts) as pod:
        yield pod


def torchrun_env(job: dict, rdzv_port: int) -> dict[str, str]:
    """What the Training Operator sets for an elastic PyTorchJob; torchrun reads PET_<OPTION>."""
    policy = job["spec"]["elasticPolicy"]
    return {
        "PET_RDZV_BACKEND": policy["rdzvBackend"],
        "PET_RDZV_ENDPOINT": f"127.0.0.1:{rdzv_port}",  # the operator's <job>-worker-0:<pytorchjob-port>
        "PET_RDZV_ID": job["metadata"]["name"],
        "PET_NNODES": f"{policy['minReplicas']}:{policy['maxReplicas']}",
        "PET_NPROC_PER_NODE": str(policy["nProcPerNode"]),
        "PET_MAX_RESTARTS": str(policy["maxRestarts"]),
        "OMP_NUM_THREADS": "1",
    }


def run_job(job: dict, pod: Pod, volumes: dict[str, Path]) -> list[subprocess.CompletedProcess[str]]:
    """Every worker pod of the job at once (each one torchrun), as the operator starts them."""
    spec = job["spec"]["pytorchReplicaSpecs"]["Worker"]
    (container_spec,) = spec["template"]["spec"]["containers"]
    service = f"teacher-server.{NAMESPACE}.{CLUSTER_DOMAIN}"
    container = Container(
        paths={**volumes, "/home/app": volumes["/outputs"].parent},
        port=pod.container.port,
        host_names=(service,),
    )
    argv = container.argv(image_argv(container_spec))
    # The tiny teacher has 2 layers: the one flag changed for this machine, as COMPOSE_ENV does for compose.
    argv[argv.index("--student_num_layers") + 1] = "1"
    argv += ["--max_steps", "2", "--per_device_train_batch_size", "2", "--disable_tqdm"]
    image = target_instructions(
        parse_dockerfile(DOCKERFILE), IMAGES[container_spec["image"].rsplit(":", 1)[0]]
    )
    env = container.env(
        image_env(image), resolve_env(container_spec, SECRETS), torchrun_env(job, free_port())
    )
    workers = [
        subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(spec["replicas"])
    ]
    results = []
    for process in workers:
        out, err = process.communicate(timeout=240)
        results.append(subprocess.CompletedProcess(argv, process.returncode, out, err))
    return results


@pytest.mark.slow
def test_pytorchjob_distils_against_the_service_and_resumes(plain_pod: Pod, volumes: dict[str, Path]) -> None:
    job = find(documents(), "PyTorchJob", "distill-sst2")[0]
    first = run_job(job, plain_pod, volumes)
    assert all(r.returncode == 0 for r in first), "\n".join(r.stderr[-3000:] for r in first)
    output_dir = volumes["/outputs"] / "distill-sst2"
    results = json.loads((output_dir / "results.json").read_text())
    assert results["world_size"] == 2 and results["global_step"] == 2
    assert results["flops"]["teacher_flops_spent"] > 0, "the job must have been answered by the service"

    restarted = run_job(job, plain_pod, volumes)  # a pod restarted after a failure: same command
    assert all(r.returncode == 0 for r in restarted), "\n".join(r.stderr[-3000:] for r in restarted)
    assert any(f"Resuming from {output_dir / 'checkpoint-2'}" in r.stderr for r in restarted)
    assert json.loads((output_dir / "results.json").read_text())["flops"] == results["flops"]


@pytest.mark.slow
def test_plain_pod_serves_with_the_secret_and_exports_metrics(plain_pod: Pod) -> None:
    base = f"http://127.0.0.1:{plain_pod.container.port}"
    assert (
        httpx.get(f"{base}/v2/models/large/ready").status_code == 401
    )  # the key from the Secret is required
    assert (
        httpx.get(f"{base}/v2/models/large/ready", headers={"Authorization": f"Bearer {API_KEY}"}).status_code
        == 200
    )
    metrics = httpx.get(f"{base}/metrics").text  # ServiceMonitor path; the HPA's metric is among them
    assert "teacher_queue_depth" in metrics


# -- the trainer's client against a stand-in for KServe's ingress -------------------------------------


class Ingress(ThreadingHTTPServer):
    """KServe's ingress in miniature: routes by Host header, 404 for an unknown host; ``script``
    holds statuses (with Retry-After) to answer instead of the backend, ``ready`` False answers
    503 as the gateway does while an InferenceService has no ready pod."""

    def __init__(self, routes: dict[str, int]):
        super().__init__(("127.0.0.1", 0), IngressHandler)
        self.routes = routes
        self.script: list[tuple[int, str | None]] = []
        self.ready = True
        self.seen: list[tuple[str, str, str, int]] = []  # (host, method, path, status)
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class IngressHandler(BaseHTTPRequestHandler):
    server: Ingress
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.route()

    def do_POST(self) -> None:
        self.route()

    def route(self) -> None:
        host = (self.headers.get("Host") or "").split(":")[0]
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with self.server.lock:
            scripted = self.server.script.pop(0) if self.server.script and "/infer" in self.path else None
        if host not in self.server.routes:
            self.answer(host, 404, b"")  # Istio: no route for this host
        elif not self.server.ready:
            self.answer(host, 503, b"no healthy upstream")
        elif scripted is not None:
            status, retry_after = scripted
            self.answer(
                host, status, b'{"error": "scripted"}', {"Retry-After": retry_after} if retry_after else {}
            )
        else:
            backend = http.client.HTTPConnection("127.0.0.1", self.server.routes[host], timeout=30)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
            backend.request(self.command, self.path, body=body, headers=headers)
            response = backend.getresponse()
            forwarded = {
                k: v
                for k, v in response.getheaders()
                if k.lower() in ("content-type", "inference-header-content-length")
            }
            self.answer(host, response.status, response.read(), forwarded)
            backend.close()

    def answer(self, host: str, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        with self.server.lock:
            self.server.seen.append((host, self.command, self.path.split("?")[0], status))
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


EXTERNAL_HOST = f"teacher-small.{NAMESPACE}.example.com"  # the InferenceService's status.url host
INTERNAL_HOST = f"teacher-small-predictor.{NAMESPACE}.{CLUSTER_DOMAIN}"


@pytest.fixture
def ingress(kserve_pod: Pod) -> Iterator[Ingress]:
    server = Ingress({EXTERNAL_HOST: kserve_pod.container.port, INTERNAL_HOST: kserve_pod.container.port})
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def kserve_client(ingress: Ingress, host: str, **options: Any) -> Any:
    from student_trainer.teachers.client import make_teacher_client

    return make_teacher_client(f"{ingress.url}#small@{host}", name="small", api_key=API_KEY, **options)


async def ask(client: Any, ready_timeout_s: float = 10.0) -> Any:
    import torch

    from shared.teacher_api import TeacherQuery

    try:
        info = await client.start(ready_timeout_s)
        query = TeacherQuery(
            input_ids=torch.tensor([[2, 10, 11, 3], [2, 12, 3, 0]]),  # within the tiny vocabulary
            attention_mask=torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
            want_logits=True,
            use_cache=False,  # every test's answer is computed by the teacher behind the ingress
        )
        return info, await client.infer(query)
    finally:
        await client.aclose()


@pytest.mark.slow
@pytest.mark.parametrize("host", [EXTERNAL_HOST, INTERNAL_HOST])
def test_client_reaches_the_predictor_by_host_header(ingress: Ingress, host: str) -> None:
    info, answer = asyncio.run(ask(kserve_client(ingress, host)))
    assert answer.logits is not None and answer.logits.shape == (2, 2)
    assert answer.teacher_flops > 0
    assert {seen[0] for seen in ingress.seen} == {host}
    assert (host, "POST", "/v2/models/small/infer", 200) in ingress.seen
    assert info.num_layers >= 1


@pytest.mark.slow
def test_client_with_a_wrong_host_is_told_so(ingress: Ingress) -> None:
    from student_trainer.teachers.client import TeacherRequestError, TeacherUnavailableError

    with pytest.raises((TeacherRequestError, TeacherUnavailableError)) as caught:
        asyncio.run(ask(kserve_client(ingress, f"teacher-smal.{NAMESPACE}.example.com"), ready_timeout_s=0.5))
    assert "404" in str(caught.value)
    assert all(status == 404 for *_, status in ingress.seen)


@pytest.mark.slow
def test_client_waits_out_429_and_503_from_the_ingress(ingress: Ingress) -> None:
    ingress.script = [(429, "0.2"), (503, None), (429, "0")]
    started = time.monotonic()
    _, answer = asyncio.run(ask(kserve_client(ingress, EXTERNAL_HOST, backoff_base_s=0.01, cooldown_s=0.01)))
    assert answer.logits is not None
    assert time.monotonic() - started >= 0.2, "the 429's Retry-After must be respected"
    infers = [status for _, method, path, status in ingress.seen if path.endswith("/infer")]
    assert infers == [429, 503, 429, 200]
    probes = [s for _, method, path, s in ingress.seen if path == "/v2/health/ready"]
    assert len(probes) >= 2, "after the 503 the client health-probes the predictor before retrying"


@pytest.mark.slow
def test_client_gives_up_after_its_retry_budget(ingress: Ingress) -> None:
    from student_trainer.teachers.client import TeacherUnavailableError

    ingress.script = [(503, "0")] * 10
    client = kserve_client(ingress, EXTERNAL_HOST, max_retries=2, backoff_base_s=0.01, cooldown_s=0.01)
    with pytest.raises(TeacherUnavailableError, match="after 3 attempts; last error: .*HTTP 503"):
        asyncio.run(ask(client))
    assert len(ingress.script) == 7


@pytest.mark.slow
def test_client_waits_until_the_predictor_is_ready(ingress: Ingress) -> None:
    from student_trainer.teachers.client import TeacherUnavailableError

    ingress.ready = False
    with pytest.raises(TeacherUnavailableError, match="not ready after 0.5s"):
        asyncio.run(ask(kserve_client(ingress, EXTERNAL_HOST), ready_timeout_s=0.5))

    timer = threading.Timer(0.6, lambda: setattr(ingress, "ready", True))  # the first pod turns ready
    timer.start()
    try:
        _, answer = asyncio.run(ask(kserve_client(ingress, EXTERNAL_HOST), ready_timeout_s=20))
    finally:
        timer.cancel()
    assert answer.logits is not None
    health = [status for _, _, path, status in ingress.seen if path == "/v2/health/ready"]
    assert 503 in health and health[-1] == 200


def test_a_host_that_cannot_be_a_header_is_refused() -> None:
    from shared.errors import UserError
    from student_trainer.teachers.client import make_teacher_client

    with pytest.raises(UserError, match="is not a host name"):
        make_teacher_client("http://10.0.0.1:80#small@http://teacher-small", name="small")


if __name__ == "__main__":  # python -m tests.test_kubernetes: the static checks alone, one line per problem
    import sys

    problems = all_errors(list(documents()))
    print(
        "\n".join(problems)
        or f"{len(documents())} manifests in {len(MANIFESTS)} files: schemas and cross-checks pass"
    )
    sys.exit(1 if problems else 0)


# -- the experiment grid as an Indexed Job -------------------------------------------------------------


def embedded_grid(docs: tuple[dict, ...]) -> dict:
    return yaml.safe_load(find(docs, "ConfigMap", "experiment-grid")[0]["data"]["grid.yaml"])


def test_grid_job_runs_the_repository_grid() -> None:
    """The embedded grid is experiments/single_teacher.yaml's paper profile, but for where the data and
    the pretrained model are mounted: a change to the one fails here until the other follows."""
    from student_trainer.experiments.config import load_experiment, parse_config

    embedded = parse_config(embedded_grid(documents()))
    ours = load_experiment(REPO / "experiments" / "single_teacher.yaml", profile="paper")

    def unmounted(config: Any) -> Any:
        tasks = {t: {**d, "data_dir": Path(d["data_dir"]).name} for t, d in config.tasks.items()}
        teachers = {r: dataclasses.replace(t, model=Path(t.model).name) for r, t in config.teachers.items()}
        student = dataclasses.replace(config.student, model=Path(config.student.model).name)
        return dataclasses.replace(config, tasks=tasks, teachers=teachers, student=student, profile=None)

    assert unmounted(embedded) == unmounted(ours)
    assert len(embedded.runs()) == 96


def tiny_grid(grid: dict) -> dict:
    """The embedded grid cut to three short runs on one task, on the CPU: its shape, not its size."""
    first, second, sweep = grid["methods"][:3]
    return {
        **grid,
        "tasks": {"sst2": {"data_dir": "/data/sst2"}},
        "seeds": [1],
        "teachers": {
            "large": {**grid["teachers"]["large"], "max_steps": 2, "per_device_train_batch_size": 4}
        },
        "student": {**grid["student"], "num_layers": 1},
        "distill": {
            **grid["distill"],
            "max_steps": 2,
            "per_device_train_batch_size": 4,
            "max_seq_length": 16,
            "save_steps": 1,
            "logging_steps": 1,
        },  # fmt: skip
        "server": {**grid["server"], "device": "cpu"},
        "methods": [
            first,
            second,
            {**sweep, "sweep": {"selection_ratio": [0.5], "data_selection": ["entropy"]}},
        ],
        "tables": [
            {"title": "tiny", "methods": ["no-kd", "vanilla-kd", "entropy-r0.5"], "baselines": ["vanilla-kd"]}
        ],
        "plots": [],
    }


def run_grid_job(
    job: dict, container: Container, indexes: list[dict[str, str]]
) -> list[subprocess.CompletedProcess]:
    """Every index of the job at once, as the Job controller starts them (parallelism >= completions)."""
    (spec,) = job["spec"]["template"]["spec"]["containers"]
    image = target_instructions(parse_dockerfile(DOCKERFILE), IMAGES[spec["image"].rsplit(":", 1)[0]])
    env = container.env(image_env(image), {"OMP_NUM_THREADS": "1"})
    tasks = [
        subprocess.Popen(
            container.argv(expand(image_argv(spec), spec, downward)),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for downward in indexes
    ]
    return [subprocess.CompletedProcess(t.args, t.wait(timeout=400), t.communicate()[0], "") for t in tasks]


@pytest.mark.slow
def test_grid_job_splits_the_grid_and_reports(tiny_teachers: dict[str, Path], tmp_path: Path) -> None:
    docs = documents()
    job, report = find(docs, "Job", GRID_JOB)[0], find(docs, "Job", f"{GRID_JOB}-report")[0]
    config_dir, models = tmp_path / "config", tmp_path / "models"
    config_dir.mkdir()
    models.mkdir()
    (models / "bert-base-uncased").symlink_to(tiny_teachers["large"])
    write_tiny_sst2(tmp_path / "data" / "sst2")
    outputs = tmp_path / "outputs"
    grid = yaml.safe_dump(tiny_grid(embedded_grid(docs)))
    for inside, stand_in in {"/data": tmp_path / "data", "/models": models}.items():
        grid = grid.replace(f"{inside}/", f"{stand_in}/")
    (config_dir / "grid.yaml").write_text(grid)
    container = Container(
        paths={"/etc/experiment": config_dir, "/models": models, "/data": tmp_path / "data",
               "/outputs": outputs, "/home/app": tmp_path},
        port=free_port(),
    )  # fmt: skip

    tasks = run_grid_job(job, container, completion_indexes(job))
    assert [t.returncode for t in tasks] == [0] * 8, "\n".join(t.stdout[-2000:] for t in tasks)
    assert [t.stdout.count("[experiment] run ") for t in tasks] == [1, 1, 1, 0, 0, 0, 0, 0]
    results = outputs / "results" / "default" / "single_teacher"
    assert len(list((results / "runs").rglob("results.json"))) == 3

    (done,) = run_grid_job(report, container, [{}])
    assert done.returncode == 0, done.stdout
    assert "vanilla-kd" in (results / "report.md").read_text()
    again = run_grid_job(job, container, [{"JOB_COMPLETION_INDEX": "0"}])[0]  # a retried index
    assert again.returncode == 0 and "0 to go" in again.stdout, again.stdout
