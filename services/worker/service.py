"""The worker of one node: builds function instances over shared tensors and runs them.

A thin front over its parts: ``Instances`` (built over the tensor store's manifest, every
weight a zero-copy view; leases), ``Lanes`` (one per GPU its instances are placed on: the
device's threads, its ``Batcher``, a ready queue with dynamic batching by deadline slack,
and its ``TensorIO``, inputs and outputs inline or as tubes) and ``Answers`` (a repeated
dispatch answered, not run twice). Model work runs on one executor thread per device
stream, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import time
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import nats.errors
import structlog

from gpufaas.shared import constants as c
from gpufaas.shared import subjects
from gpufaas.shared.catalog import BUILTIN, resolve_model_dir
from gpufaas.shared.config import Config
from gpufaas.shared.devices import NodeDevices, parse_devices
from gpufaas.shared.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    PlatformError,
    Unavailable,
)
from gpufaas.shared.identity import FunctionRef
from gpufaas.shared.messages import (
    Breakdown,
    EnsureReply,
    FunctionRecord,
    FunctionSpec,
    InvokeReply,
    MemObserve,
    ModelSource,
    Msg,
    ProfilePointMsg,
    Reconnected,
    RegisterReply,
    WorkerBindReply,
    WorkerBindRequest,
    WorkerLoadReply,
    WorkerLoadRequest,
    WorkerProfileReply,
    WorkerProfileRequest,
    WorkerRetireReply,
    WorkerRetireRequest,
    WorkerRunRequest,
    WorkerUnloadReply,
    WorkerUnloadRequest,
    decode,
    decode_json,
    encode,
)
from gpufaas.shared.paths import check_root
from gpufaas.shared.rpc import request
from gpufaas.shared.service import Endpoint, Service, endpoint
from gpufaas.worker.batcher import Answers, Batcher, Ready
from gpufaas.worker.instances import Instance, Instances, us_since
from gpufaas.worker.lanes import Lanes, init_cuda, trim_cuda_cache
from gpufaas.worker.profiling import profile
from gpufaas.worker.runners import Inputs, warm_up_bert
from gpufaas.worker.tensor_map import TensorMap

log = structlog.get_logger()

__all__ = ["Instance", "PooledWorkerService", "WorkerService"]


def _builtin_model_dirs() -> list[Path]:
    """The installed packaged bert-embedding models (public files: what a spare warms)."""
    dirs = []
    for name, pkg in BUILTIN.items():
        if pkg.architecture != "bert-embedding":
            continue
        with contextlib.suppress(PlatformError):  # not installed here
            dirs.append(resolve_model_dir(ModelSource(builtin=name)))
    return dirs


# What a cold start decodes, each with a decoder built on first use (up to 0.5 ms each).
_COLD_PATH_MESSAGES = (WorkerLoadRequest, WorkerRunRequest, RegisterReply, EnsureReply)


def _build_decoders() -> None:
    """Build (and keep, see ``messages.decode``) the decoders of a cold start's messages:
    decoding nothing fails, after the decoder is made."""
    for typ in _COLD_PATH_MESSAGES:
        with contextlib.suppress(InvalidArgument):
            decode(b"", typ)
    with contextlib.suppress(InvalidArgument):
        decode_json(b"", FunctionRecord)  # the registry's record (_check_deployed)


class WorkerService(Service):
    """Runs function instances for its node."""

    name = "worker"

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        check_root(config.shm_dir)  # ours alone (0700), or refused: exit 2 naming it
        self.node_devices: NodeDevices = parse_devices(config.devices, config.topology)
        backend = self.node_devices.backend
        self.streams = config.device_streams or (c.CUDA_DEVICE_STREAMS if backend == "cuda" else 1)
        # A lane per GPU its instances are placed on ("gpu:N" is CUDA device N), the node's
        # first GPU's (or the host's) from the start. The tensor store keeps one copy of
        # each tensor per GPU, shared by every instance there (on a simulated GPU the store
        # accounts the capacity and compute runs on the CPU over the shared host pages).
        self.lanes = Lanes(
            self, self.node_devices, streams=self.streams, batch_wait_s=config.batch_wait_s
        )
        self.tensors = TensorMap(config.shm_dir)
        # Who holds this process's leases on the tensor store: unique per process life.
        self.holder = f"{config.node_id}/{os.getpid()}/{self.started_at:.6f}"
        self.loaded = Instances(self, self.tensors, holder=self.holder, backend=backend)
        self.answers: Answers[InvokeReply] = Answers()
        self.role, self.tenant = _role(config)
        self._idle_since = time.monotonic()  # last moment it had an instance (tenant workers)
        self._exit: asyncio.Task[None] | None = None  # its idle exit (see _retire)
        self.runs = 0  # requests started (an idle beat trims the CUDA cache)
        self._runs_seen = 0  # ... as of the last upkeep

    # --- what tests and tools read ---------------------------------------------------

    @property
    def instances(self) -> dict[FunctionRef, Instance]:
        """The built instances by function (a ``(tenant, name)`` tuple finds one too)."""
        return self.loaded.live

    @property
    def batcher(self) -> Batcher:
        """The default lane's (the node's first GPU's) ready queue."""
        return self.lanes.default.batcher

    @property
    def _executor(self) -> ThreadPoolExecutor:
        return self.lanes.default.executor

    @property
    def repeats(self) -> int:
        """Dispatches answered without running again."""
        return self.answers.repeats

    @property
    def _answering(self) -> dict[str, asyncio.Task[InvokeReply]]:
        return self.answers.running

    @property
    def _answered(self) -> dict[str, InvokeReply]:
        return self.answers.done

    def _compute(
        self, inst: Instance, req: WorkerRunRequest, inputs: Inputs
    ) -> Coroutine[Any, Any, Ready]:
        """Queue a request for its instance's next batch on its lane (``Batcher.compute``)."""
        return self.lanes.of(inst.device).batcher.compute(inst, req, inputs)

    # --- lifecycle ---------------------------------------------------------------------

    async def on_start(self) -> None:
        node = self.config.node_id
        self.every(self.config.heartbeat_s, self._upkeep, "upkeep")
        index = self.lanes.default.cuda_index
        if index is not None:
            # The device context, once, on the device's own thread: not in a cold start.
            await asyncio.get_running_loop().run_in_executor(self._executor, init_cuda, index)
        if self.role == "spare":  # warm, waiting to be given a tenant by the node's pool
            await self._warm_up()
        if self.role != "shared":  # the node's pool manager speaks for the node
            return
        await self.publish_event(
            "node.joined",
            {"node": node, "devices": [d.name for d in self.node_devices.devices]},
            dedupe_id=f"node.joined.{node}.{self.started_at}",
        )

    def endpoints(self) -> list[Endpoint]:
        """A spare's bind, else the verbs of its tenant's functions (any tenant's, shared)."""
        if self.role == "spare":
            return [endpoint(self._spare_subject(), WorkerBindRequest, self.bind)]
        return self._tenant_endpoints(self.tenant or subjects.ANY_TENANT)

    def _tenant_endpoints(self, tenant: str) -> list[Endpoint]:
        """The worker verbs of ``tenant``'s functions (``ANY_TENANT``: every tenant)."""

        def at(verb: str) -> str:
            return subjects.worker(self.config.node_id, tenant, verb)

        return [
            endpoint(at(subjects.WORKER_LOAD), WorkerLoadRequest, self.load),
            endpoint(at(subjects.WORKER_RUN), WorkerRunRequest, self.run),
            endpoint(at(subjects.WORKER_UNLOAD), WorkerUnloadRequest, self.unload),
            endpoint(at(subjects.WORKER_PROFILE), WorkerProfileRequest, self.profile),
        ]

    async def on_ready(self) -> None:
        """A pooled process tells its pool it serves (its endpoints are live, so the pool's
        bind, or a tenant's first request, finds them)."""
        if self.role == "shared":
            return
        with contextlib.suppress(nats.errors.Error):
            await self.nc.publish(
                subjects.node(self.config.node_id, "worker", subjects.WORKER_SPARE_READY),
                self.config.worker_spare_id.encode(),
            )

    def reconnect_announcement(self) -> tuple[str, Msg] | None:
        """The scheduler sends again what this process may have missed while away."""
        said = Reconnected(tenant=self.tenant, worker=self.config.worker_spare_id[:64])
        return subjects.node(self.config.node_id, "worker", subjects.RECONNECTED), said

    async def _warm_up(self) -> None:
        """(A spare, before it says it is ready.) Pay on the device thread what a cold start
        in a new process would otherwise pay: the builtin models' tokenizers parsed and
        run, the encoder run once over random weights (``runners.warm_up_bert``), the
        decoders of a cold start's messages built. Nothing of any tenant: a spare may be
        bound to anyone. Best effort: a failure is logged."""
        # A simulated GPU computes on the host.
        index = self.lanes.default.cuda_index
        device = "cpu" if index is None else f"cuda:{index}"
        t0 = time.perf_counter()
        try:
            _build_decoders()
            dirs = await asyncio.to_thread(_builtin_model_dirs)
            took = await asyncio.get_running_loop().run_in_executor(
                self._executor, warm_up_bert, dirs, device
            )
        except Exception as exc:  # never keeps a spare from serving
            log.warning("worker.warm_up_failed", error=repr(exc))
            return
        log.info("worker.warmed", us=us_since(t0), models=len(dirs), **took)

    def _spare_subject(self) -> str:
        return subjects.node(self.config.node_id, "worker", f"spare-{self.config.worker_spare_id}")

    async def bind(self, req: WorkerBindRequest) -> WorkerBindReply:
        """(A spare.) Serve ``req.tenant`` from now on, and only it, for this process's life."""
        if self.tenant is not None:
            raise AlreadyExists(f"this worker serves tenant {self.tenant!r}", field="tenant")
        self.tenant = req.tenant
        self._idle_since = time.monotonic()
        await self.serve_endpoints(self._tenant_endpoints(req.tenant))
        log.info("worker.bound", tenant=req.tenant)
        return WorkerBindReply(worker=self.holder, waited_us=0, new_process=False)

    def _check_tenant(self, tenant: str) -> None:
        """A process bound to a tenant refuses another's functions (isolation)."""
        if self.tenant is not None and tenant != self.tenant:
            raise NotFound("no such function on this worker", field="spec.tenant")

    async def on_stop(self) -> None:
        await self.lanes.stop_batching()
        await self.answers.stop()
        await self.loaded.stop()
        await self.lanes.shutdown()  # a batch still computing finishes in its thread
        if self.role != "shared":
            return
        await self.publish_event(
            "node.left",
            {"node": self.config.node_id, "reason": "stopped"},
            dedupe_id=f"node.left.{self.config.node_id}.{self.started_at}",
        )

    # --- instances -------------------------------------------------------------------

    async def _check_deployed(self, spec: FunctionSpec) -> None:
        """Before a cold start: refuse a function that is no longer deployed as ``spec``.

        The scheduler routes from a watched copy of the registry; this authoritative read
        (only on the cold path) keeps a just-deleted function from being built again.
        """
        record = await self.kv.functions.value(FunctionRef(spec.tenant, spec.name).key)
        if record is None or record.spec != spec:
            raise NotFound(f"function {spec.name!r} is not deployed", field="model")

    async def load(self, req: WorkerLoadRequest) -> WorkerLoadReply:
        """Build ``req.spec``'s instance on ``req.device`` (None: where it is, else the
        node's first GPU); one on another GPU is built again there (moved), unless the
        load asks for another instance besides it (``replica``: a scale-out here)."""
        self._check_tenant(req.spec.tenant)
        lane = await self.lanes.lane(req.device)
        if req.replica:
            inst, cold = await self.loaded.add(req.spec, lane)
        else:
            inst, cold = await self.loaded.get(req.spec, lane, move=req.device is not None)
        return WorkerLoadReply(
            inputs=inst.runner.inputs,
            outputs=inst.runner.outputs,
            model_bytes=inst.model_bytes,
            tensor_count=inst.tensor_count,
            bytes_stored=inst.bytes_stored,
            bytes_deduplicated=inst.bytes_deduplicated,
            load_us=inst.load_us if cold else 0,
            cached=not cold,
            device=inst.device,
        )

    async def profile(self, req: WorkerProfileRequest) -> WorkerProfileReply:
        """Measure the loaded instance of ``req.spec`` on its device.

        Runs on its lane's threads like a batch: requests wait behind it, so the
        scheduler asks for the full sweep only in the background, under a time limit.
        """
        inst = self.instances.get(FunctionRef(req.spec.tenant, req.spec.name))
        if inst is None or inst.spec != req.spec:  # never builds: it may have been unloaded
            raise NotFound(f"function {req.spec.name!r} has no instance here", field="spec")
        inst.active += 1
        inst.idle.clear()
        try:
            samples = await asyncio.get_running_loop().run_in_executor(
                self.lanes.of(inst.device).executor,
                functools.partial(
                    profile,
                    inst.runner,
                    req.batches,
                    [n for n in req.concurrencies if n <= self.streams] or [1],
                    repeats=req.repeats,
                    cuda=self.node_devices.backend == "cuda",
                    deadline_s=req.deadline_s,
                ),
            )
        finally:
            inst.active -= 1
            if not inst.active:
                inst.idle.set()
        points = [
            ProfilePointMsg(s.batch, s.concurrency, s.latency_s, s.memory_bytes) for s in samples
        ]
        return WorkerProfileReply(device=inst.device, points=points)

    async def unload(self, req: WorkerUnloadRequest) -> WorkerUnloadReply:
        self._check_tenant(req.tenant)
        ref = FunctionRef(req.tenant, req.function)
        return WorkerUnloadReply(unloaded=await self.loaded.remove(ref, req.device))

    async def renew_leases(self) -> None:
        """Re-announce every instance's lease (also rebuilds a restarted store's table)."""
        await self.loaded.renew()

    # --- upkeep ------------------------------------------------------------------------

    async def _upkeep(self) -> None:
        """Each heartbeat: trim an idle device's cache, renew the leases; a tenant's process
        idle too long exits (its pool starts a spare when one is needed)."""
        if self._exit is not None:  # retiring
            return
        if self.runs == self._runs_seen:  # no request in a whole beat
            await self._trim_device_cache()
        self._runs_seen = self.runs
        if self.role != "shared" and self.tenant is not None:
            if self.instances or self.loaded.loading:
                self._idle_since = time.monotonic()
            elif (
                time.monotonic() - self._idle_since > self.config.worker_idle_s
                and await self._retire()
            ):
                return
        try:
            await self.loaded.renew()
        except PlatformError as exc:  # each beat, not backed off: a lapsed lease frees tensors
            log.warning("lease.renew_failed", error=exc.message)

    async def _trim_device_cache(self) -> None:
        """Every CUDA lane's cache, each on its own thread, when no instance computes."""
        if any(inst.active for _, inst in self.loaded.every()):
            return
        loop = asyncio.get_running_loop()
        for lane in self.lanes.cuda():
            assert lane.cuda_index is not None
            freed = await loop.run_in_executor(lane.executor, trim_cuda_cache, lane.cuda_index)
            if freed:
                log.info("worker.cuda_cache_trimmed", device=lane.device, bytes=freed)

    async def _retire(self) -> bool:
        """(A tenant's idle process.) Exit if the node's pool agrees; False: stay.

        The pool answers yes only once it no longer counts this process as the tenant's,
        so no bind returns it from then on; until that answer it serves as before (see
        ``gpufaas.worker.pool``). Then its subscriptions are drained, not dropped: every
        request already routed here is answered (``stop`` waits for it); one sent later
        finds no responder and the scheduler binds another process.
        """
        assert self.tenant is not None
        try:
            reply = await request(
                self.nc,
                subjects.node(self.config.node_id, "worker", subjects.WORKER_RETIRE),
                WorkerRetireRequest(worker=self.config.worker_spare_id, tenant=self.tenant),
                WorkerRetireReply,
                timeout=5,
                what="worker pool of this node",
            )
            retire = reply.retire
        except Unavailable:  # no pool to bind this process again: nothing to agree with
            retire = True
        except PlatformError as exc:  # asked again next time (a yes is given again)
            log.warning("worker.retire_failed", error=exc.message)
            retire = False
        if not retire:
            self._idle_since = time.monotonic()
            return False
        log.info("worker.idle_exit", tenant=self.tenant)
        for sub in list(self._subs):
            with contextlib.suppress(nats.errors.Error):
                await sub.drain()  # type: ignore[no-untyped-call]
        self._exit = asyncio.get_running_loop().create_task(self.stop())
        return True

    # --- invocation ------------------------------------------------------------------

    async def run(self, req: WorkerRunRequest) -> InvokeReply:
        """Run one request; a repeat of a dispatch already run (or running) gets its answer.

        A gateway's direct request (``req.direct``) runs only on an instance of exactly its
        spec already built here: never a cold start the scheduler did not place (a function
        scaled in or redeployed since the route was granted); the gateway then asks a
        scheduler. ``req.device`` is where a request that finds no instance builds it."""
        self._check_tenant(req.spec.tenant)
        self.lanes.check(req.device)
        if req.direct:
            inst = self.loaded.pick(FunctionRef(req.spec.tenant, req.spec.name))
            if inst is None or inst.spec != req.spec:
                raise Unavailable(f"{req.spec.name!r} has no warm instance in this worker")
        if not req.dispatch_id:
            return await self._run(req)
        return await self.answers.answer(req.dispatch_id, self._run, req)

    async def _run(self, req: WorkerRunRequest) -> InvokeReply:
        self.runs += 1
        t_start = time.perf_counter()
        ref = FunctionRef(req.spec.tenant, req.spec.name)
        inst, cold = await self._instance(req, ref)
        lane = self.lanes.of(inst.device)
        load_us = us_since(t_start) if cold else 0
        xfer_t = time.perf_counter()
        inputs = await lane.io.inputs(req, inst)
        transfer_us = us_since(xfer_t)
        comp_t = time.perf_counter()
        inst.active += 1
        inst.idle.clear()
        await self._observe(req, inst, "start", sum(len(raw) for _, raw in inputs.values()))
        try:
            ran = await lane.batcher.compute(inst, req, inputs)
            outputs = ran.fut.result()
        finally:
            inst.active -= 1
            if not inst.active:
                inst.idle.set()
            await self._observe(req, inst, "end")
        compute_us = us_since(comp_t)
        xfer_t = time.perf_counter()
        payloads = [
            await lane.io.output(name, out, req.spec.tenant, req.intermediate)
            for name, out in outputs.items()
        ]
        transfer_us += us_since(xfer_t)
        breakdown = Breakdown(
            queue_us=req.queue_us,
            transfer_us=transfer_us,
            load_us=load_us,
            compute_us=compute_us,
            total_us=req.queue_us + us_since(t_start),
            cold=cold,
            batch=ran.batch,
            loaded_bytes=inst.bytes_stored if cold else 0,
        )
        return InvokeReply(
            function=req.spec.name,
            request_id=req.request_id,
            outputs=payloads,
            node=self.config.node_id,
            device=inst.device,
            breakdown=breakdown,
        )

    async def _instance(self, req: WorkerRunRequest, ref: FunctionRef) -> tuple[Instance, bool]:
        """The request's instance wherever it lives, else built on ``req.device``'s lane
        (a cold start: of a function still deployed as the request says)."""
        inst = self.loaded.pick(ref)
        if inst is not None and inst.spec == req.spec:
            return inst, False
        if inst is None:
            await self._check_deployed(req.spec)
        return await self.loaded.get(req.spec, await self.lanes.lane(req.device))

    async def _observe(
        self,
        req: WorkerRunRequest,
        inst: Instance,
        phase: Literal["start", "end"],
        nbytes: int = 0,
    ) -> None:
        """Tell the memory service what this request holds on the GPU (for the reservations
        of intermediates); a plain publish, nothing waited for."""
        if inst.gpu is None:
            return
        msg = MemObserve(
            device=inst.gpu,
            function=FunctionRef(inst.spec.tenant, inst.spec.name).key,
            request_id=req.request_id,
            phase=phase,
            nbytes=nbytes,
        )
        subject = subjects.node(self.config.node_id, "memory", subjects.MEMORY_OBSERVE)
        with contextlib.suppress(nats.errors.Error):
            await self.nc.publish(subject, encode(msg))


def _role(config: Config) -> tuple[str, str | None]:
    """The worker's role and the tenant it serves (None: any, or not bound yet)."""
    role = config.worker_role
    if role not in ("shared", "spare", "tenant"):
        raise InvalidArgument(
            f"worker role {role!r} is not shared, spare or tenant", field="GPUFAAS_WORKER_ROLE"
        )
    tenant = config.worker_tenant or None
    if role == "tenant" and tenant is None:
        raise InvalidArgument(
            "a tenant worker needs GPUFAAS_WORKER_TENANT", field="GPUFAAS_WORKER_TENANT"
        )
    return role, tenant


class PooledWorkerService(WorkerService):
    """A worker process of a node's pool (a spare, or bound to one tenant): no heartbeat of
    its own, since the pool manager speaks for the node."""

    node_scoped = False
