"""The Open Inference Protocol over gRPC: KServe v2's ``inference.GRPCInferenceService``.

A ``grpc.aio`` server in the gateway process, on ``GPUFAAS_GRPC_PORT`` (0: none), started
and stopped with the aiohttp application (:func:`grpc_ctx`). It shares the HTTP routes'
invocation core (:mod:`gpufaas.gateway.inference`), API keys (metadata ``authorization:
Bearer <key>``; ``x-gpufaas-tenant`` for admin keys), per-tenant admission and error
table: :data:`STATUS` gives each error code its gRPC status. Liveness and readiness need
no key, as over HTTP. System shared memory uses the HTTP routes' registry
(:class:`sysshm.Regions`, one per gateway), scoped to the caller's tenant, and so does
CUDA shared memory on a node with CUDA (elsewhere UNIMPLEMENTED, as Triton's answer where
it is not supported). Failed calls carry ``gpufaas-error-code``, ``gpufaas-error-field``
and ``retry-after`` in their trailing metadata; every call's ``x-request-id`` too.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Final, NoReturn, TypeVar

import grpc
import grpc.aio
import structlog
from aiohttp import web
from multidict import CIMultiDict

from gpufaas.gateway import app as gw
from gpufaas.gateway.admission import ADMISSION, check_input_sizes
from gpufaas.gateway.auth import (
    ACTED_AS,
    KEYS,
    Caller,
    authenticate_headers,
    unverified_caller,
)
from gpufaas.gateway.bodies import ShmRegisterBody
from gpufaas.gateway.cudashm import CudaRegion
from gpufaas.gateway.grpc_tensors import (
    decode_inputs,
    encode_outputs,
    heads,
    shm_inputs,
    shm_outputs,
)
from gpufaas.gateway.inference import Call, check_inputs, run_function
from gpufaas.gateway.proto import grpc_service_pb2 as pb
from gpufaas.gateway.proto import grpc_service_pb2_grpc as pbg
from gpufaas.gateway.sysshm import CUDA_UNSUPPORTED, REGIONS, check_region_name
from gpufaas.shared.errors import (
    Internal,
    NotFound,
    PlatformError,
    Unavailable,
)
from gpufaas.shared.messages import FunctionRecord, InvokeReply, convert

log = structlog.get_logger()
T = TypeVar("T")
Context = grpc.aio.ServicerContext[object, object]

SERVICE: Final = "inference.GRPCInferenceService"
REQUEST_ID_KEY: Final = "x-request-id"
# Room for a message's framing over the largest body the HTTP routes take.
MESSAGE_SLACK_BYTES: Final = 1 << 20

# Error code (shared/errors.py's table) -> gRPC status: the one place they are decided
# (tests/unit/test_grpc_proto.py checks that every code has one).
STATUS: Final[dict[str, grpc.StatusCode]] = {
    "invalid_argument": grpc.StatusCode.INVALID_ARGUMENT,
    "unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
    "permission_denied": grpc.StatusCode.PERMISSION_DENIED,
    "quota_exceeded": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "already_exists": grpc.StatusCode.ALREADY_EXISTS,
    "payload_too_large": grpc.StatusCode.RESOURCE_EXHAUSTED,  # as gRPC's own size limit
    "unsupported_media_type": grpc.StatusCode.INVALID_ARGUMENT,
    "model_invalid": grpc.StatusCode.FAILED_PRECONDITION,
    "overloaded": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "resource_exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "deadline_exceeded": grpc.StatusCode.DEADLINE_EXCEEDED,
    "internal": grpc.StatusCode.INTERNAL,
}


def status_of(exc: PlatformError) -> grpc.StatusCode:
    return STATUS.get(exc.code, grpc.StatusCode.INTERNAL)


def details_of(exc: PlatformError) -> str:
    """An error's message, naming its field (gRPC has one string for both)."""
    return f"{exc.message} (field {exc.field})" if exc.field else exc.message


def _metadata(context: Context) -> CIMultiDict[str]:
    """The call's text metadata, case-insensitive like HTTP headers."""
    return CIMultiDict((k, v) for k, v in context.invocation_metadata() or () if isinstance(v, str))


async def _abort(context: Context, exc: PlatformError, request_id: str) -> NoReturn:
    trailing = [(REQUEST_ID_KEY, request_id), ("gpufaas-error-code", exc.code)]
    if exc.field is not None:
        trailing.append(("gpufaas-error-field", exc.field))
    if exc.retry_after_s is not None:
        trailing.append(("retry-after", str(max(1, round(exc.retry_after_s)))))
    await context.abort(status_of(exc), details_of(exc), tuple(trailing))


class InferenceServicer(pbg.GRPCInferenceServiceServicer):
    """``GRPCInferenceService`` over one gateway application (its NATS, caches, limits)."""

    def __init__(self, app: web.Application) -> None:
        self.app = app

    async def _caller(self, context: Context, request_id: str, method: str) -> Caller:
        headers = _metadata(context)
        if not self.app[gw.CONFIG].auth:
            return unverified_caller(headers)
        caller = await authenticate_headers(headers, self.app[KEYS])
        if caller.acting:
            data = {"tenant": caller.tenant, "key_id": caller.key_id}
            data |= {"method": "gRPC", "path": f"/{SERVICE}/{method}"}
            await gw.publish_app_event(self.app, request_id, ACTED_AS, data)
        return caller

    async def _serve(
        self,
        context: Context,
        method: str,
        work: Callable[[Caller | None, Call], Awaitable[T]],
        *,
        open_: bool = False,
    ) -> T:
        """``work`` for an authenticated caller (none for ``open_`` methods), its errors
        turned into the call's status."""
        meta = _metadata(context)
        request_id = meta.get(REQUEST_ID_KEY) or uuid.uuid4().hex
        context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
        with structlog.contextvars.bound_contextvars(request_id=request_id):
            try:
                caller = None if open_ else await self._caller(context, request_id, method)
                return await work(caller, Call(self.app, request_id))
            except PlatformError as exc:
                error = exc
            except Exception:
                log.exception("grpc.crashed", method=method)
                error = Internal("internal error; see the gateway log")
        return await _abort(context, error, request_id)

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: Context
    ) -> pb.ServerLiveResponse:
        async def work(_: Caller | None, __: Call) -> pb.ServerLiveResponse:
            return pb.ServerLiveResponse(live=True)

        return await self._serve(context, "ServerLive", work, open_=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: Context
    ) -> pb.ServerReadyResponse:
        async def work(_: Caller | None, __: Call) -> pb.ServerReadyResponse:
            return pb.ServerReadyResponse(ready=self.app[gw.NC].is_connected)

        return await self._serve(context, "ServerReady", work, open_=True)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Context
    ) -> pb.ServerMetadataResponse:
        async def work(_: Caller | None, __: Call) -> pb.ServerMetadataResponse:
            extensions = ["system_shared_memory"]
            if self.app[REGIONS].cuda_devices:
                extensions.append("cuda_shared_memory")
            return pb.ServerMetadataResponse(
                name="gpufaas", version=gw.VERSION, extensions=extensions
            )

        return await self._serve(context, "ServerMetadata", work)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: Context
    ) -> pb.ModelReadyResponse:
        """Ready when the caller's tenant has the function (not ready, rather than an
        error, when it has none: what a readiness probe wants)."""

        async def work(caller: Caller | None, _: Call) -> pb.ModelReadyResponse:
            try:
                await self._function(caller, request.name, request.version)
            except NotFound:
                return pb.ModelReadyResponse(ready=False)
            return pb.ModelReadyResponse(ready=True)

        return await self._serve(context, "ModelReady", work)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Context
    ) -> pb.ModelMetadataResponse:
        async def work(caller: Caller | None, _: Call) -> pb.ModelMetadataResponse:
            meta = gw.model_metadata(await self._function(caller, request.name, request.version))
            tensor = pb.ModelMetadataResponse.TensorMetadata
            return pb.ModelMetadataResponse(
                name=meta["name"],
                versions=meta["versions"],
                platform=meta["platform"],
                inputs=[tensor(**t) for t in meta["inputs"]],
                outputs=[tensor(**t) for t in meta["outputs"]],
            )

        return await self._serve(context, "ModelMetadata", work)

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: Context
    ) -> pb.ModelInferResponse:
        async def work(caller: Caller | None, call: Call) -> pb.ModelInferResponse:
            assert caller is not None
            with self.app[ADMISSION].request(caller.tenant):
                return await self._infer(caller, call, request)

        return await self._serve(context, "ModelInfer", work)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """One response per request, in order; a request's error is its response's
        ``error_message`` and the stream goes on. The stream holds one of its tenant's
        stream places, and each request one of its in-flight places."""

        async def begin(caller: Caller | None, call: Call) -> tuple[Caller, Call]:
            assert caller is not None
            return caller, call

        caller, call = await self._serve(context, "ModelStreamInfer", begin)
        admission = self.app[ADMISSION]
        try:
            with admission.stream(caller.tenant):
                n = 0
                async for request in request_iterator:
                    n += 1
                    one = Call(call.app, f"{call.request_id}.{n}")
                    yield await self._stream_one(caller, one, request)
        except PlatformError as exc:  # no stream place left
            await _abort(context, exc, call.request_id)

    async def _stream_one(
        self, caller: Caller, call: Call, request: pb.ModelInferRequest
    ) -> pb.ModelStreamInferResponse:
        with structlog.contextvars.bound_contextvars(request_id=call.request_id):
            try:
                with self.app[ADMISSION].request(caller.tenant):
                    response = await self._infer(caller, call, request)
                return pb.ModelStreamInferResponse(infer_response=response)
            except PlatformError as exc:
                error = exc
            except Exception:
                log.exception("grpc.crashed", method="ModelStreamInfer")
                error = Internal("internal error; see the gateway log")
        failed = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
        return pb.ModelStreamInferResponse(error_message=details_of(error), infer_response=failed)

    async def _function(self, caller: Caller | None, name: str, version: str) -> FunctionRecord:
        assert caller is not None
        record = await gw.find_function(self.app, caller.tenant, name)
        if version not in ("", "1"):
            raise NotFound(
                f"model {name!r} has no version {version!r}; its only version is 1",
                field="model_version",
            )
        return record

    async def _infer(
        self, caller: Caller, call: Call, request: pb.ModelInferRequest
    ) -> pb.ModelInferResponse:
        """One inference: heads, sizes and shared-memory references checked before the
        data is decoded."""
        record = await self._function(caller, request.model_name, request.model_version)
        wanted = [o.name for o in request.outputs] or None
        inputs = heads(request)
        check_inputs(inputs, wanted, record.spec.name, record.inputs, record.outputs)
        max_bytes = self.app[gw.CONFIG].max_body_bytes
        check_input_sizes(inputs, record.spec.options.max_rows, max_bytes)
        in_refs, out_refs = shm_inputs(request), shm_outputs(request)
        regions, tenant = self.app[REGIONS], caller.tenant
        for ref in out_refs.values():
            regions.check(tenant, ref, output=True)
        datatypes = {s.name: s.datatype for s in record.inputs}
        shm = {
            i: await regions.read_input(tenant, ref, datatypes[h.name], h.shape, max_bytes)
            for i, (ref, h) in enumerate(zip(in_refs, inputs, strict=True))
            if ref is not None
        }
        tensors = decode_inputs(request, datatypes, shm)
        reply, outputs = await run_function(call, record, tensors, wanted)
        response = pb.ModelInferResponse(
            model_name=record.spec.name, model_version="1", id=request.id
        )
        _add_parameters(response, reply)
        written = {
            o.name: await regions.write_output(tenant, out_refs[o.name], o.data)
            for o in outputs
            if o.name in out_refs
        }
        typed = not request.raw_input_contents and len(shm) < len(inputs)
        encode_outputs(response, outputs, typed, written)
        return response

    # --- system and CUDA shared memory (sysshm.py's registry) ---------------------------

    async def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, context: Context
    ) -> pb.SystemSharedMemoryStatusResponse:
        async def work(caller: Caller | None, _: Call) -> pb.SystemSharedMemoryStatusResponse:
            assert caller is not None
            name = request.name or None
            if name is not None:
                check_region_name(name)
            response = pb.SystemSharedMemoryStatusResponse()
            for region in self.app[REGIONS].status(caller.tenant, name):
                response.regions[region["name"]].CopyFrom(
                    pb.SystemSharedMemoryStatusResponse.RegionStatus(**region)
                )
            return response

        return await self._serve(context, "SystemSharedMemoryStatus", work)

    async def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest, context: Context
    ) -> pb.SystemSharedMemoryRegisterResponse:
        async def work(caller: Caller | None, _: Call) -> pb.SystemSharedMemoryRegisterResponse:
            assert caller is not None
            fields = {"key": request.key, "offset": request.offset}
            body = convert(fields | {"byte_size": request.byte_size}, ShmRegisterBody)
            self.app[REGIONS].register(caller.tenant, request.name, body)
            return pb.SystemSharedMemoryRegisterResponse()

        return await self._serve(context, "SystemSharedMemoryRegister", work)

    async def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: Context
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        async def work(caller: Caller | None, _: Call) -> pb.SystemSharedMemoryUnregisterResponse:
            assert caller is not None
            name = request.name or None
            if name is not None:
                check_region_name(name)
            self.app[REGIONS].unregister(caller.tenant, name)
            return pb.SystemSharedMemoryUnregisterResponse()

        return await self._serve(context, "SystemSharedMemoryUnregister", work)

    async def _cuda_unsupported(self, context: Context, method: str) -> NoReturn:
        """UNIMPLEMENTED, for a caller with a key (as the HTTP routes' 400, after auth)."""

        async def work(_: Caller | None, call: Call) -> str:
            return call.request_id

        request_id = await self._serve(context, method, work)
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED, CUDA_UNSUPPORTED, ((REQUEST_ID_KEY, request_id),)
        )
        raise AssertionError("abort returned")  # pragma: no cover

    async def _cuda(
        self, context: Context, method: str, work: Callable[[Caller | None, Call], Awaitable[T]]
    ) -> T:
        """A CUDA shared-memory call: served where CUDA was found, else UNIMPLEMENTED."""
        if not self.app[REGIONS].cuda_devices:
            await self._cuda_unsupported(context, method)
        return await self._serve(context, method, work)

    async def CudaSharedMemoryStatus(
        self, request: pb.CudaSharedMemoryStatusRequest, context: Context
    ) -> pb.CudaSharedMemoryStatusResponse:
        async def work(caller: Caller | None, _: Call) -> pb.CudaSharedMemoryStatusResponse:
            assert caller is not None
            name = request.name or None
            if name is not None:
                check_region_name(name)
            response = pb.CudaSharedMemoryStatusResponse()
            for region in self.app[REGIONS].status(caller.tenant, name, CudaRegion):
                response.regions[region["name"]].CopyFrom(
                    pb.CudaSharedMemoryStatusResponse.RegionStatus(**region)
                )
            return response

        return await self._cuda(context, "CudaSharedMemoryStatus", work)

    async def CudaSharedMemoryRegister(
        self, request: pb.CudaSharedMemoryRegisterRequest, context: Context
    ) -> pb.CudaSharedMemoryRegisterResponse:
        async def work(caller: Caller | None, _: Call) -> pb.CudaSharedMemoryRegisterResponse:
            assert caller is not None
            await self.app[REGIONS].register_cuda(
                caller.tenant,
                request.name,
                request.raw_handle,
                request.device_id,
                request.byte_size,
            )
            return pb.CudaSharedMemoryRegisterResponse()

        return await self._cuda(context, "CudaSharedMemoryRegister", work)

    async def CudaSharedMemoryUnregister(
        self, request: pb.CudaSharedMemoryUnregisterRequest, context: Context
    ) -> pb.CudaSharedMemoryUnregisterResponse:
        async def work(caller: Caller | None, _: Call) -> pb.CudaSharedMemoryUnregisterResponse:
            assert caller is not None
            name = request.name or None
            if name is not None:
                check_region_name(name)
            self.app[REGIONS].unregister(caller.tenant, name, CudaRegion)
            return pb.CudaSharedMemoryUnregisterResponse()

        return await self._cuda(context, "CudaSharedMemoryUnregister", work)


def _add_parameters(response: pb.ModelInferResponse, reply: InvokeReply) -> None:
    """Where the inference ran and where its time went (the HTTP reply's ``parameters``)."""
    b, params = reply.breakdown, response.parameters
    params["node"].string_param = reply.node
    params["device"].string_param = reply.device
    for name, us in (
        ("queue_us", b.queue_us),
        ("transfer_us", b.transfer_us),
        ("load_us", b.load_us),
        ("compute_us", b.compute_us),
        ("total_us", b.total_us),
        ("worker_us", b.worker_us),
        ("batch", b.batch),
        ("loaded_bytes", b.loaded_bytes),
    ):
        params[name].int64_param = int(us)
    params["cold"].bool_param = b.cold
    params["new_process"].bool_param = b.new_process


def listen_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def grpc_ctx(app: web.Application) -> AsyncIterator[None]:
    """The gRPC server, serving once the app has started (after NATS: it uses its caches)
    and stopped before NATS closes: calls in flight get half the shutdown deadline."""
    config = app[gw.CONFIG]
    if not config.grpc_port:
        yield
        return
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", config.max_body_bytes + MESSAGE_SLACK_BYTES),
            ("grpc.so_reuseport", 0),  # a port in use is an error, not a second listener
        ]
    )
    pbg.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(app), server)
    address = listen_address(config.http_host, config.grpc_port)
    try:
        server.add_insecure_port(address)
    except RuntimeError as exc:
        raise Unavailable(
            f"cannot listen for gRPC on {address}: {exc}", field="GPUFAAS_GRPC_PORT"
        ) from None
    await server.start()
    log.info("grpc.started", address=address)
    try:
        yield
    finally:
        await server.stop(config.shutdown_deadline_s / 2)
        log.info("grpc.stopped")
