"""The request path: a request waits in its function's queue for an instance with room,
then runs on that node's worker; a function with no live instance is cold-started."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import nats.errors
import structlog
from msgspec.structs import replace as msgspec_replace

from gpufaas.scheduler.functions import FunctionRegistry, scaled
from gpufaas.scheduler.host import Host
from gpufaas.scheduler.placer import inputs_at
from gpufaas.scheduler.profiles import EffectiveConfig, effective_config
from gpufaas.scheduler.queues import FunctionQueue, Pending
from gpufaas.shared import constants as c
from gpufaas.shared import subjects
from gpufaas.shared.errors import (
    DeadlineExceeded,
    NotFound,
    Overloaded,
    PlatformError,
    ResourceExhausted,
)
from gpufaas.shared.identity import FunctionRef
from gpufaas.shared.messages import (
    FunctionRecord,
    InvokeReply,
    Route,
    TensorPayload,
    WorkerBindReply,
    WorkerRunRequest,
    completed,
)
from gpufaas.shared.registry import first_gpu, instance_count

log = structlog.get_logger()


@dataclass(frozen=True, slots=True)
class Call:
    """One request to run: its function, inputs and deadline, and how to dispatch it."""

    ref: FunctionRef
    request_id: str
    inputs: list[TensorPayload]
    deadline: float
    intermediate: bool = False
    prefer: str | None = None  # the node to run on when it has room (where inputs are)
    dispatch_id: str = ""
    grant: bool = False  # a gateway's request: its reply may grant a direct Route
    direct: int = 0  # the gateway's requests on its direct route since its last one here


def with_bind(reply: InvokeReply, bound: WorkerBindReply | None) -> InvokeReply:
    """A reply that also waited for a worker process of its tenant (``bound``)."""
    if bound is None:
        return reply
    return msgspec_replace(
        reply,
        breakdown=msgspec_replace(
            reply.breakdown,
            worker_us=bound.waited_us,
            new_process=bound.new_process,
            queue_us=reply.breakdown.queue_us + bound.waited_us,
        ),
    )


def with_cold_start(reply: InvokeReply, pending: Pending) -> InvokeReply:
    """A reply whose instance was built for it before the worker saw it."""
    if not pending.cold_us:
        return reply
    b = reply.breakdown
    return msgspec_replace(
        reply,
        breakdown=msgspec_replace(
            b,
            cold=True,
            load_us=b.load_us + pending.cold_us,
            worker_us=b.worker_us + pending.worker_us,
            loaded_bytes=b.loaded_bytes + pending.loaded_bytes,
            new_process=b.new_process or pending.new_process,
        ),
    )


def fail_waiting(fq: FunctionQueue, error: PlatformError) -> None:
    """Fail every request still waiting in ``fq`` with ``error``."""
    for p in fq.waiting:
        if not p.node.done():
            p.node.set_exception(error)
    fq.waiting.clear()


class Dispatcher:
    """Per-function queues (``queues.py``) and the runs they hand out."""

    def __init__(self, host: Host, registry: FunctionRegistry) -> None:
        self.host = host
        self.registry = registry
        self.cache = registry.cache
        self.profiles = registry.profiles
        self.placer = registry.placer
        self.workers = registry.workers
        self.queues: dict[str, FunctionQueue] = {}  # FunctionRef.key -> its queue here
        self._cold: dict[str, asyncio.Task[None]] = {}  # key -> cold start from zero here
        # Sends whose caller's deadline passed before the worker answered: each holds its
        # instance slot until the answer (or the grace past the deadline) comes.
        self._late: set[asyncio.Future[tuple[InvokeReply, WorkerBindReply | None]]] = set()

    def queue(self, ref: FunctionRef) -> FunctionQueue:
        fq = self.queues.get(ref.key)
        if fq is None:
            fq = self.queues[ref.key] = FunctionQueue(ref)
        return fq

    async def run(self, call: Call) -> InvokeReply:
        """Queue a request on its function, wait for an instance with room, run it there
        (on ``prefer`` when that node has an instance with room: where its inputs are)."""
        t0 = time.perf_counter()
        record = await self.cache.record(call.ref)
        if record is None:
            raise NotFound(f"function {call.ref.name!r} not found", field="model")
        fq = self.queue(call.ref)
        fq.arrivals += call.direct  # seen by the autoscaler as this replica's arrivals
        self.admit(fq, call.deadline - time.time())
        tubes = tuple(p.tube for p in call.inputs if p.tube is not None)
        loop = asyncio.get_running_loop()
        pending = Pending(
            call.deadline, call.request_id, loop.create_future(), prefer=call.prefer, tubes=tubes
        )
        fq.push(pending)
        profile = await self.profiles.of(call.ref)
        await self.pump(fq, record)
        node = await self._wait(fq, pending)
        if tubes:  # pinned on that node until it is answered (see the queue view)
            fq.running_tubes[pending.seq] = (node, tubes)
        send: asyncio.Future[tuple[InvokeReply, WorkerBindReply | None]] | None = None
        try:
            config = effective_config(profile, record.spec)
            run = WorkerRunRequest(
                spec=record.spec,
                request_id=call.request_id,
                inputs=call.inputs,
                queue_us=int((time.perf_counter() - t0) * 1e6),
                deadline=call.deadline,
                max_batch=config.batch if config.profiled else None,
                concurrency=config.concurrency if config.profiled else None,
                intermediate=call.intermediate,
                dispatch_id=call.dispatch_id,
                device=first_gpu(record, node),
            )
            send = asyncio.ensure_future(self._send(node, run, call))
            reply = with_bind(*await self._by_deadline(send, call))
        finally:
            if send is None or send.done():
                self._done_with(fq, node, pending)
                await self.pump(fq, None)
            else:  # past its deadline: the slot is the worker's until it answers
                late = send
                self._late.add(late)
                late.add_done_callback(lambda _: self._late_answer(fq, node, pending, late))
        reply = with_cold_start(reply, pending)
        await self._completed(call, reply)
        if call.grant and not reply.breakdown.cold:
            reply = self._with_route(reply, config, instance_count(record, [reply.node]))
        return reply

    def _with_route(
        self, reply: InvokeReply, config: EffectiveConfig, instances: int = 1
    ) -> InvokeReply:
        """A gateway's reply from a warm instance, with the direct route to it: the
        gateway's next requests go straight to that worker, up to twice the instance's
        capacity in flight (one batch computing, one gathering: what ``pump`` gives an
        instance too), until the grant lapses (``GPUFAAS_DIRECT_ROUTE_TTL_S``; 0: never)."""
        ttl = self.host.config.direct_route_ttl_s
        if ttl <= 0:
            return reply
        route = Route(
            node=reply.node,
            # As many as pump lets the node's instances hold.
            slots=min(2 * config.capacity * max(instances, 1), 4096),
            ttl_s=min(ttl, 60.0),
            max_batch=config.batch if config.profiled else None,
            concurrency=config.concurrency if config.profiled else None,
        )
        return msgspec_replace(reply, route=route)

    def admit(self, fq: FunctionQueue, budget_s: float) -> None:
        """Turn a request away (429 with ``Retry-After``) when its function's queue is
        full (``GPUFAAS_MAX_QUEUED``), or when the requests ahead of it would take longer
        to drain, at the recent rate, than it has left before its deadline: a burst waits
        bounded, and no request is accepted only to time out in the queue."""
        limit = self.host.config.max_queued
        if fq.full(limit):
            raise Overloaded(
                f"{limit} requests wait for {fq.ref.name!r} already; retry later",
                retry_after_s=fq.retry_after(),
            )
        wait = fq.expected_wait()
        if wait is not None and wait > budget_s:
            raise Overloaded(
                f"the {fq.queued()} requests waiting for {fq.ref.name!r} take about "
                f"{wait:.1f} s to drain, past this request's deadline; retry later",
                retry_after_s=fq.retry_after(),
            )

    async def _wait(self, fq: FunctionQueue, pending: Pending) -> str:
        """The node ``pending`` may run on, once one has room (or its deadline passed)."""
        try:
            async with asyncio.timeout(max(pending.deadline - time.time(), 0.001)):
                return await pending.node
        except TimeoutError:
            pending.node.cancel()
            raise DeadlineExceeded(
                f"request waited past its deadline in the queue of {fq.ref.name!r}"
            ) from None
        finally:
            if not pending.node.done():
                pending.node.cancel()

    async def _send(
        self, node: str, run: WorkerRunRequest, call: Call
    ) -> tuple[InvokeReply, WorkerBindReply | None]:
        """The worker's answer: it answers even a request it drops for its deadline, so
        this waits past the deadline (by a grace, in case the worker is gone)."""
        return await self.workers.call(
            node,
            call.ref.tenant,
            subjects.WORKER_RUN,
            run,
            InvokeReply,
            timeout=max(call.deadline - time.time(), 0.001) + c.WORKER_ANSWER_GRACE_S,
            request_id=call.request_id,
        )

    async def _by_deadline(
        self, send: asyncio.Future[tuple[InvokeReply, WorkerBindReply | None]], call: Call
    ) -> tuple[InvokeReply, WorkerBindReply | None]:
        """``send``'s answer, or ``DeadlineExceeded`` for the caller at its deadline while
        ``send`` goes on (its instance slot is held until the worker answers)."""
        try:
            async with asyncio.timeout(max(call.deadline - time.time(), 0.001)):
                return await asyncio.shield(send)
        except TimeoutError:
            raise DeadlineExceeded(
                f"{call.ref.name!r} did not answer request {call.request_id} within its deadline"
            ) from None

    def _done_with(self, fq: FunctionQueue, node: str, pending: Pending) -> None:
        """The worker is done with a request (or never got it): free its slot and tubes."""
        fq.release(node)
        fq.running_tubes.pop(pending.seq, None)

    def _late_answer(
        self, fq: FunctionQueue, node: str, pending: Pending, send: asyncio.Future[Any]
    ) -> None:
        """The worker answered a request after its caller's deadline: its slot is free now."""
        self._late.discard(send)
        if not send.cancelled():
            send.exception()  # retrieved: its caller has heard DeadlineExceeded already
        self._done_with(fq, node, pending)
        self.host.spawn(self._pump_later(fq), f"pump-{fq.key}")

    async def _pump_later(self, fq: FunctionQueue) -> None:
        """``pump`` off a request's path: a transient failure waits for the next pump."""
        try:
            await self.pump(fq, None)
        except (PlatformError, nats.errors.Error, TimeoutError) as exc:
            log.warning("pump.failed", function=fq.key, error=repr(exc))

    async def _completed(self, call: Call, reply: InvokeReply) -> None:
        await self.host.publish_event(
            "invocation.completed",
            completed(call.ref.name, call.ref.tenant, reply),
            request_id=call.request_id,
            ack=False,
        )

    async def pump(self, fq: FunctionQueue, record: FunctionRecord | None) -> None:
        """Hand waiting requests to instances with room; start one if the function has none."""
        if not fq.waiting:
            return
        if record is None:
            record = await self.cache.record(fq.ref)
            if record is None:  # deleted while requests waited
                fail_waiting(fq, NotFound(f"function {fq.ref.name!r} not found", field="model"))
                return
        nodes = [n for n in record.nodes if n in self.host.workers]
        if not nodes:
            cold = self._cold.get(fq.key)
            if cold is None or cold.done():
                self._cold[fq.key] = self.host.spawn(self._cold_start(fq, record), f"cold-{fq.key}")
            return
        config = effective_config(await self.profiles.of(fq.ref), record.spec)
        # Each instance takes a batch computing and one gathering; a node with several
        # (scaled out within it) takes as many times that, its worker spreading them.
        rooms = {n: 2 * config.capacity * instance_count(record, [n]) for n in nodes}
        for pending, node in fq.assign(rooms):
            pending.node.set_result(node)

    async def _cold_start(self, fq: FunctionQueue, record: FunctionRecord) -> None:
        """A function with requests waiting and no live instance: place and build one."""
        spec = record.spec
        t0 = time.perf_counter()
        try:
            # Where the most urgent waiting request's inputs are, on a tie of θ.
            head = min((p for p in fq.waiting if not p.node.done()), default=None)
            near = inputs_at(head.tubes, head.prefer) if head else None
            at = await self.placer.place(spec, near=near)
            node = at.node
            loaded, bound = await self.registry.load(node, spec, at.gpu)
            updated = await self.registry.add_instance(
                spec, node, at.gpu, lambda n: n in self.host.workers
            )
        except PlatformError as exc:
            log.warning("cold_start.failed", function=spec.name, error=exc.message)
            fail_waiting(fq, exc)
            return
        cold_us = int((time.perf_counter() - t0) * 1e6)
        for p in fq.waiting:  # every request that waited for it reports a cold start
            p.cold_us = cold_us
            p.loaded_bytes = loaded.bytes_stored
            if bound is not None:
                p.worker_us, p.new_process = bound.waited_us, bound.new_process
        if updated is not None:
            reason = "requests waiting and no live instance"
            await self.host.publish_event("function.scaled", scaled(spec, 0, updated, reason))
            await self.pump(fq, updated)

    async def rejected(self, ref: FunctionRef, node: str, reason: str) -> None:
        """A node's memory manager found a function's working set bigger than its GPU:
        fail the requests waiting for it there (507 with the reason) instead of letting
        them thrash the device, unless another live node has the function too."""
        fq = self.queues.get(ref.key)
        if fq is None:
            return
        record = await self.cache.record(ref)
        nodes = record.nodes if record else []
        if any(n != node and n in self.host.workers for n in nodes):
            return
        fail_waiting(fq, ResourceExhausted(f"function {ref.name!r} cannot run on {node}: {reason}"))
