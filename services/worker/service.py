"""The worker of one node: builds function instances over shared tensors and runs them.

Instances are built from the tensor store's manifest: every weight is a zero-copy
view of a shared-memory segment or, on a real GPU, of the store's device copy, mapped
once per process through its CUDA IPC handle. Model work runs on one executor thread
per device, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import itertools
import math
import os
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
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
    ModelInvalid,
    NotFound,
    PlatformError,
    ResourceExhausted,
    Unavailable,
)
from gpufaas.shared.messages import (
    AdoptReply,
    AdoptRequest,
    Breakdown,
    EnsureReply,
    EnsureRequest,
    FunctionRecord,
    FunctionSpec,
    InvokeReply,
    LeaseClaim,
    MemObserve,
    ModelSource,
    ProfilePointMsg,
    RegisterReply,
    RegisterRequest,
    ReleaseReply,
    ReleaseRequest,
    RenewReply,
    RenewRequest,
    TensorPayload,
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
    encode_json,
)
from gpufaas.shared.registry import get_function
from gpufaas.shared.rpc import request
from gpufaas.shared.service import Service
from gpufaas.shared.shm import write_tube
from gpufaas.worker.exported import ExportedRunner
from gpufaas.worker.profiling import profile
from gpufaas.worker.runners import (
    RUNNERS,
    Inputs,
    Output,
    Runner,
    merge,
    rows,
    split,
    warm_up_bert,
)
from gpufaas.worker.tensor_map import TensorMap

log = structlog.get_logger()

KNOWN_MODELS = 256  # store answers remembered for overlapping builds (see _build)
ANSWERS_KEPT = 4096  # answers kept by dispatch id for repeats (see run)


@dataclass(slots=True)
class Instance:
    """A built function instance on one device."""

    spec: FunctionSpec
    runner: Runner
    device: str
    model_bytes: int
    tensor_count: int
    bytes_stored: int
    bytes_deduplicated: int
    load_us: int
    tensors: list[str]  # ids of the tensors it uses, leased from the tensor store
    held: frozenset[str]  # the segments its weights view (see TensorMap)
    active: int = 0  # requests computing on it now
    streams: int = 0  # batches computing on it now
    concurrency: int = 1  # batches it may run at once (from its profile, see _compute)
    compute_s: float = 0.0  # moving average of a batch's compute time (dispatch order)
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # set while active == 0

    def __post_init__(self) -> None:
        self.idle.set()


@dataclass(slots=True)
class _Ready:
    """A request waiting for the device, ordered by slack then arrival."""

    slack: float
    seq: int
    inst: Instance
    inputs: Inputs
    rows: int
    queued_at: float  # loop time
    fut: asyncio.Future[dict[str, Output]]
    max_batch: int  # rows its instance's batches may hold
    batch: int = 1  # requests in the batch it ran in

    def __lt__(self, other: _Ready) -> bool:
        return (self.slack, self.seq) < (other.slack, other.seq)


def _init_cuda(index: int) -> None:
    """Create the CUDA context of GPU ``index`` on the calling (device) thread."""
    import torch  # noqa: PLC0415 - only on a CUDA node

    torch.cuda.set_device(index)
    torch.zeros(1, device=f"cuda:{index}")


def _trim_cuda_cache(index: int) -> int:
    """(The device thread of an idle worker.) Give torch's cached, unused CUDA blocks back
    to the driver: a function's intermediates live in its reservation, a hold of the
    memory manager's budget that ends with its load, so an idle worker must not keep
    them. Returns the bytes given back."""
    import torch  # noqa: PLC0415 - only on a CUDA node

    before = torch.cuda.memory_reserved(index)
    torch.cuda.empty_cache()
    return int(before - torch.cuda.memory_reserved(index))


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


_PREAD_MAX = 1 << 30  # the bytes of one read of a tube's copy


def _us(since: float) -> int:
    return int((time.perf_counter() - since) * 1e6)


def _same_build(a: RegisterReply | None, b: RegisterReply) -> bool:
    """Whether an instance built from ``a`` is one built from ``b`` (host views only)."""
    return (
        a is not None
        and (a.model_dir, a.program, a.manifest) == (b.model_dir, b.program, b.manifest)
        and (b.placement is None or all(s.ipc_handle is None for s in b.placement.segments))
    )


class WorkerService(Service):
    """Runs function instances for its node."""

    name = "worker"

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.node_devices: NodeDevices = parse_devices(config.devices, config.topology)
        gpus = [d for d in self.node_devices.devices if d.kind != "host"]
        # The GPU instances are placed on. The tensor store keeps one copy of each tensor
        # there, shared by every instance (on a simulated GPU the store accounts the
        # capacity and compute runs on the CPU over the shared host pages).
        self.gpu = gpus[0].name if gpus else None
        self.device = self.gpu or "cpu"
        # Its CUDA device ("gpu:N" is CUDA device N); None on the CPU or a simulated GPU.
        self.cuda_index = (
            int(self.gpu.split(":")[1])
            if self.gpu is not None and self.node_devices.backend == "cuda"
            else None
        )
        self.streams = config.device_streams or (
            c.CUDA_DEVICE_STREAMS if self.node_devices.backend == "cuda" else 1
        )
        self._executor = ThreadPoolExecutor(
            max_workers=self.streams, thread_name_prefix=f"dev-{self.device}"
        )
        self.tensors = TensorMap(config.shm_dir)
        self.instances: dict[tuple[str, str], Instance] = {}
        self._loading: dict[tuple[str, str], asyncio.Task[Instance]] = {}
        # The store's last answer per model: what a new instance is built over while the
        # store confirms it (see _build).
        self._known: dict[tuple[ModelSource, str], RegisterReply] = {}
        # Requests ready to compute, by deadline slack, batched per instance (see _compute).
        self._ready: list[_Ready] = []
        self._ready_seq = itertools.count()
        self._wake = asyncio.Event()  # a request arrived or a batch finished
        # Answers by dispatch id, so that a request sent again (a scheduler replica taking
        # over a dead one's) is answered, not run twice: the running ones, the last answers.
        self._answering: dict[str, asyncio.Task[InvokeReply]] = {}
        self._answered: dict[str, InvokeReply] = {}
        self.repeats = 0  # dispatches answered without running again
        self._dispatcher: asyncio.Task[None] | None = None
        self.role = config.worker_role
        if self.role not in ("shared", "spare", "tenant"):
            raise InvalidArgument(
                f"worker role {self.role!r} is not shared, spare or tenant",
                field="GPUFAAS_WORKER_ROLE",
            )
        self.tenant: str | None = config.worker_tenant or None
        if self.role == "tenant" and self.tenant is None:
            raise InvalidArgument(
                "a tenant worker needs GPUFAAS_WORKER_TENANT", field="GPUFAAS_WORKER_TENANT"
            )
        self._idle_since = time.monotonic()  # last moment it had an instance (tenant workers)
        self._exit: asyncio.Task[None] | None = None  # its idle exit (see _retire)
        self.runs = 0  # requests started (an idle beat trims the CUDA cache)
        # Who holds this process's leases on the tensor store: unique per process life.
        self.holder = f"{config.node_id}/{os.getpid()}/{self.started_at:.6f}"

    async def on_start(self) -> None:
        node = self.config.node_id
        self.spawn(self._upkeep_loop(), "upkeep")
        if self.cuda_index is not None:
            # The device context, once, on the device's own thread: not in a cold start.
            await asyncio.get_running_loop().run_in_executor(
                self._executor, _init_cuda, self.cuda_index
            )
        if self.role == "spare":  # warm, waiting to be given a tenant by the node's pool
            await self._warm_up()
            await self.serve(self._spare_subject(), WorkerBindRequest, self.bind)
        else:
            await self._serve_tenant(self.tenant or subjects.ANY_TENANT)
        if self.role != "shared":  # the node's pool manager speaks for the node
            await self.nc.flush()
            with contextlib.suppress(nats.errors.Error):  # serving: tell the pool
                await self.nc.publish(
                    subjects.node(node, "worker", subjects.WORKER_SPARE_READY),
                    self.config.worker_spare_id.encode(),
                )
            return
        await self.publish_event(
            "node.joined",
            {"node": node, "devices": [d.name for d in self.node_devices.devices]},
            dedupe_id=f"node.joined.{node}.{self.started_at}",
        )

    async def _warm_up(self) -> None:
        """(A spare, before it says it is ready.) Pay on the device thread what a cold start
        in a new process would otherwise pay: the builtin models' tokenizers parsed and
        run, the encoder run once over random weights (``runners.warm_up_bert``), the
        decoders of a cold start's messages built. Nothing of any tenant: a spare may be
        bound to anyone. Best effort: a failure is logged."""
        # A simulated GPU computes on the host.
        device = "cpu" if self.cuda_index is None else f"cuda:{self.cuda_index}"
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
        log.info("worker.warmed", us=_us(t0), models=len(dirs), **took)

    def _spare_subject(self) -> str:
        return subjects.node(self.config.node_id, "worker", f"spare-{self.config.worker_spare_id}")

    async def _serve_tenant(self, tenant: str) -> None:
        """Serve the worker verbs of ``tenant``'s functions (``ANY_TENANT``: every tenant)."""
        node = self.config.node_id
        for verb, req_type, handler in (
            (subjects.WORKER_LOAD, WorkerLoadRequest, self.load),
            (subjects.WORKER_RUN, WorkerRunRequest, self.run),
            (subjects.WORKER_UNLOAD, WorkerUnloadRequest, self.unload),
            (subjects.WORKER_PROFILE, WorkerProfileRequest, self.profile),
        ):
            await self.serve(subjects.worker(node, tenant, verb), req_type, handler)  # type: ignore[arg-type]

    async def bind(self, req: WorkerBindRequest) -> WorkerBindReply:
        """(A spare.) Serve ``req.tenant`` from now on, and only it, for this process's life."""
        if self.tenant is not None:
            raise AlreadyExists(f"this worker serves tenant {self.tenant!r}", field="tenant")
        self.tenant = req.tenant
        self._idle_since = time.monotonic()
        await self._serve_tenant(req.tenant)
        log.info("worker.bound", tenant=req.tenant)
        return WorkerBindReply(worker=self.holder, waited_us=0, new_process=False)

    def _check_tenant(self, tenant: str) -> None:
        """A process bound to a tenant refuses another's functions (isolation)."""
        if self.tenant is not None and tenant != self.tenant:
            raise NotFound("no such function on this worker", field="spec.tenant")

    async def on_stop(self) -> None:
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            await asyncio.gather(self._dispatcher, return_exceptions=True)
        for r in self._ready:  # never silence: the callers hear why
            if not r.fut.done():
                r.fut.set_exception(Unavailable("the worker is stopping"))
        self._ready.clear()
        for task in [*self._loading.values(), *self._answering.values()]:
            task.cancel()
        await asyncio.gather(*self._answering.values(), return_exceptions=True)
        await asyncio.gather(*self._loading.values(), return_exceptions=True)
        self.instances.clear()
        # Off the loop: a batch still computing finishes in its thread.
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
        if self.role != "shared":
            return
        await self.publish_event(
            "node.left",
            {"node": self.config.node_id, "reason": "stopped"},
            dedupe_id=f"node.left.{self.config.node_id}.{self.started_at}",
        )

    # --- instances -------------------------------------------------------------------

    async def instance(self, spec: FunctionSpec) -> tuple[Instance, bool]:
        """The instance of ``spec``, built if needed; returns (instance, was_cold)."""
        key = (spec.tenant, spec.name)
        inst = self.instances.get(key)
        if inst is not None and inst.spec == spec:
            return inst, False
        task = self._loading.get(key)
        if task is None:
            task = asyncio.create_task(self._build(spec))
            self._loading[key] = task
            task.add_done_callback(lambda _: self._loading.pop(key, None))
        inst = await asyncio.shield(task)
        return inst, True

    async def _check_deployed(self, spec: FunctionSpec) -> None:
        """Before a cold start: refuse a function that is no longer deployed as ``spec``.

        The scheduler routes from a watched copy of the registry; this authoritative read
        (only on the cold path) keeps a just-deleted function from being built again.
        """
        record = await get_function(self.buckets.functions, spec.tenant, spec.name)
        if record is None or record.spec != spec:
            raise NotFound(f"function {spec.name!r} is not deployed", field="model")

    async def _build(self, spec: FunctionSpec) -> Instance:
        """Lease the model's tensors from the store and build an instance over them.

        When this worker has built the model before (on the host or a simulated GPU), the
        instance is built over the manifest it got then *while* the store answers; it is
        kept if the store's manifest is the same (the lease then covers those tensors),
        and rebuilt otherwise. A cold start over resident tensors thus costs one store
        round trip, not a round trip plus a build.
        """
        t0 = time.perf_counter()
        if spec.model.architecture not in RUNNERS and spec.model.architecture != "torch-export":
            raise ModelInvalid(
                f"unknown architecture {spec.model.architecture}", field="model.architecture"
            )
        loop = asyncio.get_running_loop()
        model = (spec.model, spec.tenant if spec.model.private else "")
        guess = self._known.get(model) if self.node_devices.backend != "cuda" else None
        early = None
        if guess is not None:
            early = loop.run_in_executor(self._executor, self._make_runner, spec, guess)
        try:
            reg = await request(
                self.nc,
                self._store_subject(subjects.TENSORSTORE_REGISTER),
                RegisterRequest(
                    source=spec.model,
                    tenant=spec.tenant,
                    lease=self._lease_id(spec.tenant, spec.name),
                    holder=self.holder,
                    device=self.gpu,
                ),
                RegisterReply,
                timeout=self.config.deploy_timeout_s,
                what="tensor store of this node",
            )
        except BaseException:
            if early is not None:
                with contextlib.suppress(Exception):
                    self.tensors.release((await early)[1])
            raise
        registered_us = _us(t0)
        self._known.pop(model, None)
        self._known[model] = reg  # newest last
        while len(self._known) > KNOWN_MODELS:
            del self._known[next(iter(self._known))]
        built = None
        if early is not None:
            try:
                built = await early
            except Exception:  # the guess was stale (a segment gone): build from the reply
                built = None
            if built is not None and not _same_build(guess, reg):
                self.tensors.release(built[1])
                built = None
        overlapped = built is not None  # the early build was kept
        try:
            if built is None:
                built = await loop.run_in_executor(self._executor, self._make_runner, spec, reg)
        except BaseException:
            await self._release(self._lease_id(spec.tenant, spec.name))
            raise
        runner, held = built
        inst = Instance(
            spec=spec,
            runner=runner,
            device=self.device,
            model_bytes=reg.model_bytes,
            tensor_count=len(reg.manifest),
            bytes_stored=reg.bytes_stored,
            bytes_deduplicated=reg.bytes_deduplicated,
            load_us=_us(t0),
            tensors=sorted({ref.id for ref in reg.manifest.values()}),
            held=held,
        )
        old = self.instances.get((spec.tenant, spec.name))
        self.instances[(spec.tenant, spec.name)] = inst
        if old is not None:  # a redeploy replaced the spec; the new lease replaced its lease
            await self._let_go(old)
        log.info(
            "instance.built",
            function=spec.name,
            tenant=spec.tenant,
            us=inst.load_us,
            register_us=registered_us,
            store_us=reg.register_us,
            overlapped=overlapped,
        )
        return inst

    def _make_runner(self, spec: FunctionSpec, reg: RegisterReply) -> tuple[Runner, frozenset[str]]:
        """(On the device thread.) A runner over the tensors ``reg`` names, and what it holds."""
        weights, held = self.tensors.acquire(reg.manifest, reg.placement)
        try:
            if reg.program is not None:  # an exported program: its graph from the store
                program = (self.config.shm_dir / reg.program).read_bytes()
                return ExportedRunner.from_program(program, weights), held
            return RUNNERS[spec.model.architecture](Path(reg.model_dir), weights), held
        except BaseException:
            self.tensors.release(held)
            raise

    async def load(self, req: WorkerLoadRequest) -> WorkerLoadReply:
        self._check_tenant(req.spec.tenant)
        inst, cold = await self.instance(req.spec)
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
        """Measure the loaded instance of ``req.spec`` on this node's device.

        Runs on the device's threads like a batch: requests wait behind it, so the
        scheduler asks for the full sweep only in the background, under a time limit.
        """
        inst = self.instances.get((req.spec.tenant, req.spec.name))
        if inst is None or inst.spec != req.spec:  # never builds: it may have been unloaded
            raise NotFound(f"function {req.spec.name!r} has no instance here", field="spec")
        inst.active += 1
        inst.idle.clear()
        try:
            samples = await asyncio.get_running_loop().run_in_executor(
                self._executor,
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
        inst = self.instances.pop((req.tenant, req.function), None)
        if inst is not None:
            await self._let_go(inst)
            await self._release(self._lease_id(req.tenant, req.function))
        return WorkerUnloadReply(unloaded=inst is not None)

    async def _let_go(self, inst: Instance) -> None:
        """Drop a removed instance's views once its running batches are done.

        Only then may its lease go: the store may free what no lease holds.
        """
        await inst.idle.wait()
        self.tensors.release(inst.held)

    # --- leases on the tensor store ------------------------------------------------------

    def _lease_id(self, tenant: str, name: str) -> str:
        return f"{self.holder}|{tenant}/{name}"

    def _store_subject(self, verb: str) -> str:
        return subjects.node(self.config.node_id, "tensorstore", verb)

    async def _release(self, lease_id: str) -> None:
        try:
            await request(
                self.nc,
                self._store_subject(subjects.TENSORSTORE_RELEASE),
                ReleaseRequest(lease=lease_id),
                ReleaseReply,
                timeout=5,
            )
        except PlatformError as exc:  # the lease lapses on its own if we cannot reach the store
            log.warning("lease.release_failed", lease=lease_id, error=exc.message)

    async def renew_leases(self) -> None:
        """Re-announce every instance's lease (also rebuilds a restarted store's table)."""
        claims = [
            LeaseClaim(id=self._lease_id(t, n), tensors=inst.tensors, device=self.gpu)
            for (t, n), inst in self.instances.items()
        ]
        reply = await request(
            self.nc,
            self._store_subject(subjects.TENSORSTORE_RENEW),
            RenewRequest(holder=self.holder, leases=claims),
            RenewReply,
            timeout=5,
        )
        if reply.missing:
            log.error("lease.tensors_missing", count=len(reply.missing))
        lost = set(reply.lost)
        for key in [k for k in self.instances if self._lease_id(*k) in lost]:
            # Its device copies died with a restarted store: rebuild on the next request.
            inst = self.instances.pop(key)
            log.warning("instance.lost_device_copies", function=key[1], tenant=key[0])
            await self._let_go(inst)
            await self._release(self._lease_id(*key))

    async def _upkeep_loop(self) -> None:
        """Each heartbeat: renew the leases; a tenant's process idle too long exits (its pool
        starts a spare when one is needed)."""
        while self.looping:
            runs = self.runs
            await asyncio.sleep(self.config.heartbeat_s)
            if self.runs == runs:  # no request in a whole beat
                await self._trim_device_cache()
            if self.role != "shared" and self.tenant is not None:
                if self.instances or self._loading:
                    self._idle_since = time.monotonic()
                elif (
                    time.monotonic() - self._idle_since > self.config.worker_idle_s
                    and await self._retire()
                ):
                    return
            try:
                await self.renew_leases()
            except PlatformError as exc:
                log.warning("lease.renew_failed", error=exc.message)

    async def _trim_device_cache(self) -> None:
        if self.cuda_index is None or any(inst.active for inst in self.instances.values()):
            return
        loop = asyncio.get_running_loop()
        freed = await loop.run_in_executor(self._executor, _trim_cuda_cache, self.cuda_index)
        if freed:
            log.info("worker.cuda_cache_trimmed", bytes=freed)

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
        """Run one request; a repeat of a dispatch already run (or running) gets its answer."""
        self._check_tenant(req.spec.tenant)
        if not req.dispatch_id:
            return await self._run(req)
        done = self._answered.get(req.dispatch_id)
        if done is not None:
            self.repeats += 1
            return done
        task = self._answering.get(req.dispatch_id)
        if task is None:
            task = asyncio.create_task(self._run(req))
            self._answering[req.dispatch_id] = task
            task.add_done_callback(lambda t: self._remember(req.dispatch_id, t))
        else:
            self.repeats += 1
        return await asyncio.shield(task)

    def _remember(self, dispatch_id: str, task: asyncio.Task[InvokeReply]) -> None:
        self._answering.pop(dispatch_id, None)
        if not task.cancelled() and task.exception() is None:
            self._answered[dispatch_id] = task.result()
            while len(self._answered) > ANSWERS_KEPT:
                del self._answered[next(iter(self._answered))]

    async def _run(self, req: WorkerRunRequest) -> InvokeReply:
        self.runs += 1
        t_start = time.perf_counter()
        load_t = time.perf_counter()
        if (req.spec.tenant, req.spec.name) not in self.instances:
            await self._check_deployed(req.spec)
        inst, cold = await self.instance(req.spec)
        load_us = _us(load_t) if cold else 0
        xfer_t = time.perf_counter()
        inputs = await self._inputs(req, inst)
        transfer_us = _us(xfer_t)
        comp_t = time.perf_counter()
        inst.active += 1
        inst.idle.clear()
        await self._observe(req, "start", sum(len(raw) for _, raw in inputs.values()))
        try:
            ran = await self._compute(inst, req, inputs)
            outputs = ran.fut.result()
        finally:
            inst.active -= 1
            if not inst.active:
                inst.idle.set()
            await self._observe(req, "end")
        compute_us = _us(comp_t)
        xfer_t = time.perf_counter()
        payloads = [
            await self._output(name, out, req.spec.tenant, req.intermediate)
            for name, out in outputs.items()
        ]
        transfer_us += _us(xfer_t)
        breakdown = Breakdown(
            queue_us=req.queue_us,
            transfer_us=transfer_us,
            load_us=load_us,
            compute_us=compute_us,
            total_us=req.queue_us + _us(t_start),
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

    async def _compute(self, inst: Instance, req: WorkerRunRequest, inputs: Inputs) -> _Ready:
        """Queue a request for its instance's next batch; returns it once computed.

        Ready requests are ordered by deadline slack (the deadline minus the instance's
        moving-average batch time), so a short urgent request is not stuck behind a long
        batch that arrived first; without a deadline a request waits behind every one that
        has one. The dispatcher batches a request with the other ready requests of its
        instance (dynamic batching, up to the profile's batch size).
        """
        loop = asyncio.get_running_loop()
        item = _Ready(
            slack=(req.deadline or math.inf) - inst.compute_s,
            seq=next(self._ready_seq),
            inst=inst,
            inputs=inputs,
            rows=rows(inputs),
            queued_at=loop.time(),
            fut=loop.create_future(),
            max_batch=max(1, req.max_batch or req.spec.options.max_batch_size),
        )
        if req.concurrency:
            inst.concurrency = min(req.concurrency, self.streams)
        heapq.heappush(self._ready, item)
        self._wake.set()
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = asyncio.create_task(self._dispatch())
        await item.fut
        return item

    async def _dispatch(self) -> None:
        """Start batches while the device has a free stream, in slack order (see _compute).

        An idle device waits up to ``batch_wait_s`` for the head request's batch to fill,
        never past that request's slack; a busy one does not wait (requests gather while
        the running batches compute).
        """
        loop = asyncio.get_running_loop()
        running: set[asyncio.Task[None]] = set()
        try:
            while self._ready or running:
                self._wake.clear()
                head = self._next_head(running)
                if head is not None and not running:
                    wait = self._fill_wait(head, loop.time())
                    if wait > 0:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._wake.wait(), wait)
                        continue
                if head is not None:
                    batch = self._take_batch(head)
                    head.inst.streams += 1
                    task = asyncio.create_task(self._run_batch(batch))
                    running.add(task)
                    task.add_done_callback(running.discard)
                    continue
                waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(self._wake.wait())]
                await asyncio.wait([*running, *waits], return_when=asyncio.FIRST_COMPLETED)
                for w in waits:
                    w.cancel()
        finally:
            for task in running:
                task.cancel()

    def _next_head(self, running: set[asyncio.Task[None]]) -> _Ready | None:
        """The most urgent ready request that may start now (a free stream, its instance
        under its concurrency), dropping cancelled ones; None if none may."""
        while self._ready and self._ready[0].fut.done():
            heapq.heappop(self._ready)
        if len(running) >= self.streams:
            return None
        return next(
            (
                r
                for r in sorted(self._ready)
                if not r.fut.done() and r.inst.streams < r.inst.concurrency
            ),
            None,
        )

    def _fill_wait(self, head: _Ready, now: float) -> float:
        """How much longer an idle device should wait for ``head``'s batch to fill."""
        if not head.inst.runner.batchable or head.max_batch <= 1:
            return 0.0
        queued = sum(r.rows for r in self._ready if r.inst is head.inst and not r.fut.done())
        if queued >= head.max_batch:
            return 0.0
        budget = self.config.batch_wait_s - (now - head.queued_at)
        if head.slack != math.inf:  # never wait past the request's slack
            budget = min(budget, head.slack - time.time())
        return max(budget, 0.0)

    def _take_batch(self, head: _Ready) -> list[_Ready]:
        """``head`` and, in slack order, its instance's other ready requests that fit."""
        batch, rest, total = [head], [], head.rows
        for r in sorted(self._ready):
            if r is head or r.fut.done():
                continue
            if (
                r.inst is head.inst
                and head.inst.runner.batchable
                and total + r.rows <= head.max_batch
            ):
                batch.append(r)
                total += r.rows
            else:
                rest.append(r)
        self._ready[:] = rest
        heapq.heapify(self._ready)
        return batch

    async def _run_batch(self, batch: list[_Ready]) -> None:
        """Compute one batch on the device thread and hand each request its own rows.

        A batch that fails is retried one request at a time, so each caller gets its own
        result or its own error (one bad input does not fail its neighbours).
        """
        inst = batch[0].inst
        loop = asyncio.get_running_loop()
        try:
            t0 = time.perf_counter()
            if len(batch) > 1:
                try:
                    merged = merge([r.inputs for r in batch])
                    out = await loop.run_in_executor(self._executor, inst.runner.infer, merged)
                    parts = split(out, [r.rows for r in batch])
                except Exception:  # some request's own fault: find out whose, one by one
                    parts = None
                if parts is not None:
                    inst.compute_s = 0.8 * inst.compute_s + 0.2 * (time.perf_counter() - t0)
                    for r, result in zip(batch, parts, strict=True):
                        r.batch = len(batch)
                        if not r.fut.done():
                            r.fut.set_result(result)
                    return
            for r in batch:
                t0 = time.perf_counter()
                try:
                    result = await loop.run_in_executor(self._executor, inst.runner.infer, r.inputs)
                except Exception as exc:  # the request's own error: its caller gets it
                    if not r.fut.done():
                        r.fut.set_exception(exc)
                    continue
                inst.compute_s = 0.8 * inst.compute_s + 0.2 * (time.perf_counter() - t0)
                if not r.fut.done():
                    r.fut.set_result(result)
        finally:
            inst.streams -= 1
            self._wake.set()

    async def _observe(
        self, req: WorkerRunRequest, phase: Literal["start", "end"], nbytes: int = 0
    ) -> None:
        """Tell the memory service what this request holds on the GPU (for the reservations
        of intermediates); a plain publish, nothing waited for."""
        if self.gpu is None:
            return
        msg = MemObserve(
            device=self.gpu,
            function=f"{req.spec.tenant}/{req.spec.name}",
            request_id=req.request_id,
            phase=phase,
            nbytes=nbytes,
        )
        subject = subjects.node(self.config.node_id, "memory", subjects.MEMORY_OBSERVE)
        with contextlib.suppress(nats.errors.Error):
            await self.nc.publish(subject, encode(msg))

    async def _inputs(
        self, req: WorkerRunRequest, inst: Instance
    ) -> Mapping[str, tuple[list[int], bytes]]:
        given = {p.name: p for p in req.inputs}
        out: dict[str, tuple[list[int], bytes]] = {}
        for spec in inst.runner.inputs:
            p = given.get(spec.name)
            if p is None:
                raise InvalidArgument(
                    f"input {spec.name!r} is missing", field=f"inputs[{spec.name}]"
                )
            out[spec.name] = (p.shape, await self._payload_bytes(p, req.spec.tenant))
        return out

    async def _payload_bytes(self, p: TensorPayload, tenant: str) -> bytes:
        if p.data is not None:
            return p.data
        if p.tube is None:
            raise InvalidArgument(
                f"input {p.name!r} has neither data nor a tube", field=f"inputs[{p.name}]"
            )
        # Resident on this node's host tier: a no-op for a tube written on this machine,
        # a chunked copy from the node that holds it otherwise. A workflow intermediate
        # this node's simulated GPU holds is read where it is (compute is on the CPU).
        tier = "host"
        if (
            self.gpu is not None
            and self.node_devices.backend == "sim"
            and any(
                pl.node == self.config.node_id and pl.tier == self.gpu for pl in p.tube.placements
            )
        ):
            tier = self.gpu
        here = await self._ensure(p.tube.id, tenant, tier)
        try:
            data = await asyncio.to_thread(self._read_copy, here)
        except FileNotFoundError:  # the GPU's copy was evicted (swapped to host) meanwhile
            here = await self._ensure(p.tube.id, tenant, "host")
            data = await asyncio.to_thread(self._read_copy, here)
        if len(data) < here.tube.nbytes:
            raise NotFound(f"tube {p.tube.id} is truncated", field=f"inputs[{p.name}]")
        return data

    def _read_copy(self, here: EnsureReply) -> bytes:
        """The bytes of a tube's copy: its range of the file (a whole tube file, or a block
        of a pool segment at its offset)."""
        n, offset = here.tube.nbytes, here.placement.offset
        with open(self.config.shm_dir / here.placement.segment, "rb") as f:
            if n <= _PREAD_MAX:
                return os.pread(f.fileno(), n, offset)
            parts = []  # a read returns at most ~2 GiB on Linux
            for start in range(0, n, _PREAD_MAX):
                parts.append(os.pread(f.fileno(), min(_PREAD_MAX, n - start), offset + start))
            return b"".join(parts)

    async def _ensure(self, tube_id: str, tenant: str, tier: str) -> EnsureReply:
        return await request(
            self.nc,
            subjects.node(self.config.node_id, "transfer", subjects.TRANSFER_ENSURE),
            EnsureRequest(tube_id=tube_id, tenant=tenant, tier=tier),
            EnsureReply,
            timeout=self.config.request_timeout_s,
            what="transfer service of this node",
        )

    async def _output(
        self, name: str, out: Output, tenant: str, intermediate: bool = False
    ) -> TensorPayload:
        """An output inline when small, else as a host tube; a workflow's intermediate
        always as a tube, adopted onto this node's (simulated) GPU tier when there is room,
        so the next step on this GPU reads it where it is."""
        if len(out.data) <= self.config.inline_threshold and not intermediate:
            data = bytes(out.data)  # small: into the message
            return TensorPayload(name=name, datatype=out.datatype, shape=out.shape, data=data)  # type: ignore[arg-type]
        tube = await asyncio.to_thread(
            write_tube,
            self.config.shm_dir,
            self.config.node_id,
            tenant,
            datatype=out.datatype,
            shape=out.shape,
            data=out.data,
        )
        if intermediate and self.gpu is not None and self.node_devices.backend == "sim":
            try:
                adopted = await request(
                    self.nc,
                    subjects.node(self.config.node_id, "transfer", subjects.TRANSFER_ADOPT),
                    AdoptRequest(tube=tube, tier=self.gpu),
                    AdoptReply,
                    timeout=self.config.request_timeout_s,
                    what="transfer service of this node",
                )
                tube = adopted.tube
            except ResourceExhausted:  # no room on the GPU: it stays a host tube
                await self.buckets.tubes.put(tube.id, encode_json(tube))
        else:
            await self.buckets.tubes.put(tube.id, encode_json(tube))
        return TensorPayload(name=name, datatype=out.datatype, shape=out.shape, tube=tube)  # type: ignore[arg-type]


class PooledWorkerService(WorkerService):
    """A worker process of a node's pool (a spare, or bound to one tenant): no heartbeat of
    its own, since the pool manager speaks for the node."""

    node_scoped = False
