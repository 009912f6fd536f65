"""The real service (uvicorn on a loopback port) against in-process transformers, over v2 REST."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton
import uvicorn
from transformers import AutoTokenizer, BertForSequenceClassification

from shared import codec
from shared.codec import HEADER_LENGTH, build_request_body, parse_response_body
from shared.flops import encoder_forward_flops
from teacher_server import v2_adapter
from teacher_server.app import create_app
from teacher_server.config import ServerConfig
from teacher_server.http_protocol import bounded_protocol
from teacher_server.routes import v2 as v2_routes

TEXTS = ["a good movie", "the plot was boring and the acting awful , really bad", "fun !"]
PAIRS = ["i like it", "not great", "the best film of the year"]


class LiveServer:
    """``create_app(config)`` served by uvicorn in a thread on a free 127.0.0.1 port, with the
    CLI's connection limits (:mod:`teacher_server.http_protocol`)."""

    def __init__(self, config: ServerConfig, *, wait_ready: bool = True, **app_options):
        self.wait_ready = wait_ready
        self.app = create_app(config, **app_options)
        self.server = uvicorn.Server(
            uvicorn.Config(
                self.app, host="127.0.0.1", port=0, log_level="warning", http=bounded_protocol(config)
            )
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        while (
            self.wait_ready and httpx.get(f"{self.url}/v2/health/ready", trust_env=False).status_code != 200
        ):
            assert time.monotonic() < deadline, "teachers did not become ready"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive()

    def metric(self, name: str, **labels) -> float:
        return self.app.state.service.metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture(scope="module")
def server(tiny_teachers):
    config = ServerConfig(
        teachers=[
            {
                "name": "small",
                "path": str(tiny_teachers["small"]),
                "max_queue_delay_ms": 0,
                "pass_overhead_tokens": 10_000,
            },
            {
                "name": "large",
                "path": str(tiny_teachers["large"]),
                "max_queue_delay_ms": 0,
                "max_batch_size": 8,
            },
            # the same teacher, waiting long enough for company: batching, 429, deadlines
            {
                "name": "patient",
                "path": str(tiny_teachers["large"]),
                "max_queue_delay_ms": 300,
                "pass_overhead_tokens": 10_000,
            },
            {
                "name": "tiny-queue",
                "path": str(tiny_teachers["large"]),
                "max_queue_delay_ms": 300,
                "max_queue_size": 1,
            },
        ],
        max_body_bytes=64_000,
    )
    with LiveServer(config) as live:
        yield live


@pytest.fixture(scope="module")
def references(tiny_teachers):
    """Plain transformers, loaded independently of the service."""
    return {
        name: (
            BertForSequenceClassification.from_pretrained(path).eval(),
            AutoTokenizer.from_pretrained(path),
        )
        for name, path in tiny_teachers.items()
    }


def reference(references, name, texts, pairs=None):
    model, tokenizer = references[name]
    enc = tokenizer(texts, pairs, padding=True, return_tensors="pt")
    with torch.inference_mode():
        out = model(**enc, output_hidden_states=True)
    return enc, out.logits, out.hidden_states


def infer(url, model, inputs, *, outputs=None, parameters=None, binary=True, **http):
    body, headers = build_request_body(
        inputs, outputs=outputs, parameters=parameters, binary_inputs=binary, binary_outputs=binary
    )
    return httpx.post(
        f"{url}/v2/models/{model}/infer", content=body, headers=headers, trust_env=False, **http
    )


def decode(response):
    assert response.status_code == 200, response.text
    return parse_response_body(response.content, response.headers.get(HEADER_LENGTH))


# --- correct numbers ------------------------------------------------------------------------


def test_tokenizing_and_large_bodies_run_off_the_event_loop_small_ones_on_it(server, monkeypatch):
    """Heavy per-request work must not run on the event loop: a large request would stall every
    health probe and every other request while it is tokenized (64 texts x 60 KB took 1 s; see
    benchmarks/bench_health.py for the timing). A small body or answer is decoded, tokenized and
    encoded on it, since a thread hop costs more than that work."""
    seen: dict[str, bool] = {}

    def on_loop() -> bool:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return False
        return True

    def spy(name, work):
        def wrapped(*args, **kwargs):
            seen[name] = on_loop()
            return work(*args, **kwargs)

        return wrapped

    engine = server.app.state.service.batchers["small"].engine
    monkeypatch.setattr(engine, "tokenize", spy("tokenize", engine.tokenize))
    monkeypatch.setattr(v2_adapter, "parse_request_body", spy("decode", v2_adapter.parse_request_body))
    monkeypatch.setattr(v2_adapter, "build_response_body", spy("encode", v2_adapter.build_response_body))
    decode(infer(server.url, "small", {"text": [t + " small" for t in TEXTS]}))
    assert seen == {"decode": True, "tokenize": True, "encode": True}
    monkeypatch.setattr(v2_routes, "INLINE_BYTES", 2048)  # the test server refuses bodies over 64 KB
    large = [t + " and" * 500 for t in TEXTS]
    assert len(json.dumps(large)) > v2_routes.INLINE_BYTES
    layers = {"hidden_states": {"layers": "0,1,2"}}  # all-token states: a large answer too
    decode(infer(server.url, "small", {"text": large}, outputs=layers, parameters={"cache": False}))
    assert seen == {"decode": False, "tokenize": False, "encode": False}


def test_a_small_request_never_waits_on_the_event_loop_for_a_busy_tokenizer(server, monkeypatch):
    """While the tokenizer is held (a large request being tokenized), a small text request goes to
    the preprocessing thread instead of blocking the loop: health probes keep answering."""
    batcher = server.app.state.service.batchers["small"]
    engine = batcher.engine
    tokenized_on_loop: list[bool] = []

    def spy(*args, **kwargs):
        try:
            asyncio.get_running_loop()
            tokenized_on_loop.append(True)
        except RuntimeError:
            tokenized_on_loop.append(False)
        return tokenize(*args, **kwargs)

    tokenize = engine.tokenize
    monkeypatch.setattr(engine, "tokenize", spy)
    with ThreadPoolExecutor(1) as pool:
        with batcher._tokenizer_lock:  # as if a large request were being tokenized
            pending = pool.submit(infer, server.url, "small", {"text": [t + " waits" for t in TEXTS]})
            time.sleep(0.3)
            assert not pending.done()  # waiting for the tokenizer, off the loop
            probe = httpx.get(f"{server.url}/v2/health/live", trust_env=False, timeout=2)
            assert probe.status_code == 200
        assert decode(pending.result(timeout=10)).outputs["logits"].shape[0] == len(TEXTS)
    assert tokenized_on_loop == [False]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("source", ["text", "input_ids"])
@pytest.mark.parametrize(
    ("outputs", "parameters", "cls_layers"),
    [
        ({"logits": None, "hidden_cls": {"layers": "0,2,4"}}, None, (0, 2, 4)),
        ({"hidden_cls": None}, {"layers": [3]}, (3,)),  # request-level layers, as tritonclient sends
        ({"logits": None, "hidden_cls": None}, None, (0, 1, 2, 3, 4)),  # default: every hidden state
    ],
)
def test_outputs_equal_transformers(server, references, binary, source, outputs, parameters, cls_layers):
    enc, logits, hidden = reference(references, "large", TEXTS, PAIRS)
    if source == "text":
        inputs = {"text": TEXTS, "text_pair": PAIRS}
    else:
        inputs = {
            name: enc[name].to(torch.int32) for name in ("input_ids", "attention_mask", "token_type_ids")
        }
    got = decode(infer(server.url, "large", inputs, outputs=outputs, parameters=parameters, binary=binary))
    assert list(got.outputs) == list(outputs)
    if "logits" in outputs:
        torch.testing.assert_close(got.outputs["logits"], logits, atol=1e-5, rtol=0)
    expected_cls = torch.stack([hidden[layer][:, 0] for layer in cls_layers], dim=1)
    torch.testing.assert_close(got.outputs["hidden_cls"], expected_cls, atol=1e-5, rtol=0)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_hidden_states_probs_and_output_dtypes(server, references, binary):
    enc, logits, hidden = reference(references, "small", TEXTS)
    outputs = {"probs": {"temperature": 2.0}, "hidden_states": {"layers": "1,2"}}
    got = decode(infer(server.url, "small", {"text": TEXTS}, outputs=outputs, binary=binary))
    torch.testing.assert_close(got.outputs["probs"], torch.softmax(logits / 2, -1), atol=1e-5, rtol=0)
    states = got.outputs["hidden_states"]
    real = enc["attention_mask"].bool()
    assert states.shape == (3, 2, enc["input_ids"].shape[1], 32)
    for j, layer in enumerate((1, 2)):
        torch.testing.assert_close(states[:, j][real], hidden[layer][real], atol=1e-5, rtol=0)
        assert states[:, j][~real].abs().sum() == 0
    for dtype, torch_dtype in (("FP16", torch.float16), ("BF16", torch.bfloat16)):
        got = decode(
            infer(
                server.url,
                "small",
                {"text": TEXTS},
                outputs={"logits": None},
                parameters={"output_dtype": dtype},
                binary=binary,
            )
        )
        header = got.header.outputs[0]
        assert header.datatype == dtype
        torch.testing.assert_close(
            got.outputs["logits"].float(), logits.to(torch_dtype).float(), atol=1e-2, rtol=0
        )


def test_response_parameters_count_the_work_and_the_cache(server, references):
    model, tokenizer = references["small"]
    texts = [t + " again" for t in TEXTS]  # not seen by other tests: a cold cache
    first = decode(infer(server.url, "small", {"text": texts}))
    params = first.header.parameters
    lengths = [len(tokenizer(t)["input_ids"]) for t in texts]
    assert params["tokens"] == sum(lengths)
    assert params["padded_tokens"] == sum(lengths)  # one packed pass: the matrices ran on real tokens
    assert params["teacher_flops"] == encoder_forward_flops(
        model.config,
        lengths,
        attention_len=max(lengths),
        first_token_last=True,  # only [CLS] is read
    )
    assert params["cache_hits"] == 0 and params["queue_us"] >= 0 and params["compute_us"] > 0
    again = decode(infer(server.url, "small", {"text": texts}))
    assert again.header.parameters["cache_hits"] == 3 and again.header.parameters["teacher_flops"] == 0
    torch.testing.assert_close(again.outputs["logits"], first.outputs["logits"], atol=0, rtol=0)
    bypass = decode(infer(server.url, "small", {"text": texts}, parameters={"cache": False}))
    assert bypass.header.parameters["cache_hits"] == 0 and bypass.header.parameters["teacher_flops"] > 0
    assert server.metric("teacher_cache_hits_total", model="small") >= 3
    shallow = decode(
        infer(
            server.url,
            "small",
            {"text": texts},
            outputs={"hidden_cls": {"layers": "1"}},
            parameters={"cache": False},
        )
    )
    # early exit: one of two layers, no pooler/classifier
    expected = encoder_forward_flops(
        model.config, lengths, 1, with_head=False, attention_len=max(lengths), first_token_last=True
    )
    assert shallow.header.parameters["teacher_flops"] == expected


# --- protocol surface -----------------------------------------------------------------------


def test_health_metadata_docs_and_metrics(server, tiny_teachers):
    get = lambda path: httpx.get(server.url + path, trust_env=False)  # noqa: E731
    assert get("/v2/health/live").json() == {"live": True}
    assert get("/v2/health/ready").json() == {"ready": True}
    assert get("/v2").json()["extensions"] == ["binary_tensor_data"]
    assert get("/v2/models/large/ready").status_code == 200
    meta = get("/v2/models/large").json()
    assert meta["platform"] == "pytorch_transformers"
    assert {o["name"] for o in meta["outputs"]} == {"logits", "probs", "hidden_cls", "hidden_states"}
    params = meta["parameters"]
    assert (params["num_layers"], params["hidden_size"], params["num_labels"]) == (4, 48, 2)
    assert params["labels"] == ["negative", "positive"] and params["max_seq_length"] == 128
    assert params["flops_per_token"] > 0 and params["vocab_size"] > 100
    assert get("/docs").status_code == 200
    assert "/v2/models/{name}/infer" in get("/openapi.json").json()["paths"]
    decode(infer(server.url, "small", {"text": TEXTS[:1]}))
    metrics = get("/metrics").text
    for name in (
        "teacher_requests_total",
        "teacher_request_seconds_bucket",
        "teacher_batch_size_bucket",
        "teacher_queue_depth",
        "teacher_padding_efficiency_bucket",
        "teacher_flops_total",
        "teacher_cache_hits_total",
        "teacher_cache_misses_total",
        "teacher_rejected_total",
    ):
        assert name in metrics


def test_unmodified_tritonclient_gets_logits_and_hidden_cls(server, references):
    enc, logits, hidden = reference(references, "large", TEXTS)
    client = triton.InferenceServerClient(url=server.url.removeprefix("http://"))
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("large")
        assert client.get_model_metadata("large")["parameters"]["num_layers"] == 4
        for binary in (True, False):
            inputs = []
            for name in ("input_ids", "attention_mask"):
                tensor = triton.InferInput(name, list(enc[name].shape), "INT64")
                tensor.set_data_from_numpy(enc[name].numpy(), binary_data=binary)
                inputs.append(tensor)
            outputs = [triton.InferRequestedOutput(n, binary_data=binary) for n in ("logits", "hidden_cls")]
            result = client.infer("large", inputs, outputs=outputs, parameters={"layers": "1,4"})
            np.testing.assert_allclose(result.as_numpy("logits"), logits.numpy(), atol=1e-5, rtol=0)
            expected = torch.stack([hidden[1][:, 0], hidden[4][:, 0]], dim=1)
            np.testing.assert_allclose(result.as_numpy("hidden_cls"), expected.numpy(), atol=1e-5, rtol=0)
            assert {"teacher_flops", "tokens", "cache_hits"} <= set(result.get_response()["parameters"])
        text = triton.InferInput("text", [len(TEXTS)], "BYTES")
        text.set_data_from_numpy(np.array([t.encode() for t in TEXTS], dtype=object))
        result = client.infer("large", [text])  # no outputs named: logits, all in binary
        np.testing.assert_allclose(result.as_numpy("logits"), logits.numpy(), atol=1e-5, rtol=0)
        with pytest.raises(triton.InferenceServerException, match="unknown output"):
            client.infer("large", [text], outputs=[triton.InferRequestedOutput("attentions")])
    finally:
        client.close()


# --- errors ---------------------------------------------------------------------------------


def ids_input(ids, **extra):
    tensor = torch.tensor(ids)
    return {
        "name": "input_ids",
        "shape": list(tensor.shape),
        "datatype": "INT64",
        "data": tensor.flatten().tolist(),
        **extra,
    }


def body_of(*inputs, outputs=None, parameters=None):
    doc = {"inputs": list(inputs)}
    if outputs is not None:
        doc["outputs"] = outputs
    if parameters is not None:
        doc["parameters"] = parameters
    return json.dumps(doc).encode()


GOOD = ids_input([[2, 10, 3]])
NO_BLOB = body_of(
    {"name": "input_ids", "shape": [1, 3], "datatype": "INT64", "parameters": {"binary_data_size": 24}}
)
ERRORS = {
    "unknown model": ("nobody", body_of(GOOD), {}, 404, "model_name"),
    "not JSON": ("large", b"{not json", {}, 400, "body"),
    "no inputs": ("large", body_of(), {}, 400, "inputs"),
    "typo in a key": ("large", json.dumps({"inputs": [GOOD], "output": []}).encode(), {}, 400, "output"),
    "unknown input": (
        "large",
        body_of(GOOD, {"name": "pixels", "shape": [1], "datatype": "FP32", "data": [1.0]}),
        {},
        400,
        "inputs[1].name",
    ),
    "unknown output": ("large", body_of(GOOD, outputs=[{"name": "attentions"}]), {}, 400, "outputs[0].name"),
    "float token ids": (
        "large",
        body_of({**GOOD, "datatype": "FP32", "data": [2.0, 10.0, 3.0]}),
        {},
        400,
        "inputs[0].datatype",
    ),
    "1-D token ids": ("large", body_of(ids_input([2, 10, 3])), {}, 400, "inputs[0].shape"),
    "data count != shape": ("large", body_of({**GOOD, "shape": [1, 4]}), {}, 400, "inputs[0].data"),
    # was read as the flat [2, 10, 3, 4]: a wrong answer rather than an error
    "ragged data": (
        "large",
        body_of({**GOOD, "shape": [2, 2], "data": [[2, 10, 3], [4]]}),
        {},
        400,
        "inputs[0].data",
    ),
    "over-nested data": ("large", body_of({**GOOD, "data": [[[2], [10], [3]]]}), {}, 400, "inputs[0].data"),
    "text and ids": (
        "large",
        body_of(GOOD, {"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]}),
        {},
        400,
        "inputs[0].name",
    ),
    "bad output_dtype": (
        "large",
        body_of(GOOD, parameters={"output_dtype": "INT8"}),
        {},
        400,
        "parameters.output_dtype",
    ),
    "bad timeout": ("large", body_of(GOOD, parameters={"timeout_ms": -5}), {}, 400, "parameters.timeout_ms"),
    "bad temperature": (
        "large",
        body_of(GOOD, outputs=[{"name": "probs", "parameters": {"temperature": 0}}]),
        {},
        400,
        "outputs[0].parameters.temperature",
    ),
    # numbers beyond float range were an OverflowError (500); a tiny temperature gave NaN probs
    "huge timeout": ("large", body_of(GOOD, parameters={"timeout": 10**399}), {}, 400, "parameters.timeout"),
    "huge timeout_ms": (
        "large",
        body_of(GOOD, parameters={"timeout_ms": 10**399}),
        {},
        400,
        "parameters.timeout_ms",
    ),
    "huge temperature": (
        "large",
        body_of(GOOD, outputs=[{"name": "probs"}], parameters={"temperature": 10**399}),
        {},
        400,
        "parameters.temperature",
    ),
    "tiny temperature": (
        "large",
        body_of(GOOD, outputs=[{"name": "probs", "parameters": {"temperature": 1e-320}}]),
        {},
        400,
        "outputs[0].parameters.temperature",
    ),
    "string temperature": (
        "large",
        body_of(GOOD, outputs=[{"name": "probs"}], parameters={"temperature": "hot"}),
        {},
        400,
        "parameters.temperature",
    ),
    "20,000 layers": (
        "large",
        body_of(GOOD, outputs=[{"name": "hidden_cls", "parameters": {"layers": ",".join(["1"] * 20_000)}}]),
        {},
        422,
        "outputs[0].parameters.layers",
    ),
    "repeated layer": (
        "large",
        body_of(GOOD, outputs=[{"name": "hidden_states"}], parameters={"layers": "1,2,1"}),
        {},
        422,
        "parameters.layers",
    ),
    "bad layers syntax": (
        "large",
        body_of(GOOD, outputs=[{"name": "hidden_cls", "parameters": {"layers": "1;2"}}]),
        {},
        400,
        "outputs[0].parameters.layers",
    ),
    "layer too deep": (
        "large",
        body_of(GOOD, outputs=[{"name": "hidden_cls", "parameters": {"layers": "2,5"}}]),
        {},
        422,
        "outputs[0].parameters.layers",
    ),
    "request layer too deep": (
        "large",
        body_of(GOOD, outputs=[{"name": "hidden_cls"}], parameters={"layers": "9"}),
        {},
        422,
        "parameters.layers",
    ),
    "token id outside vocab": ("large", body_of(ids_input([[2, 10_000, 3]])), {}, 422, "input_ids"),
    "negative token id": ("large", body_of(ids_input([[2, -1, 3]])), {}, 422, "input_ids"),
    "too long": ("large", body_of(ids_input([[2] * 129])), {}, 422, "input_ids"),
    "mask shape mismatch": (
        "large",
        body_of(GOOD, {**ids_input([[1, 1]]), "name": "attention_mask"}),
        {},
        422,
        "attention_mask",
    ),
    "batch too large": ("large", body_of(ids_input([[2, 3]] * 9)), {}, 422, "input_ids"),
    "text batch too large": (
        "large",
        body_of({"name": "text", "shape": [9], "datatype": "BYTES", "data": ["a"] * 9}),
        {},
        422,
        "text",
    ),
    "bad header length": ("large", body_of(GOOD), {HEADER_LENGTH: "x"}, 400, HEADER_LENGTH),
    "binary data missing": (
        "large",
        NO_BLOB,
        {HEADER_LENGTH: str(len(NO_BLOB))},
        400,
        "inputs[0].parameters.binary_data_size",
    ),
    "body too large": ("large", body_of(ids_input([[2, 3] * 64] * 300)), {}, 413, "body"),
}


@pytest.mark.parametrize(
    ("model", "content", "headers", "status", "field"), ERRORS.values(), ids=ERRORS.keys()
)
def test_errors_are_json_naming_the_field(server, model, content, headers, status, field):
    response = httpx.post(
        f"{server.url}/v2/models/{model}/infer", content=content, headers=headers, trust_env=False
    )
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()
    assert error["field"] == field and error["error"]


LONG = "x" * 60_000
ECHOES = {
    "model name": (LONG, body_of(GOOD), {}, 404),
    "header value": ("large", body_of(GOOD), {HEADER_LENGTH: LONG}, 400),
    "input name": ("large", body_of({**GOOD, "name": LONG}), {}, 400),
    "output name": ("large", body_of(GOOD, outputs=[{"name": LONG}]), {}, 400),
    "layers": (
        "large",
        body_of(GOOD, outputs=[{"name": "hidden_cls"}], parameters={"layers": LONG}),
        {},
        400,
    ),
    "key": ("large", json.dumps({"inputs": [GOOD], LONG: 1}).encode(), {}, 400),
    "shape": ("large", body_of({**GOOD, "shape": [1] * 20_000}), {}, 400),
}


@pytest.mark.parametrize(("model", "content", "headers", "status"), ECHOES.values(), ids=ECHOES.keys())
def test_errors_echo_client_input_cut_short(server, model, content, headers, status):
    response = httpx.post(
        f"{server.url}/v2/models/{model}/infer", content=content, headers=headers, trust_env=False
    )
    assert response.status_code == status, response.text[:300]
    assert len(response.content) < 500, response.text[:300]  # the 60 KB input is not sent back
    assert "characters" in response.text or "…" in response.text  # it is quoted, cut, and says so


def test_refused_requests_are_counted_with_bounded_labels(server):
    def count(model, code):
        return server.metric("teacher_requests_total", model=model, code=code)

    def post(model, content):
        return httpx.post(f"{server.url}/v2/models/{model}/infer", content=content, trust_env=False)

    before = count("", "404"), count("large", "413")
    for name in ("nobody-1", "nobody-2"):  # not teachers: counted as model "", not one label each
        assert post(name, body_of(GOOD)).status_code == 404
    assert post("large", body_of(ids_input([[2, 3] * 64] * 300))).status_code == 413
    assert (count("", "404"), count("large", "413")) == (before[0] + 2, before[1] + 1)
    assert "nobody" not in httpx.get(f"{server.url}/metrics", trust_env=False).text


def test_client_leaving_mid_upload_is_counted_499_not_an_internal_error(server, caplog):
    before = server.metric("teacher_requests_total", model="small", code="499")
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST /v2/models/small/infer HTTP/1.1\r\nHost: t\r\nContent-Length: 10000\r\n\r\n{")
        time.sleep(0.1)
    deadline = time.monotonic() + 5
    while server.metric("teacher_requests_total", model="small", code="499") == before:
        assert time.monotonic() < deadline, "the hang-up was not counted"
        time.sleep(0.02)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_unknown_routes_and_methods_answer_json(server):
    assert httpx.get(f"{server.url}/v3", trust_env=False).json()["error"]
    response = httpx.get(f"{server.url}/v2/models/large/infer", trust_env=False)
    assert response.status_code == 405 and response.json()["error"]
    assert httpx.get(f"{server.url}/v2/models/nobody", trust_env=False).json()["field"] == "model_name"


# --- scheduling -----------------------------------------------------------------------------


def test_concurrent_requests_of_different_lengths_are_batched_together(server, references):
    texts = [TEXTS[i % 3] + " ," * i for i in range(6)]  # six lengths
    passes_before = server.metric("teacher_batch_size_count", model="patient")

    async def scenario():
        async with httpx.AsyncClient(trust_env=False) as client:
            requests = []
            for text in texts:
                body, headers = build_request_body(
                    {"text": [text]}, outputs={"logits": None, "hidden_cls": None}
                )
                requests.append(
                    client.post(f"{server.url}/v2/models/patient/infer", content=body, headers=headers)
                )
            return await asyncio.gather(*requests)

    responses = asyncio.run(scenario())
    passes = server.metric("teacher_batch_size_count", model="patient") - passes_before
    rows = server.metric("teacher_batch_size_sum", model="patient")
    assert passes < len(texts) and rows / server.metric("teacher_batch_size_count", model="patient") > 1
    assert server.metric("teacher_batch_requests_sum", model="patient") > passes
    for text, response in zip(texts, responses, strict=True):
        _, logits, hidden = reference(references, "large", [text])
        got = decode(response)
        torch.testing.assert_close(got.outputs["logits"], logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(got.outputs["hidden_cls"][:, 4], hidden[4][:, 0], atol=1e-5, rtol=0)


def test_saturated_queue_answers_429_with_retry_after(server):
    async def scenario():
        async with httpx.AsyncClient(trust_env=False) as client:
            body, headers = build_request_body({"text": ["queued first"]}, parameters={"cache": False})
            url = f"{server.url}/v2/models/tiny-queue/infer"
            first = asyncio.ensure_future(client.post(url, content=body, headers=headers))
            while server.metric("teacher_queue_depth", model="tiny-queue") < 1:
                await asyncio.sleep(0.01)
            second = await client.post(url, content=body, headers=headers)
            return await first, second

    first, second = asyncio.run(scenario())
    assert first.status_code == 200
    assert second.status_code == 429 and int(second.headers["retry-after"]) >= 1
    assert second.json()["error"].startswith("queue is full")
    assert server.metric("teacher_rejected_total", model="tiny-queue", reason="queue_full") == 1


def test_deadline_expiry_answers_504_without_computing(server):
    tokens = server.metric("teacher_tokens_total", model="patient")
    response = infer(server.url, "patient", {"text": ["too slow for me"]}, parameters={"timeout_ms": 50})
    assert response.status_code == 504 and response.json()["field"] == "parameters.timeout_ms"
    time.sleep(0.4)  # past the queue delay
    assert server.metric("teacher_tokens_total", model="patient") == tokens


def test_disconnected_client_is_dropped_before_compute(server):
    tokens = server.metric("teacher_tokens_total", model="patient")
    with pytest.raises(httpx.ReadTimeout):
        infer(server.url, "patient", {"text": ["nobody waits for me"]}, timeout=0.1)
    time.sleep(0.5)
    assert server.metric("teacher_rejected_total", model="patient", reason="cancelled") == 1
    assert server.metric("teacher_tokens_total", model="patient") == tokens


# --- auth -----------------------------------------------------------------------------------


def test_api_key_is_required_except_for_probes(tiny_teachers):
    config = ServerConfig(teachers=[{"name": "small", "path": str(tiny_teachers["small"])}])
    with LiveServer(config, api_key="s3cret-key") as live:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret-key"}):
            for method, path in (
                ("GET", "/v2"),
                ("GET", "/v2/models/small"),
                ("POST", "/v2/models/small/infer"),
            ):
                response = httpx.request(
                    method, live.url + path, headers=headers, content=body_of(GOOD), trust_env=False
                )
                assert response.status_code == 401 and response.json()["field"] == "Authorization"
                assert response.headers["www-authenticate"] == "Bearer"
        assert live.metric("teacher_requests_total", model="small", code="401") == 3  # refused: counted
        good = {"Authorization": "Bearer s3cret-key"}
        assert httpx.get(f"{live.url}/v2/models/small", headers=good, trust_env=False).status_code == 200
        response = httpx.post(
            f"{live.url}/v2/models/small/infer", headers=good, content=body_of(GOOD), trust_env=False
        )
        assert response.status_code == 200 and response.json()["outputs"][0]["name"] == "logits"
        assert httpx.get(f"{live.url}/v2/health/ready", trust_env=False).status_code == 200
        for path in DOCS_AND_METRICS:  # by default (see --key_for_docs_and_metrics), open to all
            assert httpx.get(live.url + path, trust_env=False).status_code == 200, path


DOCS_AND_METRICS = ("/openapi.json", "/docs", "/redoc", "/metrics")


def test_docs_and_metrics_can_require_the_key_too(tiny_teachers):
    config = ServerConfig(teachers=[{"name": "small", "path": str(tiny_teachers["small"])}])
    with LiveServer(config, api_key="s3cret-key", key_for_docs_and_metrics=True) as live:
        good = {"Authorization": "Bearer s3cret-key"}
        for path in DOCS_AND_METRICS:
            refused = httpx.get(live.url + path, headers={"Authorization": "Bearer wrong"}, trust_env=False)
            assert refused.status_code == 401 and refused.json()["field"] == "Authorization", path
            assert "small" not in refused.text
            assert httpx.get(live.url + path, headers=good, trust_env=False).status_code == 200, path
        doc = httpx.get(f"{live.url}/openapi.json", headers=good, trust_env=False).json()
        assert "401" in doc["paths"]["/metrics"]["get"]["responses"]
        assert not {"/docs", "/redoc", "/openapi.json"} & set(doc["paths"])
        assert httpx.get(f"{live.url}/v2/health/ready", trust_env=False).status_code == 200  # probes: no key


def test_not_ready_until_every_teacher_loaded(tmp_path, tiny_teachers):
    (tmp_path / "empty").mkdir()
    config = ServerConfig(
        teachers=[
            {"name": "broken", "path": str(tmp_path / "empty")},
            {"name": "small", "path": str(tiny_teachers["small"])},
        ]
    )
    failures: list[str] = []
    with LiveServer(config, wait_ready=False, on_load_failure=failures.append) as live:
        deadline = time.monotonic() + 30
        while not failures:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        get = lambda path: httpx.get(live.url + path, trust_env=False)  # noqa: E731
        assert get("/v2/health/live").status_code == 200
        assert get("/v2/health/ready").status_code == 503 and get("/v2/health/ready").json() == {
            "ready": False
        }
        assert get("/v2/models/small/ready").status_code == 503
        response = httpx.post(f"{live.url}/v2/models/small/infer", content=body_of(GOOD), trust_env=False)
        assert response.status_code == 503 and response.json()["field"] == "model_name"
        assert response.headers["retry-after"] == "1"
        assert live.metric("teacher_requests_total", model="small", code="503") == 1
    assert failures[0].startswith("teacher 'broken' failed to load")


# --- huge inputs ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def roomy_server(tiny_teachers):
    """A teacher taking bodies of many megabytes, as the default 64 MiB limit does, and answering
    with at most 16 KB of outputs."""
    teacher = {"name": "small", "path": str(tiny_teachers["small"]), "max_queue_delay_ms": 0}
    config = ServerConfig(teachers=[{**teacher, "max_output_mb": 1 / 64}], max_body_bytes=32 * 2**20)
    with LiveServer(config) as live:
        yield live


def test_a_text_of_megabytes_is_cut_not_tokenized_whole(roomy_server, references):
    huge = "good movie " * 600_000  # 6.6 MB: tokenized whole, it held the event loop for seconds
    started = time.perf_counter()
    response = infer(roomy_server.url, "small", {"text": [huge]}, parameters={"cache": False}, timeout=60)
    took = time.perf_counter() - started
    model, tokenizer = references["small"]
    first_part = tokenizer(["good movie " * 100], truncation=True, max_length=128, return_tensors="pt")
    with torch.inference_mode():
        logits = model(**first_part).logits
    torch.testing.assert_close(decode(response).outputs["logits"], logits, atol=1e-5, rtol=0)
    assert took < 2.0, f"{took:.2f} s"


def test_oversized_inputs_are_refused_before_their_data_is_decoded(roomy_server, monkeypatch):
    decoded: list[str] = []
    decode_json = codec.from_json_data

    def spy(data, datatype, shape, *, field):
        decoded.append(field)
        return decode_json(data, datatype, shape, field=field)

    monkeypatch.setattr(codec, "from_json_data", spy)
    many = [7] * 2_000_000
    cases = [  # body, status, field
        (
            body_of(GOOD, {"name": "foo", "shape": [len(many)], "datatype": "INT64", "data": many}),
            400,
            "inputs[1].name",
        ),
        (body_of(ids_input([many])), 422, "input_ids"),  # 2M tokens: longer than max_seq_length
        (body_of({"name": "text", "shape": [65], "datatype": "BYTES", "data": ["a"] * 65}), 422, "text"),
    ]
    for content, status, field in cases:
        response = httpx.post(f"{roomy_server.url}/v2/models/small/infer", content=content, trust_env=False)
        assert (response.status_code, response.json()["field"]) == (status, field)
    assert decoded == []


def test_outputs_larger_than_max_output_mb_are_refused_before_they_run(roomy_server):
    ids = torch.randint(5, 50, (8, 64))
    passes = roomy_server.metric("teacher_batch_size_count", model="small")
    response = infer(roomy_server.url, "small", {"input_ids": ids}, outputs={"hidden_states": None})
    assert response.status_code == 422 and response.json()["field"] == "outputs"
    assert "would take 0.2 MB, above this teacher's max_output_mb 0.015625" in response.json()["error"]
    assert roomy_server.metric("teacher_batch_size_count", model="small") == passes  # nothing ran
    # 8 × 3 states × 64 tokens × 32 wide in FP32 is 192 KB; the logits and two [CLS] states are not
    fine = infer(
        roomy_server.url,
        "small",
        {"input_ids": ids},
        outputs={"logits": None, "hidden_cls": {"layers": "1,2"}},
    )
    assert decode(fine).outputs["hidden_cls"].shape == (8, 2, 32)


def test_what_start_up_made_stays_out_of_later_garbage_collections(tiny_teachers):
    """A full collection on the event loop's thread holds the GIL that the teacher's passes need
    between operators (about 200 ms with a real teacher): once ready, the service keeps its start-up
    heap (the teacher included) out of every collection, and gives it back when it closes."""
    gc.unfreeze()
    config = ServerConfig(teachers=[{"name": "small", "path": str(tiny_teachers["small"])}])
    with LiveServer(config) as live:
        model = live.app.state.service.batchers["small"].engine.model
        assert gc.get_freeze_count() > 0
        assert not any(tracked is model for tracked in gc.get_objects())
    assert gc.get_freeze_count() == 0
    assert any(tracked is model for tracked in gc.get_objects())
