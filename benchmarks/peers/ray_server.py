"""The teacher on Ray Serve: one replica behind Ray's HTTP proxy, requests merged by ``@serve.batch``.

Ray Serve speaks no v2 protocol of its own, so a FastAPI ingress maps the v2 JSON infer request
(``text`` as ``BYTES``) to a batched call and back. ``@serve.batch`` counts calls, not rows:
its batch is ``--max_batch_size`` rows' worth of requests. (No postponed annotations here: FastAPI,
behind Ray's ingress, must see ``Request`` itself to hand the request over.)
"""

import itertools
import signal
import time
import uuid

import ray
from fastapi import FastAPI, Request
from ray import serve
from teacher import MODEL_NAME, Teacher, as_texts, parse_args

app = FastAPI()


def stop(signum, frame):  # SIGTERM from bench_peers.py: leave through `finally`, which stops Ray
    raise SystemExit(0)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
@serve.ingress(app)
class TeacherDeployment:
    def __init__(
        self, path: str, threads: int, max_seq_length: int, batch_requests: int, wait_s: float
    ) -> None:
        self.teacher = Teacher(path, threads, max_seq_length)
        self.logits_batched.set_max_batch_size(batch_requests)
        self.logits_batched.set_batch_wait_timeout_s(wait_s)

    @app.get(f"/v2/models/{MODEL_NAME}/ready")
    def ready(self) -> dict:
        return {}

    @app.post(f"/v2/models/{MODEL_NAME}/infer")
    async def infer(self, request: Request) -> dict:
        body = await request.json()
        logits = await self.logits_batched(as_texts(body["inputs"][0]["data"]))
        output = {"name": "logits", "datatype": "FP32", "shape": [len(logits), len(logits[0])]}
        output["data"] = [value for row in logits for value in row]
        return {"id": body.get("id") or str(uuid.uuid4()), "model_name": MODEL_NAME, "outputs": [output]}

    @serve.batch
    async def logits_batched(self, requests: list[list[str]]) -> list[list[list[float]]]:
        logits = self.teacher.logits([text for texts in requests for text in texts]).tolist()
        bounds = [0]
        for texts in requests:
            bounds.append(bounds[-1] + len(texts))
        return [logits[start:end] for start, end in itertools.pairwise(bounds)]


if __name__ == "__main__":
    args = parse_args()
    signal.signal(signal.SIGTERM, stop)
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        # warnings only, no per-request access log: as quiet as the other servers
        quiet = {"log_level": "WARNING", "enable_access_log": False}
        serve.start(http_options={"host": "127.0.0.1", "port": args.port}, logging_config=quiet)
        batch_requests = max(1, args.max_batch_size // args.rows_per_request)
        deployment = TeacherDeployment.bind(
            args.model, args.threads, args.max_seq_length, batch_requests, args.max_queue_delay_ms / 1000
        )
        serve.run(deployment, name=MODEL_NAME, route_prefix="/")
        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()
        ray.shutdown()
