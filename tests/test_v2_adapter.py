"""v2 request → teacher call → rendered outputs, in process: every accepted request answers finite numbers."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from teacher_engine.engine import TeacherEngine
from teacher_server import v2_adapter
from teacher_server.config import TeacherConfig
from teacher_server.errors import ServiceError


@pytest.fixture(scope="module")
def engine(tiny_teachers) -> TeacherEngine:
    return TeacherEngine.load("small", tiny_teachers["small"])


NUMBERS = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),  # NaN/inf are not JSON
    st.integers(min_value=-(10**400), max_value=10**400),
    st.sampled_from([1e-320, 5e-324, 1e-3, 0.01, 1e4, 1e300, 10**399]),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    temperature=NUMBERS,
    on_output=st.booleans(),
    ids=st.lists(st.lists(st.integers(4, 99), min_size=1, max_size=6), min_size=1, max_size=3),
    dtype=st.sampled_from(["FP32", "FP16", "BF16"]),
    logit_scale=st.sampled_from([1.0, 1e2, 1e3]),
)
def test_every_accepted_request_answers_finite_floats(
    engine, temperature, on_output, ids, dtype, logit_scale
):
    width = max(map(len, ids)) + 2
    rows = [[2, *row, 3] + [0] * (width - len(row) - 2) for row in ids]
    mask = [[1] * (len(row) + 2) + [0] * (width - len(row) - 2) for row in ids]
    probs = {"name": "probs", "parameters": {"temperature": temperature}} if on_output else {"name": "probs"}
    body = {
        "inputs": [
            {"name": "input_ids", "datatype": "INT64", "shape": [len(rows), width], "data": sum(rows, [])},
            {
                "name": "attention_mask",
                "datatype": "INT64",
                "shape": [len(rows), width],
                "data": sum(mask, []),
            },
        ],
        "outputs": [probs, {"name": "logits"}, {"name": "hidden_cls"}, {"name": "hidden_states"}],
        "parameters": {"output_dtype": dtype, **({} if on_output else {"temperature": temperature})},
    }
    try:
        config = TeacherConfig(name="small", path="x")
        call = v2_adapter.to_call(
            v2_adapter.parse(json.dumps(body).encode(), None, engine, config), engine, config
        )
    except ServiceError as err:  # refused: a 4xx naming the temperature, never a 500
        assert 400 <= err.status < 500 and err.field is not None and err.field.endswith("temperature")
        return
    answer = engine.run(call.query)
    # logits far larger than a trained teacher's: the probs must stay finite at every accepted temperature
    answer = dataclasses.replace(answer, logits=answer.logits * logit_scale)
    for name, tensor in v2_adapter.render_outputs(call, answer).items():
        assert isinstance(tensor, torch.Tensor)
        assert torch.isfinite(tensor.float()).all(), (name, temperature)
