"""The HTTP face of the service: KServe Open Inference Protocol v2 over FastAPI.

``create_app(config)`` builds the app; teachers load and warm up in the background after
start-up, so ``/v2/health/live`` answers at once and ``/v2/health/ready`` turns 200 only
when every teacher can serve. Tensors travel as JSON or with the binary tensor extension
(:mod:`shared.codec`, never pickle). Every error is ``{"error": ..., "field": ...}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from shared.codec import (
    HEADER_LENGTH,
    OUTPUT_DATATYPES,
    TORCH_DTYPES,
    CodecError,
    DecodedRequest,
    Tensor,
    build_response_body,
    field_name,
    parse_request_body,
    requested_layers,
    wants_binary,
)
from shared.protocol import InferenceRequest, ModelMetadata, ServerMetadata
from shared.teacher_api import TeacherAnswer, TeacherQuery
from teacher_server import __version__
from teacher_server.batcher import DeadlineExceededError, DynamicBatcher, QueueFullError, ShuttingDownError
from teacher_server.cache import OutputCache
from teacher_server.config import ServerConfig
from teacher_server.engine import QueryError, TeacherEngine
from teacher_server.metrics import ServiceMetrics

logger = logging.getLogger("teacher_server")

TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
TEXT_INPUTS = ("text", "text_pair")
INPUT_NAMES = TOKEN_INPUTS + TEXT_INPUTS
OUTPUT_NAMES = ("logits", "probs", "hidden_cls", "hidden_states")
OUTPUT_DTYPES = {name: TORCH_DTYPES[name] for name in OUTPUT_DATATYPES}
CLIENT_CLOSED_REQUEST = 499  # nginx's code: nobody reads it, the metrics and logs do


class ApiError(Exception):
    """An error response: status, a message for humans and the request field at fault."""

    def __init__(
        self, status: int, message: str, field: str | None = None, headers: dict[str, str] | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.field, self.headers = status, message, field, headers


# --- service state ---------------------------------------------------------------------------


@dataclass
class TeacherService:
    """What the app holds: config, one batcher per loaded teacher, the cache and the metrics."""

    config: ServerConfig
    api_key: str | None = None
    on_load_failure: Callable[[str], None] | None = None
    metrics: ServiceMetrics = field(default_factory=ServiceMetrics)
    batchers: dict[str, DynamicBatcher] = field(default_factory=dict)
    loaded: bool = False
    draining: bool = False

    def __post_init__(self) -> None:
        self.cache = OutputCache(self.config.cache_max_bytes)

    @property
    def ready(self) -> bool:
        return self.loaded and not self.draining

    async def load(self) -> None:
        """Load and warm up every teacher (in threads); a failure is one log line, never ready."""
        for teacher in self.config.teachers:
            started = time.perf_counter()
            try:
                engine = await asyncio.to_thread(
                    TeacherEngine.load,
                    teacher.name,
                    teacher.path,
                    revision=teacher.revision,
                    device=teacher.device,
                    dtype=teacher.dtype,
                    max_seq_length=teacher.max_seq_length,
                    batch_invariant=teacher.batch_invariant,
                )
                if self.config.warmup:
                    await asyncio.to_thread(_warm_up, engine)
            except Exception as err:
                message = f"teacher {teacher.name!r} failed to load from {teacher.path}: {err}"
                logger.error(" ".join(message.split()), extra={"event": "load_failed", "model": teacher.name})
                if self.on_load_failure is not None:
                    self.on_load_failure(message)
                return
            batcher = DynamicBatcher(engine, teacher, cache=self.cache, metrics=self.metrics)
            batcher.start()
            self.batchers[teacher.name] = batcher
            logger.info(
                "teacher ready",
                extra={
                    "event": "teacher_ready",
                    "model": teacher.name,
                    "device": teacher.device,
                    "dtype": teacher.dtype,
                    "load_s": round(time.perf_counter() - started, 3),
                },
            )
        self.loaded = True
        logger.info("all teachers ready", extra={"event": "ready", "models": list(self.batchers)})

    async def close(self) -> None:
        """Stop taking work and let each batcher finish what it queued."""
        self.draining = True
        await asyncio.gather(*(b.close(self.config.drain_timeout_s) for b in self.batchers.values()))
        logger.info("drained", extra={"event": "drained"})


def _warm_up(engine: TeacherEngine) -> None:
    """One full pass so the first real request does not pay for lazy initialisation."""
    ids, mask, types = engine.tokenize(["warm up the teacher", "a second, longer warm-up sentence"])
    every_layer = tuple(range(engine.info.num_layers + 1))
    engine.run(TeacherQuery(ids, mask, types, want_logits=True, cls_layers=every_layer, use_cache=False))


# --- dependencies ----------------------------------------------------------------------------


def get_service(request: Request) -> TeacherService:
    return request.app.state.service


bearer = HTTPBearer(auto_error=False, description="the API key, when the server was started with one")


def require_api_key(
    credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
    service: TeacherService = Depends(get_service),
) -> None:
    """401 unless ``Authorization: Bearer <key>`` matches (constant-time compare)."""
    if service.api_key is None:
        return
    given = credentials.credentials.encode() if credentials is not None else b""
    if not hmac.compare_digest(given, service.api_key.encode()):
        raise ApiError(
            401, "missing or wrong API key", "Authorization", headers={"WWW-Authenticate": "Bearer"}
        )


def get_engine(name: str, service: TeacherService = Depends(get_service)) -> TeacherEngine:
    return get_batcher(name, service).engine


def get_batcher(name: str, service: TeacherService = Depends(get_service)) -> DynamicBatcher:
    """The named teacher's batcher: 404 if no such teacher, 503 while it loads or drains."""
    if all(t.name != name for t in service.config.teachers):
        known = ", ".join(t.name for t in service.config.teachers)
        raise ApiError(404, f"no teacher named {name!r} (served: {known})", "model_name")
    if name not in service.batchers or service.draining:
        raise ApiError(503, f"teacher {name!r} is not ready", "model_name", headers={"Retry-After": "1"})
    return service.batchers[name]


async def read_body(request: Request, service: TeacherService = Depends(get_service)) -> bytes:
    """The request body, refusing (413) anything over ``max_body_bytes`` without reading it all."""
    limit = service.config.max_body_bytes
    too_large = ApiError(413, f"request body exceeds {limit} bytes", "body")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
    except ClientDisconnect:  # hung up mid-upload: nobody to answer, but the metrics count it
        raise ApiError(CLIENT_CLOSED_REQUEST, "client disconnected while sending the body", "body") from None
    return b"".join(chunks)


# --- v2 tensors <-> teacher queries ----------------------------------------------------------


@dataclass
class InferPlan:
    """A v2 request translated: the teacher query and how to render its answer."""

    query: TeacherQuery
    outputs: list[str]
    output_dtype: torch.dtype
    temperature: float
    timeout_s: float | None


def check_inputs(header: InferenceRequest, engine: TeacherEngine, max_rows: int) -> None:
    """Names, datatypes and sizes from the JSON header alone (400, 422), before any tensor is
    decoded: a 12 MB ``data`` list under a wrong name or an oversized shape is refused unread."""
    where: dict[str, str] = {}
    for i, entry in enumerate(header.inputs):
        name, location = entry.name, f"inputs[{i}]"
        if name in TOKEN_INPUTS:
            if entry.datatype not in ("INT32", "INT64"):
                raise ApiError(400, f"{name} must be INT32 or INT64", f"{location}.datatype")
            if len(entry.shape) != 2:
                raise ApiError(
                    400, f"{name} must have shape [batch, length], got {entry.shape}", f"{location}.shape"
                )
            rows, length = entry.shape
            if length > engine.info.max_seq_length:
                raise QueryError(name, f"length {length} exceeds max_seq_length {engine.info.max_seq_length}")
        elif name in TEXT_INPUTS:
            if entry.datatype != "BYTES":
                raise ApiError(400, f"{name} must be BYTES of shape [batch]", f"{location}.datatype")
            rows = math.prod(entry.shape)
        else:
            raise ApiError(
                400, f"unknown input {name!r}; inputs are {', '.join(INPUT_NAMES)}", f"{location}.name"
            )
        if rows > max_rows:
            raise QueryError(name, f"{rows} rows exceed max_batch_size {max_rows}")
        where[name] = location
    if "text" in where:
        for name in TOKEN_INPUTS:
            if name in where:
                raise ApiError(400, f"give either text or {name}, not both", f"{where[name]}.name")
    elif "input_ids" in where:
        if "text_pair" in where:
            raise ApiError(400, "text_pair goes with text, not input_ids", f"{where['text_pair']}.name")
    else:
        raise ApiError(400, "send input_ids (INT32/INT64 [B, L]) or text (BYTES [B])", "inputs")


def plan_inference(request: DecodedRequest, engine: TeacherEngine) -> InferPlan:
    """Build the query from inputs that :func:`check_inputs` passed; check outputs and parameters
    (400); the engine checks values (422)."""
    header, inputs = request.header, request.inputs
    if "text" in inputs:
        pairs = _texts(inputs, "text_pair") if "text_pair" in inputs else None
        ids, mask, types = engine.tokenize(_texts(inputs, "text"), pairs)
    else:
        ids = _token_ids(inputs, "input_ids")
        mask = _token_ids(inputs, "attention_mask") if "attention_mask" in inputs else torch.ones_like(ids)
        types = _token_ids(inputs, "token_type_ids") if "token_type_ids" in inputs else None

    requested = [entry.name for entry in header.outputs] if header.outputs else ["logits"]
    for i, name in enumerate(requested):
        if name not in OUTPUT_NAMES:
            raise ApiError(
                400, f"unknown output {name!r}; outputs are {', '.join(OUTPUT_NAMES)}", f"outputs[{i}].name"
            )
        if requested.index(name) != i:
            raise ApiError(400, f"output {name!r} asked for twice", f"outputs[{i}].name")
    params = header.parameters or {}
    return InferPlan(
        query=TeacherQuery(
            ids,
            mask,
            types,
            want_logits="logits" in requested or "probs" in requested,
            cls_layers=_layers(header, "hidden_cls", requested, engine),
            token_layers=_layers(header, "hidden_states", requested, engine),
            use_cache=_parameter(params, "cache", bool, True),
        ),
        outputs=requested,
        output_dtype=_output_dtype(params),
        temperature=_temperature(header),
        timeout_s=_timeout_s(params),
    )


def check_output_size(plan: InferPlan, engine: TeacherEngine, max_output_mb: float) -> None:
    """Refuse (422) what would answer with more than ``max_output_mb`` of tensors, before it runs:
    all-token hidden states of many layers grow as rows × layers × tokens × width, and the
    service holds a few copies of an answer while it renders it."""
    rows, length = plan.query.input_ids.shape
    width, labels = engine.info.hidden_size, engine.info.num_labels
    per_row = sum(labels for name in plan.outputs if name in ("logits", "probs"))
    per_row += len(plan.query.cls_layers) * width + len(plan.query.token_layers) * length * width
    megabytes = rows * per_row * plan.output_dtype.itemsize / 2**20
    if megabytes > max_output_mb:
        raise ApiError(
            422,
            f"the outputs would take {megabytes:,.1f} MB, above this teacher's max_output_mb "
            f"{max_output_mb:g}: ask for fewer rows, layers or tokens, or FP16/BF16 outputs",
            "outputs",
        )


def _texts(inputs: dict[str, Tensor], name: str) -> list[str]:
    value = inputs[name]
    assert isinstance(value, list)  # BYTES: check_inputs made sure
    return value


def _token_ids(inputs: dict[str, Tensor], name: str) -> torch.Tensor:
    value = inputs[name]
    assert isinstance(value, torch.Tensor)  # INT32/INT64 [batch, length]: check_inputs made sure
    return value.long()


def _layers(
    header: InferenceRequest, output: str, requested: list[str], engine: TeacherEngine
) -> tuple[int, ...]:
    """The layers for a hidden-state output: its own parameter, else the request's, else all."""
    if output not in requested:
        return ()
    layers = requested_layers(header, output) or tuple(range(engine.info.num_layers + 1))
    bad = [layer for layer in layers if layer > engine.info.num_layers]
    if bad:
        index = requested.index(output)
        own = header.outputs and (header.outputs[index].parameters or {}).get("layers") is not None
        location = f"outputs[{index}].parameters.layers" if own else "parameters.layers"
        raise ApiError(422, f"layers {bad} exceed the teacher's {engine.info.num_layers} layers", location)
    return layers


T = TypeVar("T")


def _parameter(
    params: dict[str, Any], name: str, kind: type[T], default: T, location: str = "parameters"
) -> T:
    value = params.get(name, default)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ApiError(400, f"{name} must be a {kind.__name__}", f"{location}.{name}")
    return value


def _output_dtype(params: dict[str, Any]) -> torch.dtype:
    name = _parameter(params, "output_dtype", str, "FP32").upper()
    if name not in OUTPUT_DTYPES:
        raise ApiError(
            400, f"output_dtype must be one of {', '.join(OUTPUT_DTYPES)}", "parameters.output_dtype"
        )
    return OUTPUT_DTYPES[name]


def _temperature(header: InferenceRequest) -> float:
    """``temperature`` for ``probs``: on that output's parameters, else on the request's."""
    for i, entry in enumerate(header.outputs or ()):
        if entry.name == "probs" and entry.parameters and "temperature" in entry.parameters:
            return _positive(entry.parameters["temperature"], f"outputs[{i}].parameters.temperature")
    params = header.parameters or {}
    return _positive(params["temperature"], "parameters.temperature") if "temperature" in params else 1.0


def _timeout_s(params: dict[str, Any]) -> float | None:
    """The request's deadline: our ``timeout_ms``, or Triton's ``timeout`` (microseconds)."""
    if "timeout_ms" in params:
        return _positive(params["timeout_ms"], "parameters.timeout_ms") / 1e3
    if "timeout" in params:
        return _positive(params["timeout"], "parameters.timeout") / 1e6
    return None


def _positive(value: Any, location: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ApiError(400, "must be a positive number", location)
    return float(value)


def render_outputs(plan: InferPlan, answer: TeacherAnswer) -> dict[str, Tensor]:
    """The requested outputs, in request order, in the requested dtype."""
    tensors = {
        "logits": lambda: answer.logits,
        "probs": lambda: torch.softmax(answer.logits / plan.temperature, dim=-1),
        "hidden_cls": lambda: answer.hidden_cls,
        "hidden_states": lambda: answer.hidden_states,
    }
    return {name: tensors[name]().to(plan.output_dtype) for name in plan.outputs}


def response_parameters(answer: TeacherAnswer) -> dict[str, int]:
    return {
        "teacher_flops": answer.teacher_flops,
        "tokens": answer.tokens,
        "padded_tokens": answer.padded_tokens,
        "queue_us": int(answer.extra.get("queue_us", 0)),
        "compute_us": int(answer.extra.get("compute_us", 0)),
        "cache_hits": answer.cache_hits,
    }


def as_api_error(err: Exception) -> ApiError:
    """Map the engine's and batcher's exceptions to statuses."""
    if isinstance(err, CodecError):
        return ApiError(400, err.message, err.field)
    if isinstance(err, QueryError):
        return ApiError(422, err.message, err.field)
    if isinstance(err, QueueFullError):
        return ApiError(429, str(err), None, headers={"Retry-After": str(err.retry_after_s)})
    if isinstance(err, DeadlineExceededError):
        return ApiError(504, str(err), "parameters.timeout_ms")
    assert isinstance(err, ShuttingDownError)
    return ApiError(503, str(err), None, headers={"Retry-After": "1"})


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` but cancel it (so the batcher drops it) if the client hangs up first."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        raise ApiError(CLIENT_CLOSED_REQUEST, "client disconnected")
    return task.result()


# --- routes ----------------------------------------------------------------------------------

health = APIRouter(tags=["health"])
models = APIRouter(tags=["models"], dependencies=[Depends(require_api_key)])
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"description": text, "content": {"application/json": {"example": {"error": text, "field": "..."}}}}
    for code, text in {401: "missing or wrong API key", 404: "unknown teacher", 503: "not ready"}.items()
}


@health.get("/v2/health/live", summary="Server live")
def live() -> dict[str, bool]:
    return {"live": True}


@health.get("/v2/health/ready", summary="Server ready (all teachers loaded and warmed up)")
def ready(service: TeacherService = Depends(get_service)) -> JSONResponse:
    return JSONResponse({"ready": service.ready}, status_code=200 if service.ready else 503)


@health.get("/metrics", summary="Prometheus metrics")
def metrics(service: TeacherService = Depends(get_service)) -> Response:
    body, content_type = service.metrics.render()
    return Response(body, media_type=content_type)


@models.get("/v2", summary="Server metadata", response_model=ServerMetadata)
def server_metadata() -> dict[str, Any]:
    return {"name": "teacher-server", "version": __version__, "extensions": ["binary_tensor_data"]}


@models.get(
    "/v2/models/{name}", summary="Model metadata", response_model=ModelMetadata, responses=ERROR_RESPONSES
)
def model_metadata(name: str, engine: TeacherEngine = Depends(get_engine)) -> dict[str, Any]:
    info = engine.info
    tokens = [-1, -1]
    return {
        "name": name,
        "versions": ["1"],
        "platform": "pytorch_transformers",
        "inputs": [
            *(
                {"name": n, "datatype": "INT64", "shape": tokens}
                for n in ("input_ids", "attention_mask", "token_type_ids")
            ),
            *({"name": n, "datatype": "BYTES", "shape": [-1]} for n in ("text", "text_pair")),
        ],
        "outputs": [
            {"name": "logits", "datatype": "FP32", "shape": [-1, info.num_labels]},
            {"name": "probs", "datatype": "FP32", "shape": [-1, info.num_labels]},
            {"name": "hidden_cls", "datatype": "FP32", "shape": [-1, -1, info.hidden_size]},
            {"name": "hidden_states", "datatype": "FP32", "shape": [-1, -1, -1, info.hidden_size]},
        ],
        "parameters": {
            "num_layers": info.num_layers,
            "hidden_size": info.hidden_size,
            "num_labels": info.num_labels,
            "labels": list(info.label_names),
            "vocab_size": info.vocab_size,
            "max_seq_length": info.max_seq_length,
            "revision": engine.revision,
            "flops_per_token": engine.flops_per_token,
            "intermediate_size": info.intermediate_size,
            **info.metadata_parameters(),
        },
    }


@models.get("/v2/models/{name}/ready", summary="Model ready", responses=ERROR_RESPONSES)
def model_ready(name: str, service: TeacherService = Depends(get_service)) -> JSONResponse:
    get_batcher(name, service)
    return JSONResponse({"name": name, "ready": True})


@models.post(
    "/v2/models/{name}/infer",
    summary="Inference (JSON or the binary tensor extension)",
    responses={
        **ERROR_RESPONSES,
        400: {"description": "malformed request, unknown input or output"},
        413: {"description": "body too large"},
        422: {"description": "bad values: token ids outside the vocabulary, too long, shapes differ"},
        429: {"description": "queue full; see Retry-After"},
        504: {"description": "deadline (timeout_ms) passed"},
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": InferenceRequest.model_json_schema()},
                "application/octet-stream": {
                    "schema": {"type": "string", "format": "binary"},
                    "description": f"JSON header of {HEADER_LENGTH} bytes, then the tensor blobs",
                },
            },
        }
    },
)
async def infer(
    name: str,
    request: Request,
    batcher: DynamicBatcher = Depends(get_batcher),
    body: bytes = Depends(read_body),
    service: TeacherService = Depends(get_service),
) -> Response:
    started = time.perf_counter()
    check = functools.partial(check_inputs, engine=batcher.engine, max_rows=batcher.config.max_batch_size)
    try:
        try:
            decoded = parse_request_body(body, request.headers.get(HEADER_LENGTH), check)
            plan = plan_inference(decoded, batcher.engine)
            check_output_size(plan, batcher.engine, batcher.config.max_output_mb)
            answer = await unless_disconnected(request, batcher.infer(plan.query, timeout_s=plan.timeout_s))
        except (CodecError, QueryError, QueueFullError, DeadlineExceededError, ShuttingDownError) as err:
            raise as_api_error(err) from None
        tensors = render_outputs(plan, answer)
        content, headers = build_response_body(
            name,
            tensors,
            binary_outputs=[n for n in tensors if wants_binary(decoded.header, n)],
            model_version="1",
            request_id=decoded.header.id,
            parameters=response_parameters(answer),
        )
        service.metrics.requests.labels(name, "200").inc()  # errors: counted by the error handlers
        return Response(content, headers=headers)
    finally:
        service.metrics.latency.labels(name).observe(time.perf_counter() - started)


# --- the app ---------------------------------------------------------------------------------


def error_response(
    status: int, message: str, field: str | None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": message, "field": field}, status_code=status, headers=headers)


def count_infer_error(request: Request, status: int) -> None:
    """Count a failed inference in ``teacher_requests_total``, also one its dependencies refused
    (401, 404, 413, 503) before the route ran; a name that is no teacher is counted as model ""
    so that clients cannot mint label values."""
    if request.scope.get("endpoint") is not infer:
        return
    service = get_service(request)
    name = request.path_params.get("name", "")
    model = name if any(t.name == name for t in service.config.teachers) else ""
    service.metrics.requests.labels(model, str(status)).inc()


def install_error_handlers(app: FastAPI) -> None:
    """Every error, ours or the framework's, as ``{"error", "field"}``."""

    async def api_error(request: Request, err: Exception) -> JSONResponse:
        assert isinstance(err, ApiError)
        count_infer_error(request, err.status)
        return error_response(err.status, err.message, err.field, err.headers)

    async def validation_error(_: Request, err: Exception) -> JSONResponse:
        assert isinstance(err, RequestValidationError)
        first = err.errors()[0]
        loc = [part for part in first["loc"] if part not in ("body", "path", "query", "header")]
        return error_response(422, first["msg"], field_name(loc) or None)

    async def http_error(_: Request, err: Exception) -> JSONResponse:
        assert isinstance(err, StarletteHTTPException)
        return error_response(err.status_code, str(err.detail), None, err.headers)

    async def unexpected(request: Request, err: Exception) -> JSONResponse:
        logger.exception("unhandled error", exc_info=err, extra={"event": "internal_error"})
        count_infer_error(request, 500)
        return error_response(500, "internal server error", None)

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)


def create_app(
    config: ServerConfig, *, api_key: str | None = None, on_load_failure: Callable[[str], None] | None = None
) -> FastAPI:
    """The service for ``config``; ``on_load_failure`` lets the CLI exit when a teacher cannot load."""
    service = TeacherService(config, api_key=api_key or None, on_load_failure=on_load_failure)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(service.load())
        yield
        loading.cancel()
        await service.close()

    app = FastAPI(
        title="teacher-server",
        version=__version__,
        description="BERT teachers over the KServe Open Inference Protocol v2, with dynamic batching.",
        lifespan=lifespan,
    )
    app.state.service = service
    app.include_router(health)
    app.include_router(models)
    install_error_handlers(app)
    return app
