"""The OpenAPI document is one tools can use: every $ref resolves, and a bounded schemathesis run
(valid and invalid requests generated from the document, /infer included) finds no 5xx and no
response that breaks the document (status, media type, headers, schema)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from teacher_server.config import ServerConfig
from tests.test_server_http import LiveServer

CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,"
    "response_headers_conformance,response_schema_conformance"
)


@pytest.fixture(scope="module")
def server(tiny_teachers):
    config = ServerConfig(
        teachers=[{"name": "small", "path": str(tiny_teachers["small"]), "max_queue_delay_ms": 0}],
        max_body_bytes=64_000,
    )
    with LiveServer(config) as live:
        yield live


def test_every_ref_resolves_and_routes_document_their_media_types(server):
    doc = httpx.get(f"{server.url}/openapi.json", trust_env=False).json()
    for ref in set(re.findall(r'"\$ref": "([^"]+)"', json.dumps(doc))):
        node = doc
        assert ref.startswith("#/"), ref
        for part in ref[2:].split("/"):
            assert part in node, f"{ref} does not resolve"
            node = node[part]
    paths = doc["paths"]
    assert list(paths["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    infer = paths["/v2/models/{name}/infer"]["post"]
    assert {"401", "404", "413", "422", "429", "503"} <= set(infer["responses"])
    for path, operations in paths.items():  # what the connection itself answers, on any path
        for operation in operations.values():
            assert {"400", "408", "431"} <= set(operation["responses"]), path
    assert set(infer["responses"]["200"]["content"]) == {"application/json", "application/octet-stream"}
    assert any(p["name"] == "Inference-Header-Content-Length" for p in infer["parameters"])
    assert {"name": "name", "in": "path"}.items() <= infer["parameters"][0].items()
    assert infer["parameters"][0]["schema"]["enum"] == ["small"]


@pytest.mark.timeout(600)
def test_schemathesis_finds_no_server_errors_and_no_schema_violations(server, tmp_path: Path):
    st = shutil.which("st", path=str(Path(sys.executable).parent))
    if st is None:
        pytest.skip("schemathesis is not installed (pip install -e '.[dev]')")
    command = [
        st, "run", f"{server.url}/openapi.json", "--checks", CHECKS, "--max-examples", "40",
        "--phases", "examples,coverage,fuzzing", "--generation-deterministic", "--request-timeout", "30",
        "--no-color",
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=540, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert server.metric("teacher_requests_total", model="small", code="200") > 0  # /infer reached, answered
