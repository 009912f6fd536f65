"""The teacher on KServe's Python model server (``kserve.Model``: load, predict), v2 protocol.

KServe's server has no batcher of its own: every request is one pass of its 8 texts. Its v2
responses must carry an ``id``, so the request's id is echoed (or a fresh one made).
"""

from __future__ import annotations

import logging
import uuid

from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer
from teacher import MODEL_NAME, Teacher, as_texts, parse_args


class TeacherModel(Model):
    def __init__(self, path: str, threads: int, max_seq_length: int) -> None:
        super().__init__(MODEL_NAME)
        self.settings = (path, threads, max_seq_length)
        self.load()

    def load(self) -> bool:
        self.teacher = Teacher(*self.settings)
        self.ready = True
        return self.ready

    def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
        texts = as_texts(payload.inputs[0].as_numpy())  # tokenized here, as the other servers do
        logits = self.teacher.logits(texts)
        output = InferOutput(
            name="logits", shape=list(logits.shape), datatype="FP32", data=logits.ravel().tolist()
        )
        return InferResponse(
            response_id=payload.id or str(uuid.uuid4()), model_name=self.name, infer_outputs=[output]
        )


if __name__ == "__main__":
    args = parse_args()
    model = TeacherModel(args.model, args.threads, args.max_seq_length)
    server = ModelServer(http_port=args.port, enable_grpc=False, workers=1, enable_latency_logging=False)
    for name in ("kserve.trace", "uvicorn.access"):  # per-request logs off, as for the other servers
        logging.getLogger(name).setLevel(logging.WARNING)
    server.start([model])
