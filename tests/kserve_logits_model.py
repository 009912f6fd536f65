"""A KServe v2 model that is not this service's, run by KServe's own Python model server.

Run with the python of a venv where ``pip install kserve`` went (``DKD_KSERVE_PYTHON``):
``python tests/kserve_logits_model.py HTTP_PORT GRPC_PORT``. The model ``foreign`` takes
``input_ids`` and ``attention_mask`` and answers ``logits`` (two classes, a function of the ids)
without any of this service's extra parameters (no FLOPs, no token counts).
"""

from __future__ import annotations

import sys

import numpy as np
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer
from kserve.utils.utils import generate_uuid


def logits(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    total = (ids.astype(np.float32) * mask).sum(axis=1, keepdims=True)
    return np.concatenate([total / 7, -total / 11], axis=1).astype(np.float32)


class ForeignLogits(Model):
    def __init__(self) -> None:
        super().__init__("foreign")
        self.ready = True

    def predict(self, payload: InferRequest, headers: dict | None = None) -> InferResponse:
        arrays = {tensor.name: tensor.as_numpy() for tensor in payload.inputs}
        output = InferOutput(name="logits", shape=[len(arrays["input_ids"]), 2], datatype="FP32")
        output.set_data_from_numpy(logits(arrays["input_ids"], arrays["attention_mask"]))
        response_id = payload.id or generate_uuid()  # as KServe's own runtimes answer a request without one
        return InferResponse(model_name=self.name, infer_outputs=[output], response_id=response_id)


if __name__ == "__main__":
    http_port, grpc_port = (int(port) for port in sys.argv[1:3])
    ModelServer(http_port=http_port, grpc_port=grpc_port, workers=1).start([ForeignLogits()])
