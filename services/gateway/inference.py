"""The protocol-independent core of an invocation.

Each front end decodes its request into :class:`Tensor` s: the JSON and binary forms of
the Open Inference Protocol over HTTP, gRPC, and the OpenAI-compatible embeddings. It
checks their names, datatypes and shapes against the function with :func:`check_inputs`
(and their sizes with ``admission.check_input_sizes``) before it decodes any data. Then
it calls :func:`run_function` or :func:`run_workflow`, which return the raw outputs for
the front end to encode.

Raw bytes are little-endian and row-major. Each ``BYTES`` element is prefixed by its
length (4 bytes, little-endian), as in the binary tensor extension.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import nats.errors
import structlog
from aiohttp import web

from gpufaas.gateway import app as gw
from gpufaas.gateway import direct, remote_tubes
from gpufaas.shared import subjects
from gpufaas.shared.errors import InvalidArgument, PlatformError
from gpufaas.shared.identity import FunctionRef
from gpufaas.shared.messages import (
    Datatype,
    FunctionRecord,
    InvokeReply,
    InvokeRequest,
    TensorPayload,
    TensorSpec,
    Tube,
)
from gpufaas.shared.shm import delete_tube, read_tube, write_tube
from gpufaas.shared.workflows import WorkflowInvokeReply, WorkflowInvokeRequest, WorkflowRecord

log = structlog.get_logger()
R = TypeVar("R", InvokeReply, WorkflowInvokeReply)


class Head(Protocol):
    """What a front end knows of an input before its data is decoded."""

    @property
    def name(self) -> str: ...
    @property
    def datatype(self) -> str: ...
    @property
    def shape(self) -> list[int]: ...


@dataclass(frozen=True, slots=True)
class Call:
    """What an invocation needs of the request that asked for it, whatever its protocol:
    the gateway's application and the request's id (the HTTP handlers pass their
    ``web.Request``, the gRPC servicer builds one)."""

    app: web.Application
    request_id: str

    @classmethod
    def of(cls, request: web.Request | Call) -> Call:
        if isinstance(request, Call):
            return request
        return cls(request.app, request[gw.REQUEST_ID])


@dataclass(frozen=True, slots=True)
class Tensor:
    """One input or output at the protocol boundary: raw bytes (see the module's doc)."""

    name: str
    datatype: Datatype  # a front end checks the wire's string (``check_datatype``)
    shape: list[int]
    data: bytes | memoryview


def check_inputs(
    inputs: Sequence[Head],
    wanted: Sequence[str] | None,
    what: str,
    declared_in: list[TensorSpec],
    declared_out: list[TensorSpec],
) -> None:
    """Check a request's inputs (and the outputs it asks for) against what a function or
    workflow takes and returns: 400 naming ``inputs[i].<field>`` or ``outputs[j].name``."""
    declared = {s.name: s for s in declared_in}
    seen: set[str] = set()
    for i, inp in enumerate(inputs):
        field = f"inputs[{i}]"
        spec = declared.get(inp.name)
        if spec is None:
            raise InvalidArgument(
                f"unknown input {inp.name!r}; {what} takes {', '.join(declared)}",
                field=f"{field}.name",
            )
        if inp.name in seen:
            raise InvalidArgument(f"input {inp.name!r} given twice", field=f"{field}.name")
        seen.add(inp.name)
        if inp.datatype != spec.datatype:
            raise InvalidArgument(
                f"input {inp.name!r} must be {spec.datatype}, got {inp.datatype}",
                field=f"{field}.datatype",
            )
        shape = inp.shape
        if (
            any(d < 0 for d in shape)
            or len(shape) != len(spec.shape)
            or any(want not in (-1, got) for want, got in zip(spec.shape, shape, strict=True))
        ):
            raise InvalidArgument(
                f"input {inp.name!r} has shape {shape}; expected {spec.shape} (-1 = any size)",
                field=f"{field}.shape",
            )
    missing = [n for n in declared if n not in seen]
    if missing:
        raise InvalidArgument(f"missing input {missing[0]!r}", field="inputs")
    known_out = {s.name for s in declared_out}
    for j, out in enumerate(wanted or []):
        if out not in known_out:
            raise InvalidArgument(f"unknown output {out!r}", field=f"outputs[{j}].name")


async def run_function(
    request: web.Request | Call,
    record: FunctionRecord,
    inputs: list[Tensor],
    wanted: Sequence[str] | None = None,
) -> tuple[InvokeReply, list[Tensor]]:
    """Invoke a function with checked inputs; its reply and the outputs asked for (all
    when ``wanted`` is None), raw. A warm function's request goes straight to its worker
    when this gateway holds a route to it (``direct.py``), else through a scheduler, whose
    reply may grant one."""
    spec, call = record.spec, Call.of(request)
    routes, key = call.app[direct.ROUTES], FunctionRef(spec.tenant, spec.name).key

    async def send(payloads: list[TensorPayload], deadline: float) -> InvokeReply:
        reply = await direct.invoke(call.app, call.request_id, spec, payloads, deadline)
        if reply is not None:
            return reply
        msg = InvokeRequest(
            function=spec.name,
            request_id=call.request_id,
            inputs=payloads,
            tenant=spec.tenant,
            deadline=deadline,
            direct=min(routes.renewal(key), 1_000_000),
        )
        reply = await gw.invoke_scheduler(
            call.app, call.request_id, subjects.SCHED_INVOKE, msg, InvokeReply
        )
        if reply.route is not None:
            routes.grant(key, reply.route, time.monotonic())
        return reply

    return await _run(call, spec.tenant, inputs, wanted, send)


async def run_workflow(
    request: web.Request | Call,
    record: WorkflowRecord,
    inputs: list[Tensor],
    wanted: Sequence[str] | None = None,
) -> tuple[WorkflowInvokeReply, list[Tensor]]:
    """Invoke a workflow with checked inputs, as :func:`run_function` (always through a
    scheduler: it runs the steps)."""
    spec, call = record.spec, Call.of(request)

    async def send(payloads: list[TensorPayload], deadline: float) -> WorkflowInvokeReply:
        msg = WorkflowInvokeRequest(
            workflow=spec.name,
            request_id=call.request_id,
            inputs=payloads,
            tenant=spec.tenant,
            deadline=deadline,
        )
        return await gw.invoke_scheduler(
            call.app, call.request_id, subjects.SCHED_WORKFLOW_INVOKE, msg, WorkflowInvokeReply
        )

    return await _run(call, spec.tenant, inputs, wanted, send)


async def _run(
    call: Call,
    tenant: str,
    inputs: list[Tensor],
    wanted: Sequence[str] | None,
    send: Callable[[list[TensorPayload], float], Awaitable[R]],
) -> tuple[R, list[Tensor]]:
    """Inputs to payloads (big ones as tubes), the invocation sent with its deadline, its
    outputs read; the request's tubes dropped at the end, whatever happened."""
    tubes: list[Tube] = []
    try:
        payloads = await _payloads(call.app, inputs, tenant, tubes)
        reply = await send(payloads, time.time() + call.app[gw.CONFIG].request_timeout_s)
        return reply, await _outputs(call.app, reply.outputs, wanted, tubes)
    finally:
        await _drop_tubes(call.app, tubes)


async def _payloads(
    app: web.Application, inputs: list[Tensor], tenant: str, tubes: list[Tube]
) -> list[TensorPayload]:
    """The inputs as payloads: inline when small, else written as host tubes (added to
    ``tubes`` so that the caller drops them when the request is over)."""
    config = app[gw.CONFIG]
    payloads: list[TensorPayload] = []
    for inp in inputs:
        if len(inp.data) > config.inline_threshold and not config.gateway_local_shm:
            tube = await remote_tubes.write_input(app, tenant, inp.datatype, inp.shape, inp.data)
            tubes.append(tube)
            payloads.append(
                TensorPayload(name=inp.name, datatype=inp.datatype, shape=inp.shape, tube=tube)
            )
        elif len(inp.data) > config.inline_threshold:
            tube = await asyncio.to_thread(
                write_tube,
                config.shm_dir,
                config.node_id,
                tenant,
                datatype=inp.datatype,
                shape=inp.shape,
                data=inp.data,
            )
            tubes.append(tube)
            await app[gw.KV].tubes.put(tube.id, tube)
            payloads.append(
                TensorPayload(name=inp.name, datatype=inp.datatype, shape=inp.shape, tube=tube)
            )
        else:
            payloads.append(
                TensorPayload(
                    name=inp.name, datatype=inp.datatype, shape=inp.shape, data=bytes(inp.data)
                )
            )
    return payloads


async def _outputs(
    app: web.Application,
    outs: list[TensorPayload],
    wanted: Sequence[str] | None,
    tubes: list[Tube],
) -> list[Tensor]:
    """Reply payloads as raw tensors (those asked for), tubes read once (and added to
    ``tubes``, dropped with the request)."""
    keep = set(wanted) if wanted else None
    outputs = []
    for out in outs:
        data = out.data
        if out.tube is not None:
            tubes.append(out.tube)
            if (keep is None or out.name in keep) and not app[gw.CONFIG].gateway_local_shm:
                data = await remote_tubes.read_output(app, out.tube)
            elif keep is None or out.name in keep:
                data = await asyncio.to_thread(read_tube, app[gw.CONFIG].shm_dir, out.tube)
        if keep is not None and out.name not in keep:
            continue
        assert data is not None
        outputs.append(Tensor(out.name, out.datatype, out.shape, data))
    return outputs


async def _drop_tubes(app: web.Application, tubes: list[Tube]) -> None:
    for tube in tubes:
        await asyncio.to_thread(delete_tube, app[gw.CONFIG].shm_dir, tube)
        try:
            await remote_tubes.drop(app, tube)
            await app[gw.KV].tubes.delete(tube.id)
        except (nats.errors.Error, TimeoutError, PlatformError) as exc:
            log.warning("tube.delete_failed", tube=tube.id, error=repr(exc))
