"""The OpenAPI document is one tools can use: every $ref resolves, and a bounded schemathesis run
(valid and invalid requests generated from the document, /infer included) finds no 5xx and no
response that breaks the document (status, media type, headers, schema). The document's infer
body is the generic v2 one, so what it generates is nearly always refused: a second run sends
bodies generated valid for the teacher's declared inputs, and each must be answered 200."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from teacher_server.config import ServerConfig
from tests.test_server_http import LiveServer

DOCUMENT_CHECKS = [  # the run's checks (no auth checks: this server has no key)
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
CHECKS = ",".join(check.__name__ for check in DOCUMENT_CHECKS)


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


OUTPUTS = ("logits", "probs", "hidden_cls", "hidden_states")


@st.composite
def token_inputs(draw: st.DrawFn, vocab_size: int, rows: int) -> list[dict]:
    """input_ids [rows, length] within the vocabulary, with a right-padded mask and token types
    (INT32 or INT64, data flat or nested as the shape)."""
    length = draw(st.integers(1, 12))
    ids = draw(
        st.lists(
            st.lists(st.integers(0, vocab_size - 1), min_size=length, max_size=length),
            min_size=rows,
            max_size=rows,
        )
    )
    real = draw(st.lists(st.integers(1, length), min_size=rows, max_size=rows))
    mask = [[int(j < n) for j in range(length)] for n in real]
    types = [[draw(st.integers(0, 1)) if j < n else 0 for j in range(length)] for n in real]
    tensors = [("input_ids", ids)] + draw(
        st.sampled_from(
            [[], [("attention_mask", mask)], [("attention_mask", mask), ("token_type_ids", types)]]
        )
    )
    datatype = draw(st.sampled_from(["INT32", "INT64"]))
    nested = draw(st.booleans())
    return [
        {
            "name": name,
            "shape": [rows, length],
            "datatype": datatype,
            "data": value if nested else sum(value, []),
        }
        for name, value in tensors
    ]


@st.composite
def valid_infer_bodies(draw: st.DrawFn, meta: dict) -> dict:
    """An infer request the teacher must answer: inputs as its metadata declares them, outputs and
    parameters within their documented ranges."""
    params, rows = meta["parameters"], draw(st.integers(1, 4))
    if draw(st.booleans()):
        inputs = token_inputs(params["vocab_size"], rows)
    else:
        texts = st.lists(st.text(max_size=40), min_size=rows, max_size=rows)
        names = draw(st.sampled_from([["text"], ["text", "text_pair"]]))
        inputs = st.tuples(*(texts for _ in names)).map(
            lambda values: [
                {"name": n, "shape": [rows], "datatype": "BYTES", "data": v}
                for n, v in zip(names, values, strict=True)
            ]
        )
    layers = st.lists(st.integers(0, params["num_layers"]), min_size=1, max_size=3, unique=True)
    outputs = []
    for name in draw(st.lists(st.sampled_from(OUTPUTS), max_size=len(OUTPUTS), unique=True)):
        entry: dict = {}
        if draw(st.booleans()):
            entry["binary_data"] = draw(st.booleans())
        if name.startswith("hidden") and draw(st.booleans()):
            chosen = draw(layers)
            entry["layers"] = draw(st.sampled_from([chosen, ",".join(map(str, chosen))]))
        outputs.append({"name": name, **({"parameters": entry} if entry else {})})
    parameters = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "output_dtype": st.sampled_from(["FP32", "FP16", "BF16"]),
                "temperature": st.floats(0.01, 100),
                "cache": st.booleans(),
                "timeout_ms": st.integers(5_000, 60_000),
            },
        )
    )
    body = {"inputs": draw(inputs), **({"outputs": outputs} if outputs or draw(st.booleans()) else {})}
    return {**body, **({"parameters": parameters} if parameters else {})}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_schemathesis_valid_infer_bodies_are_answered_200_within_the_document(server):
    """Each generated body is sent by schemathesis and its answer checked against the document
    (no 5xx, documented status, media type, headers and schema), and must be a 200: bounded to
    150 bodies, derandomized, no deadline per body."""
    meta = httpx.get(f"{server.url}/v2/models/small", trust_env=False).json()
    operation = schemathesis.openapi.from_url(f"{server.url}/openapi.json")["/v2/models/{name}/infer"]["POST"]
    statuses: Counter[int] = Counter()

    @settings(
        max_examples=150,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(body=valid_infer_bodies(meta))
    def answered(body: dict) -> None:
        case = operation.Case(path_parameters={"name": "small"}, body=body, media_type="application/json")
        response = case.call_and_validate(base_url=server.url, checks=DOCUMENT_CHECKS)
        statuses[response.status_code] += 1
        assert response.status_code == 200, (body, response.text[:500])

    answered()
    print(f"schemathesis, valid infer bodies: {sum(statuses.values())} sent, statuses {dict(statuses)}")
    assert statuses[200] >= 100
