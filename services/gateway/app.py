"""The HTTP gateway: Open Inference Protocol (KServe v2) and the platform API.

``create_app(config)`` builds the aiohttp application; its NATS connection lives in
``cleanup_ctx``. Every error leaves as JSON ``{code, error, field}`` with the status
from the shared error table, never as a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import msgspec
import nats.errors
import orjson
import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg as NatsMsg
from nats.js.api import ConsumerConfig, DeliverPolicy
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from gpufaas.gateway import (
    binary,
    console,
    direct,
    grpc_server,
    keys,
    loads,
    models,
    openai_api,
    repository,
    sysshm,
)
from gpufaas.gateway.admission import (
    ADMISSION,
    Admission,
    admitted,
    capped_streams,
    check_input_sizes,
    replay_start,
)
from gpufaas.gateway.auth import (
    KEYS,
    auth_middleware,
    caller_of,
    require_admin,
    warn_if_open,
)
from gpufaas.gateway.bodies import DeployBody, InferBody, WorkflowBody
from gpufaas.gateway.inference import Tensor, check_inputs, run_function, run_workflow
from gpufaas.gateway.openapi import ErrorShape, Param, RouteDoc, build_openapi
from gpufaas.gateway.service_stats import exposition, gather
from gpufaas.gateway.token_counts import TokenCounter
from gpufaas.shared import constants as c
from gpufaas.shared import subjects, worker_deaths
from gpufaas.shared.apikeys import KeyCache
from gpufaas.shared.catalog import check_server_path, validate_source
from gpufaas.shared.config import Config
from gpufaas.shared.errors import (
    InvalidArgument,
    NoResponders,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    PlatformError,
    Unauthenticated,
    Unavailable,
    UnsupportedMediaType,
    http_status,
)
from gpufaas.shared.identity import FunctionRef, gpu_number
from gpufaas.shared.jetstream import wait_for_jetstream
from gpufaas.shared.kv import TypedBuckets
from gpufaas.shared.messages import (
    NAME_PATTERN,
    DeleteReply,
    DeleteRequest,
    DeployReply,
    DeployRequest,
    FunctionRecord,
    FunctionSpec,
    Heartbeat,
    InvokeReply,
    InvokeRequest,
    LinksReply,
    LinksRequest,
    M,
    MemStatsReply,
    MemStatsRequest,
    ModelSource,
    Msg,
    ProfileRecord,
    StoreStats,
    StoreStatsRequest,
    convert,
    encode_json,
    new_event,
    to_builtins,
)
from gpufaas.shared.registry import (
    FunctionCache,
    Mirror,
    alive,
    instance_devices,
    node_gpus_of,
    records,
)
from gpufaas.shared.rpc import Link, link_of, reconnected
from gpufaas.shared.rpc import request as nats_request
from gpufaas.shared.service import cancel_and_wait, close_nats, connect_nats, follow
from gpufaas.shared.stats import LoopCounter
from gpufaas.shared.tensors import raw_to_json
from gpufaas.shared.worker_deaths import Deaths
from gpufaas.shared.workflows import (
    WorkflowDeleteReply,
    WorkflowDeleteRequest,
    WorkflowDeployReply,
    WorkflowDeployRequest,
    WorkflowInvokeRequest,
    WorkflowRecord,
    WorkflowSpec,
)

log = structlog.get_logger()

VERSION = "0.1.0"
REQUEST_ID_HEADER = "X-Request-ID"
RECONNECT_WAIT_S = 2.0  # how long a request waits for a dropped NATS connection to return
SCHEDULER_WAIT_S = 5.0  # ... and an invocation for a scheduler replica to be running
NO_RESPONDERS_RETRY_S = 0.1  # how often it looks for one meanwhile

CONFIG = web.AppKey("config", Config)
NC = web.AppKey("nc", NATS)
KV = web.AppKey("kv", TypedBuckets)
FUNCTIONS = web.AppKey("functions", FunctionCache)
WORKFLOWS = web.AppKey("workflows", Mirror[WorkflowRecord])
LOADS = web.AppKey("loads", loads.Loads)

_NAME = re.compile(NAME_PATTERN)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Metrics:
    """Prometheus metrics of one gateway."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "gpufaas_http_requests", "HTTP requests", ["route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "gpufaas_http_request_seconds",
            "HTTP request latency",
            ["route"],
            registry=self.registry,
        )
        self.direct = Counter(
            "gpufaas_direct_route_requests",
            "Invocations sent on a direct route: answered, or sent through a scheduler instead",
            ["outcome"],
            registry=self.registry,
        )


METRICS = web.AppKey("metrics", Metrics)
# Routes (by path) whose errors leave in their own shape (the OpenAI-compatible ones).
ERROR_SHAPES = web.AppKey("error_shapes", dict[str, ErrorShape])
REQUEST_ID = web.RequestKey("request_id", str)


def json_response(
    body: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, content_type="application/json", headers=headers
    )


def error_response(
    exc: PlatformError, request_id: str, shape: ErrorShape | None = None
) -> web.Response:
    headers = {REQUEST_ID_HEADER: request_id}
    if isinstance(exc, Unauthenticated):
        headers["WWW-Authenticate"] = 'Bearer realm="gpufaas"'
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    return shaped_error(exc.to_dict(), http_status(exc), headers, shape)


def shaped_error(
    body: dict[str, Any], status: int, headers: dict[str, str], shape: ErrorShape | None
) -> web.Response:
    """An error reply: the gateway's body, or the route's own shape of it."""
    return json_response(shape.body(body, status) if shape else body, status, headers)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request ID, metrics, and the one place errors become HTTP responses."""
    request_id = request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
    request[REQUEST_ID] = request_id
    route = (
        request.match_info.route.resource.canonical if request.match_info.route.resource else "?"
    )
    metrics = request.app[METRICS]
    shapes = request.app[ERROR_SHAPES]
    shape = shapes.get(route) or shapes.get(request.path)  # the path's own 405 too
    t0 = time.perf_counter()
    with structlog.contextvars.bound_contextvars(request_id=request_id):
        try:
            resp = await handler(request)
        except PlatformError as exc:
            resp = error_response(exc, request_id, shape)
        except web.HTTPRequestEntityTooLarge:
            resp = error_response(
                PayloadTooLarge(
                    f"request body exceeds {request.app[CONFIG].max_body_bytes} bytes", field="body"
                ),
                request_id,
                shape,
            )
        except RequestPayloadError as exc:  # e.g. a gzip body that does not inflate
            why = " ".join(str(exc).split())
            resp = error_response(
                InvalidArgument(f"cannot read the body: {why}", field="body"), request_id, shape
            )
            resp.force_close()  # the rest of the body cannot be told from the next request
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            body = {"code": _http_code(exc.status), "error": exc.reason}
            headers = {REQUEST_ID_HEADER: request_id}
            if "Allow" in exc.headers:  # a 405 names the methods the path has (RFC 9110)
                headers["Allow"] = exc.headers["Allow"]
            resp = shaped_error(body, exc.status, headers, shape)
        except Exception:
            log.exception("http.crashed", path=request.path)
            body = {
                "code": "internal",
                "error": "internal error; see the gateway log",
                "request_id": request_id,
            }
            resp = shaped_error(body, 500, {REQUEST_ID_HEADER: request_id}, shape)
    if not resp.prepared:
        resp.headers.setdefault(REQUEST_ID_HEADER, request_id)
    metrics.requests.labels(route, str(resp.status)).inc()
    metrics.latency.labels(route).observe(time.perf_counter() - t0)
    return resp


def _http_code(status: int) -> str:
    return {404: "not_found", 405: "method_not_allowed"}.get(status, "invalid_argument")


# --- helpers -------------------------------------------------------------------------


async def read_json(request: web.Request) -> Any:
    raw = await read_body(request)
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidArgument(f"malformed JSON: {exc}", field="body") from None


async def read_body(request: web.Request) -> bytes:
    """A JSON request's whole body (of a JSON-like content type, and not empty)."""
    if request.content_type not in ("application/json", "application/octet-stream", "") and not (
        request.content_type.startswith("text/")
        or request.content_type.endswith("x-www-form-urlencoded")
    ):
        raise UnsupportedMediaType(
            f"expected a JSON body, got {request.content_type}", field="body"
        )
    raw = await request.read()
    if not raw:
        raise InvalidArgument("request body is empty; expected JSON", field="body")
    return raw


def tenant_of(request: web.Request) -> str:
    """The tenant the request acts as: its key's (or, for an admin key, the header's)."""
    return caller_of(request).tenant


async def publish_event(request: web.Request, kind: str, data: dict[str, Any]) -> None:
    """A gateway event (a plain publish the EVENTS stream stores); never fails the request."""
    await publish_app_event(request.app, request[REQUEST_ID], kind, data)


async def publish_app_event(
    app: web.Application, request_id: str, kind: str, data: dict[str, Any]
) -> None:
    """``publish_event`` for a request of any protocol (gRPC's too)."""
    event = new_event(kind, f"gateway@{app[CONFIG].node_id}", data, request_id)
    try:
        await app[NC].publish(subjects.event(kind), encode_json(event))
    except Exception as exc:  # events are best effort
        log.warning("event.publish_failed", kind=kind, error=repr(exc))


def nats_of(request: web.Request) -> NATS:
    return connected_nats(request.app)


def connected_nats(app: web.Application) -> NATS:
    nc = app[NC]
    if not nc.is_connected:
        raise Unavailable("NATS is not reachable from the gateway; retry later")
    return nc


async def reconnected_nats(app: web.Application) -> NATS:
    """``connected_nats``, after waiting up to ``RECONNECT_WAIT_S`` for a dropped connection
    to come back: an invocation rides a cluster's failover out instead of failing it, and
    is still a fast 503 while NATS stays away."""
    await reconnected(app[NC], RECONNECT_WAIT_S)
    return connected_nats(app)


async def ask_scheduler(
    request: web.Request,
    subject: str,
    msg: Msg,
    reply_type: type[M],
    *,
    timeout: float | None = None,
) -> M:
    """A request to a scheduler replica on behalf of an HTTP request (its request id
    travels along; the timeout defaults to the platform's request timeout)."""
    return await nats_request(
        nats_of(request),
        subject,
        msg,
        reply_type,
        timeout=request.app[CONFIG].request_timeout_s if timeout is None else timeout,
        request_id=request[REQUEST_ID],
        what="scheduler",
    )


async def invoke_scheduler(
    app: web.Application,
    request_id: str,
    subject: str,
    msg: InvokeRequest | WorkflowInvokeRequest,
    reply_type: type[M],
) -> M:
    """An invocation (a function's or a workflow's, until its deadline) sent to a scheduler
    replica, and again if the replica may have lost it (``resend=True``: an inference may
    run twice; its answer is the same). While no replica is subscribed (``gpufaas up``
    restarting its only one: a second or two) it waits for one, up to
    ``SCHEDULER_WAIT_S``: the request reached nobody, so sending it again is safe."""
    until = time.monotonic() + SCHEDULER_WAIT_S
    default_s = app[CONFIG].request_timeout_s
    while True:
        left = msg.deadline - time.time() if msg.deadline else default_s
        try:
            return await nats_request(
                connected_nats(app),
                subject,
                msg,
                reply_type,
                timeout=max(left, 0.001) + 1,
                request_id=request_id,
                what="scheduler",
                resend=True,
            )
        except NoResponders:
            if time.monotonic() >= until:
                raise
            await asyncio.sleep(NO_RESPONDERS_RETRY_S)


async def require_function(request: web.Request, name: str) -> FunctionRecord:
    return await find_function(request.app, tenant_of(request), name)


async def find_function(app: web.Application, tenant: str, name: str) -> FunctionRecord:
    """``tenant``'s function ``name`` (``NotFound`` naming ``model_name`` without one), for a
    request of any protocol."""
    if not _NAME.match(name):  # no function has it: not looked up
        raise NotFound(f"model {name!r} not found", field="model_name")
    await reconnected_nats(app)
    try:
        record = await app[FUNCTIONS].get(tenant, name)
    except (nats.errors.Error, TimeoutError) as exc:
        raise Unavailable(f"cannot read the function registry: {exc!r}") from None
    if record is None:
        raise NotFound(f"model {name!r} not found", field="model_name")
    return record


def untagged(value: Any) -> Any:
    """Plain JSON of a message for HTTP clients: the ``type`` version tags removed."""
    if isinstance(value, dict):
        return {k: untagged(v) for k, v in value.items() if k != "type"}
    if isinstance(value, list):
        return [untagged(v) for v in value]
    return value


def function_json(record: FunctionRecord) -> dict[str, Any]:
    out: dict[str, Any] = untagged(to_builtins(record))
    return out


def model_metadata(record: FunctionRecord) -> dict[str, Any]:
    def spec(s: Any) -> dict[str, Any]:
        return {"name": s.name, "datatype": s.datatype, "shape": s.shape}

    return {
        "name": record.spec.name,
        "versions": ["1"],
        "platform": f"gpufaas/{record.spec.model.architecture}",
        "inputs": [spec(s) for s in record.inputs],
        "outputs": [spec(s) for s in record.outputs],
    }


# --- Open Inference Protocol ---------------------------------------------------------


async def live(_: web.Request) -> web.Response:
    return json_response({"live": True})


async def ready(request: web.Request) -> web.Response:
    ok = request.app[NC].is_connected
    return json_response({"ready": ok}, 200 if ok else 503)


async def server_metadata(request: web.Request) -> web.Response:
    extensions = ["binary_tensor_data", "system_shared_memory", "model_repository"]
    if request.app[sysshm.REGIONS].cuda_devices:
        extensions.append("cuda_shared_memory")
    return json_response({"name": "gpufaas", "version": VERSION, "extensions": extensions})


async def model_get(request: web.Request) -> web.Response:
    return json_response(
        model_metadata(await require_function(request, request.match_info["name"]))
    )


async def model_ready(request: web.Request) -> web.Response:
    record = await require_function(request, request.match_info["name"])
    return json_response({"name": record.spec.name, "ready": True})


async def infer(request: web.Request) -> web.Response:
    """``POST /v2/models/{name}/infer``: JSON tensors, binary ones (``binary.py``) or
    ones in the client's shared memory (``sysshm.py``)."""
    config = request.app[CONFIG]
    name = request.match_info["name"]
    req = await binary.read_infer(request)
    body = req.body
    record = await require_function(request, name)
    wanted = [o.name for o in body.outputs] if body.outputs else None
    check_inputs(body.inputs, wanted, record.spec.name, record.inputs, record.outputs)
    check_input_sizes(body.inputs, record.spec.options.max_rows, config.max_body_bytes)
    tensors = await binary.decode_inputs(request, req)
    reply, outs = await run_function(request, record, tensors, wanted)
    outputs, chunks = await binary.encode_outputs(request, req, outs)
    return _infer_response(name, body.id, reply, outputs, chunks)


def json_output(out: Tensor) -> dict[str, Any]:
    """An output as a JSON tensor of the protocol."""
    return {
        "name": out.name,
        "datatype": out.datatype,
        "shape": out.shape,
        "data": raw_to_json(out.datatype, out.shape, out.data),
    }


def _infer_response(
    name: str,
    request_id: str | None,
    reply: InvokeReply,
    outputs: list[dict[str, Any]],
    chunks: list[bytes | memoryview] | None = None,
) -> web.Response:
    """An invocation's reply: its outputs (binary ones' ``chunks`` after the JSON), where
    it ran and where its time went (in the body's ``parameters`` and in ``Gpufaas-*``
    headers)."""
    b = reply.breakdown
    headers = {
        "Gpufaas-Node": reply.node,
        "Gpufaas-Device": reply.device,
        "Gpufaas-Queue-Us": str(b.queue_us),
        "Gpufaas-Transfer-Us": str(b.transfer_us),
        "Gpufaas-Load-Us": str(b.load_us),
        "Gpufaas-Compute-Us": str(b.compute_us),
        "Gpufaas-Cold": "1" if b.cold else "0",
        "Gpufaas-Batch": str(b.batch),
        "Gpufaas-Worker-Us": str(b.worker_us),
        "Gpufaas-New-Process": "1" if b.new_process else "0",
        "Gpufaas-Loaded-Bytes": str(b.loaded_bytes),
    }
    result: dict[str, Any] = {"model_name": name, "model_version": "1", "outputs": outputs}
    if request_id is not None:
        result["id"] = request_id
    result["parameters"] = {
        "node": reply.node,
        "device": reply.device,
        "breakdown_us": {
            "queue": b.queue_us,
            "transfer": b.transfer_us,
            "load": b.load_us,
            "compute": b.compute_us,
            "total": b.total_us,
            "worker": b.worker_us,
        },
        "batch": b.batch,
        "new_process": b.new_process,
        "loaded_bytes": b.loaded_bytes,
    }
    return binary.response(result, headers, chunks or [])


# --- platform API --------------------------------------------------------------------


async def check_model_source(request: web.Request, source: ModelSource) -> ModelSource:
    """A server path (``model.path``) only from an admin key, only under the model roots;
    the source with the path resolved (what was checked is what is read). A tenant's key
    is refused before any file is looked at."""
    if source.path is None:
        return source
    validate_source(source)  # its shape first (no file access): the same 400 for everyone
    if not caller_of(request).admin:
        raise PermissionDenied(
            "model.path (a directory on the server) needs an admin key; upload the model "
            "instead (POST /v1/models)",
            field="model.path",
        )
    roots = request.app[CONFIG].model_roots
    resolved = await asyncio.to_thread(check_server_path, source.path, roots)
    return msgspec.structs.replace(source, path=str(resolved))


async def functions_post(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    body = convert(await read_json(request), DeployBody)
    model = await check_model_source(request, body.model)
    await models.require_upload(request, model)  # the caller's own upload, or 404
    spec = FunctionSpec(
        name=body.name, model=model, options=body.options, tenant=tenant_of(request)
    )
    reply = await ask_scheduler(
        request,
        subjects.SCHED_DEPLOY,
        DeployRequest(spec=spec),
        DeployReply,
        timeout=config.deploy_timeout_s + 5,
    )
    return json_response(function_json(reply.function), 201 if reply.created else 200)


def function_view(
    app: web.Application, record: FunctionRecord, profile: ProfileRecord | None
) -> dict[str, Any]:
    """A function's record with the configuration its profile chose (``profile``: batch
    size, concurrency, why, and the measured points; ``complete`` false while the
    background profile runs) and its requests queued and running (``load``: summed over
    the scheduler replicas' latest reports)."""
    out = function_json(record)
    if profile is not None and profile.spec == record.spec:  # this deployment's profile
        out["profile"] = untagged(to_builtins(profile))
        del out["profile"]["spec"]
    out["load"] = app[LOADS].of(FunctionRef(record.spec.tenant, record.spec.name).key).to_json()
    return out


async def functions_list(request: web.Request) -> web.Response:
    nats_of(request)
    tenant = tenant_of(request)
    found = await records(request.app[KV].functions, tenant)
    profiles = {
        e.value.spec.name: e.value for e in await request.app[KV].profiles.items(f"{tenant}.")
    }
    views = [function_view(request.app, r, profiles.get(r.spec.name)) for r in found]
    return json_response({"functions": views})


async def function_get(request: web.Request) -> web.Response:
    """A function's record, its profile's choice and its load (see ``function_view``)."""
    record = await require_function(request, request.match_info["name"])
    ref = FunctionRef(record.spec.tenant, record.spec.name)
    profile = await request.app[KV].profiles.value(ref.key)
    return json_response(function_view(request.app, record, profile))


async def function_delete(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if not _NAME.match(name):
        raise NotFound(f"function {name!r} not found", field="name")
    reply = await ask_scheduler(
        request,
        subjects.SCHED_DELETE,
        DeleteRequest(name=name, tenant=tenant_of(request)),
        DeleteReply,
    )
    return json_response({"deleted": reply.name})


# --- workflows -----------------------------------------------------------------------------


async def _require_workflow(request: web.Request, name: str) -> WorkflowRecord:
    if not _NAME.match(name):
        raise NotFound(f"workflow {name!r} not found", field="name")
    await reconnected_nats(request.app)
    record = await request.app[WORKFLOWS].record(FunctionRef(tenant_of(request), name))
    if record is None:
        raise NotFound(f"workflow {name!r} not found", field="name")
    return record


def workflow_json(record: WorkflowRecord) -> dict[str, Any]:
    return cast(dict[str, Any], untagged(to_builtins(record)))


async def workflows_post(request: web.Request) -> web.Response:
    body = convert(await read_json(request), WorkflowBody)
    spec = WorkflowSpec(
        name=body.name,
        steps=body.steps,
        outputs=body.outputs,
        slo_ms=body.slo_ms,
        tenant=tenant_of(request),
    )
    reply = await ask_scheduler(
        request,
        subjects.SCHED_WORKFLOW_DEPLOY,
        WorkflowDeployRequest(spec=spec),
        WorkflowDeployReply,
    )
    return json_response(workflow_json(reply.workflow), 201 if reply.created else 200)


async def workflows_list(request: web.Request) -> web.Response:
    tenant = tenant_of(request)
    nats_of(request)
    entries = await request.app[KV].workflows.items(f"{tenant}.")
    return json_response({"workflows": [workflow_json(e.value) for e in entries]})


async def workflow_get(request: web.Request) -> web.Response:
    return json_response(
        workflow_json(await _require_workflow(request, request.match_info["name"]))
    )


async def workflow_delete(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    await _require_workflow(request, name)
    reply = await ask_scheduler(
        request,
        subjects.SCHED_WORKFLOW_DELETE,
        WorkflowDeleteRequest(name=name, tenant=tenant_of(request)),
        WorkflowDeleteReply,
    )
    # Gone for this gateway's next request at once, not when its watch hears of it.
    request.app[WORKFLOWS].drop(FunctionRef(tenant_of(request), name).key)
    return json_response({"deleted": reply.name})


async def workflow_infer(request: web.Request) -> web.Response:
    """Invoke a workflow with Open Inference Protocol inputs; each step's run is reported."""
    config = request.app[CONFIG]
    req = await binary.read_infer(request)
    body = req.body
    record = await _require_workflow(request, request.match_info["name"])
    spec = record.spec
    wanted = [o.name for o in body.outputs] if body.outputs else None
    check_inputs(body.inputs, wanted, spec.name, record.inputs, record.outputs)
    check_input_sizes(body.inputs, c.DEFAULT_MAX_ROWS, config.max_body_bytes)
    tensors = await binary.decode_inputs(request, req)
    reply, outs = await run_workflow(request, record, tensors, wanted)
    outputs, chunks = await binary.encode_outputs(request, req, outs)
    steps = [untagged(to_builtins(s)) for s in reply.steps]
    result: dict[str, Any] = {
        "model_name": spec.name,
        "outputs": outputs,
        "parameters": {"steps": steps, "total_us": reply.total_us},
    }
    if body.id is not None:
        result["id"] = body.id
    return binary.response(result, {}, chunks)


def _device_order(device: dict[str, Any]) -> tuple[int, int]:
    """host first, then gpu:0, gpu:1, ... whichever heartbeat listed them first."""
    name = str(device["name"])
    return (0, 0) if name == "host" else (1, gpu_number(name))


async def _store_stats(nc: NATS, node: str) -> dict[str, Any] | None:
    """A node's tensor store figures per tier, or None if it does not answer within a second."""
    subject = subjects.node(node, "tensorstore", subjects.TENSORSTORE_STATS)
    try:
        stats = await nats_request(nc, subject, StoreStatsRequest(), StoreStats, timeout=1)
    except PlatformError:
        return None
    body: dict[str, Any] = untagged(to_builtins(stats))
    body.pop("node", None)
    tiers = {"host": body}
    for dev in body.pop("devices"):  # one entry per tier: "host", "gpu:0", ...
        tiers[dev.pop("device")] = dev
    return tiers


async def _memory_stats(nc: NATS, node: str) -> dict[str, Any] | None:
    """A node's memory pools (per device: segments held, blocks, holds, fragmentation) and
    reservations, or None if its memory service does not answer within a second."""
    subject = subjects.node(node, "memory", subjects.MEMORY_STATS)
    try:
        stats = await nats_request(nc, subject, MemStatsRequest(), MemStatsReply, timeout=1)
    except PlatformError:
        return None
    pools = {
        p.device: {k: v for k, v in untagged(to_builtins(p)).items() if k != "device"}
        for p in stats.pools
    }
    return {"pools": pools, "reserved": dict(stats.reserved)}


async def _link_stats(nc: NATS, node: str) -> dict[str, Any] | None:
    """A node's topology links (endpoints, kind, GB/s per direction) with the bytes each has
    carried each way, or None if its transfer service does not answer within a second."""
    subject = subjects.node(node, "transfer", subjects.TRANSFER_LINKS)
    try:
        reply = await nats_request(nc, subject, LinksRequest(), LinksReply, timeout=1)
    except PlatformError:
        return None
    return cast(dict[str, Any], untagged(to_builtins(reply)))


def _own_reservations(memory: dict[str, Any] | None, tenant: str) -> dict[str, Any] | None:
    """A node's memory figures with only ``tenant``'s reservations (keyed ``"<device>
    <tenant>.<function>"``): a tenant never learns another's function names."""
    if memory is None:
        return None
    own = {
        k: v for k, v in memory["reserved"].items() if k.partition(" ")[2].startswith(f"{tenant}.")
    }
    return {**memory, "reserved": own}


async def nodes_list(request: web.Request) -> web.Response:
    """Live nodes: services, devices, links (with the bytes each carried), tensor store and
    memory figures (a tenant's key sees only its own functions' reservations; an admin key
    sees all). Each node's services are asked at once, each answer awaited a second."""
    nc = nats_of(request)
    config = request.app[CONFIG]
    caller = caller_of(request)
    nodes = await alive(request.app[KV].nodes, config.node_ttl_s)
    names = sorted(nodes)
    stores, memories, links = await asyncio.gather(
        asyncio.gather(*(_store_stats(nc, node) for node in names)),
        asyncio.gather(*(_memory_stats(nc, node) for node in names)),
        asyncio.gather(*(_link_stats(nc, node) for node in names)),
    )
    if not caller.sees_all:
        memories = [_own_reservations(m, caller.tenant) for m in memories]
    deployed = await records(request.app[KV].functions, None if caller.sees_all else caller.tenant)
    out = []
    for (node, beats), store, memory, link in zip(
        sorted(nodes.items()), stores, memories, links, strict=True
    ):
        devices: dict[str, Any] = {}
        for beat in beats:
            for d in beat.devices:  # the memory service lists them; the worker adds usage
                if d.name not in devices or d.used_bytes > devices[d.name]["used_bytes"]:
                    devices[d.name] = untagged(to_builtins(d))
        for device, names in _instances_on(node, beats, deployed).items():
            if device in devices:
                devices[device]["functions"] = names
        out.append(
            {
                "node": node,
                "services": {
                    b.service: {
                        "pid": b.pid,
                        "started_at": b.started_at,
                        "updated_at": b.updated_at,
                    }
                    for b in sorted(beats, key=lambda b: b.service)
                },
                "devices": sorted(devices.values(), key=_device_order),
                "tensor_store": store,
                "memory": memory,
                "links": link,
            }
        )
    return json_response({"nodes": out})


def _instances_on(
    node: str, beats: list[Heartbeat], deployed: list[FunctionRecord]
) -> dict[str, list[str]]:
    """The functions (``tenant.name``) with an instance on each device of ``node``."""
    gpus = node_gpus_of(beats)
    out: dict[str, list[str]] = {}
    for record in deployed:
        if node in record.nodes:
            for device in instance_devices(record, node, gpus):
                key = FunctionRef(record.spec.tenant, record.spec.name).key
                out.setdefault(device, []).append(key)
    return out


def _visible_to(event: bytes, tenant: str | None) -> bool:
    """A tenant sees platform events and its own, never another tenant's (``None``: an
    admin key, which sees every event)."""
    try:
        owner = orjson.loads(event).get("data", {}).get("tenant")
    except (orjson.JSONDecodeError, AttributeError):
        return False
    return tenant is None or owner is None or owner == tenant


async def _replay_from(request: web.Request, nc: NATS) -> ConsumerConfig:
    """Where an event stream starts: ``replay`` (new, last, all) or ``Last-Event-ID``;
    a replay sends at most the latest ``GPUFAAS_EVENTS_REPLAY_MAX`` events."""
    replay = request.query.get("replay", "new")
    last_id = request.headers.get("Last-Event-ID")
    if last_id is not None or replay == "all":  # from there, at most the latest N events
        if last_id is not None and not re.fullmatch(r"[0-9]{1,20}", last_id):
            raise InvalidArgument(
                "Last-Event-ID must be a stream sequence number", field="Last-Event-ID"
            )
        wanted = int(last_id) + 1 if last_id is not None else 0
        start = await replay_start(nc.jetstream(), wanted, request.app[CONFIG].events_replay_max)
        return ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start)
    if replay in ("new", "last"):
        return ConsumerConfig(deliver_policy=DeliverPolicy(replay))
    raise InvalidArgument("replay must be all, new or last", field="replay")


async def events_sse(request: web.Request) -> web.StreamResponse:
    """Server-Sent Events relaying the EVENTS stream (``?kinds=function.*&replay=all``).

    Each client sees the platform's events and its own tenant's, not other tenants'.
    """
    nc = nats_of(request)
    caller = caller_of(request)
    tenant = None if caller.sees_all else caller.tenant
    kinds = request.query.get("kinds", ">")
    try:
        filt = subjects.event_filter(kinds)
    except ValueError:
        raise InvalidArgument(
            f"kinds {kinds!r} is not an event kind pattern", field="kinds"
        ) from None
    consumer = await _replay_from(request, nc)
    sub = await nc.jetstream().subscribe(filt, ordered_consumer=True, config=consumer)
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            REQUEST_ID_HEADER: request[REQUEST_ID],
        }
    )
    await resp.prepare(request)
    try:
        await resp.write(b": connected\n\n")
        quiet = 0  # seconds without an event: a keep-alive every 15
        while True:
            try:
                msg = await sub.next_msg(timeout=1)
            except nats.errors.TimeoutError:
                # A client gone is noticed within a second (its stream place freed).
                if request.transport is None or request.transport.is_closing():
                    break
                quiet += 1
                if quiet >= 15:
                    await resp.write(b": keep-alive\n\n")
                    quiet = 0
                continue
            quiet = 0
            if not _visible_to(msg.data, tenant):
                continue
            seq = msg.metadata.sequence.stream
            kind = subjects.event_kind(msg.subject)
            await resp.write(b"id: %d\nevent: %s\ndata: %s\n\n" % (seq, kind.encode(), msg.data))
    except (ConnectionResetError, nats.errors.ConnectionClosedError):
        pass
    finally:
        await sub.unsubscribe()
    return resp


async def metrics(request: web.Request) -> web.Response:
    """The gateway's own metrics, then every service's per endpoint and loop (what they
    answer to one stats broadcast within a quarter of a second). Admin keys only, unless
    ``GPUFAAS_METRICS_PUBLIC``: they describe the whole platform, tenants' worker
    subjects included."""
    if not request.app[CONFIG].metrics_public:
        require_admin(request, "/metrics")
    services = exposition(await gather(request.app[NC]))
    return web.Response(
        body=generate_latest(request.app[METRICS].registry) + services,
        content_type="text/plain",
        charset="utf-8",
    )


# --- app -----------------------------------------------------------------------------

EVENTS_PARAMS = (
    Param("kinds", "query", {"type": "string"}, "event kinds, e.g. function.* (default: all)"),
    Param("replay", "query", {"enum": ["new", "last", "all"]}, "where to start (default: new)"),
    Param("Last-Event-ID", "header", {"type": "string"}, "resume after this event's id"),
)
ROUTES: list[tuple[RouteDoc, Handler]] = [
    (RouteDoc("GET", "/v2/health/live", "Liveness", public=True), live),
    (RouteDoc("GET", "/v2/health/ready", "Readiness (NATS reachable)", public=True), ready),
    (RouteDoc("GET", "/v2", "Server metadata"), server_metadata),
    (RouteDoc("GET", "/v2/models/{name}", "Model metadata"), model_get),
    (RouteDoc("GET", "/v2/models/{name}/ready", "Model readiness"), model_ready),
    (
        RouteDoc(
            "POST", "/v2/models/{name}/infer", "Inference (JSON, binary or shm tensors)", InferBody
        ),
        admitted(infer),
    ),
    (
        RouteDoc("POST", "/v1/functions", "Deploy a function", DeployBody, ok=201, exists_ok=True),
        functions_post,
    ),
    (RouteDoc("GET", "/v1/functions", "List functions"), functions_list),
    (RouteDoc("GET", "/v1/functions/{name}", "Get a function"), function_get),
    (RouteDoc("DELETE", "/v1/functions/{name}", "Delete a function"), function_delete),
    (
        RouteDoc(
            "POST",
            "/v1/workflows",
            "Deploy a workflow (a DAG of functions)",
            WorkflowBody,
            ok=201,
            exists_ok=True,
        ),
        workflows_post,
    ),
    (RouteDoc("GET", "/v1/workflows", "List workflows"), workflows_list),
    (RouteDoc("GET", "/v1/workflows/{name}", "Get a workflow"), workflow_get),
    (RouteDoc("DELETE", "/v1/workflows/{name}", "Delete a workflow"), workflow_delete),
    (
        RouteDoc(
            "POST",
            "/v1/workflows/{name}/infer",
            "Invoke a workflow (JSON, binary or shm tensors)",
            InferBody,
        ),
        admitted(workflow_infer),
    ),
    (RouteDoc("GET", "/v1/nodes", "Live nodes, their services and devices"), nodes_list),
    (
        RouteDoc(
            "GET",
            "/v1/events",
            "Server-Sent Events from the EVENTS stream",
            params=EVENTS_PARAMS,
        ),
        capped_streams(events_sse),
    ),
    (RouteDoc("GET", "/metrics", "Prometheus metrics (admin keys)"), metrics),
    *keys.ROUTES,
]


async def _nudge(link: Link, _msg: NatsMsg) -> None:
    """Invocations in flight go again (``resend=True``): the replica that had them may
    have lost them, or its answer, with the NATS server it reconnected from."""
    if link.nudge():
        log.info("gateway.resend_after_scheduler_reconnect")


async def _worker_exited(deaths: Deaths, msg: NatsMsg) -> None:
    if (said := worker_deaths.exited(msg)) is not None:
        deaths.died(*said)


async def _worker_reconnected(deaths: Deaths, msg: NatsMsg) -> None:
    if (said := worker_deaths.reconnected(msg)) is not None:
        deaths.died(*said, died=False)


async def _nats_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    nc = await connect_nats(config, "gpufaas-gateway")
    app[NC] = nc
    js = nc.jetstream()
    buckets = await wait_for_jetstream(nc, config)
    app[KV] = TypedBuckets(js, buckets)
    app[FUNCTIONS] = FunctionCache(app[KV].functions)
    app[WORKFLOWS] = Mirror(app[KV].workflows)
    app[KEYS] = KeyCache(app[KV].keys)
    await nc.subscribe(subjects.SCHED_LOAD, cb=app[LOADS].on_msg)  # queues, for the console
    if (link := link_of(nc)) is not None:  # a scheduler replica is back: send invokes again
        await nc.subscribe(subjects.SCHED_RECONNECTED, cb=functools.partial(_nudge, link))
    # A worker process died or reconnected: direct sends to it go through a scheduler now.
    deaths = app[direct.ROUTES].deaths
    await nc.subscribe(
        subjects.event("worker.exited"), cb=functools.partial(_worker_exited, deaths)
    )
    await nc.subscribe(
        subjects.WORKERS_RECONNECTED, cb=functools.partial(_worker_reconnected, deaths)
    )
    stats = LoopCounter("functions-watch")
    watches = {
        asyncio.create_task(
            follow(app[KV].functions, app[FUNCTIONS].on_change, stats),
            name="gateway:functions-watch",
        ),
        asyncio.create_task(
            follow(app[KV].workflows, app[WORKFLOWS].on_change, LoopCounter("workflows-watch")),
            name="gateway:workflows-watch",
        ),
        # Revocations reach this gateway as fast as the watch delivers them.
        asyncio.create_task(
            follow(app[KV].keys, app[KEYS].on_change, LoopCounter("keys-watch")),
            name="gateway:keys-watch",
        ),
    }
    yield
    # Cancelled again until they end (nats-py can swallow one cancellation), never awaited
    # without a deadline: a stuck watch must not hang the gateway's shutdown.
    await cancel_and_wait(watches)
    for watch in watches:
        if watch.done() and not watch.cancelled():
            with contextlib.suppress(nats.errors.Error):
                watch.result()
    await close_nats(nc, drain=True)


def create_app(config: Config) -> web.Application:
    """The gateway application; NATS is connected when the app starts up."""
    warn_if_open(config)
    app = web.Application(
        middlewares=[errors_middleware, auth_middleware(config, publish_event)],
        client_max_size=config.max_body_bytes,
    )
    app[CONFIG] = config
    app[METRICS] = Metrics()
    app[ADMISSION] = Admission.from_config(config)
    app[direct.ROUTES] = direct.DirectRoutes()
    # A replica silent for three autoscaling ticks is gone: its queues stop counting.
    app[LOADS] = loads.Loads(horizon_s=3 * config.autoscale_interval_s)
    app[METRICS].registry.register(loads.LoadsCollector(app[LOADS]))
    app.cleanup_ctx.append(_nats_ctx)
    app.cleanup_ctx.append(models.uploads_ctx)  # after NATS: it opens the uploads' buckets
    app.cleanup_ctx.append(sysshm.regions_ctx)  # clients' shared-memory regions (per gateway)
    app.cleanup_ctx.append(grpc_server.grpc_ctx)  # after NATS: it serves from its caches
    app[openai_api.TOKENS] = TokenCounter(config.data_dir)
    routes = [
        *ROUTES,
        *models.ROUTES,
        *openai_api.ROUTES,
        *repository.ROUTES,
        *sysshm.ROUTES,
        *console.ROUTES,
    ]
    docs = [doc for doc, _ in routes] + [RouteDoc("GET", "/openapi.json", "This document")]
    app[ERROR_SHAPES] = {doc.path: doc.errors for doc in docs if doc.errors is not None}
    spec = build_openapi(docs, VERSION)

    async def openapi(_: web.Request) -> web.Response:
        return json_response(spec)

    for doc, handler in [*routes, (docs[-1], openapi)]:
        app.router.add_route(doc.method, doc.path, handler)
    return app
