"""A worker's function instances: built over tensors leased from the node's tensor store.

Every weight is a zero-copy view of a shared-memory segment or, on a real GPU, of the
store's device copy (see ``TensorMap``). An instance holds a lease on its tensors,
renewed each heartbeat, and its views are let go only once its running batches are done,
so the store never frees what a batch still reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from gpufaas.shared import subjects
from gpufaas.shared.errors import DeadlineExceeded, ModelInvalid, PlatformError, Unavailable
from gpufaas.shared.identity import FunctionRef
from gpufaas.shared.messages import (
    FunctionSpec,
    LeaseClaim,
    ModelSource,
    RegisterReply,
    RegisterRequest,
    ReleaseReply,
    ReleaseRequest,
    RenewReply,
    RenewRequest,
)
from gpufaas.shared.paths import read_file, under
from gpufaas.shared.rpc import request
from gpufaas.shared.service import Service
from gpufaas.worker.exported import ExportedRunner
from gpufaas.worker.runners import RUNNERS, Runner
from gpufaas.worker.tensor_map import TensorMap

if TYPE_CHECKING:
    from gpufaas.worker.lanes import Lane

log = structlog.get_logger()

KNOWN_MODELS = 256  # store answers remembered for overlapping builds (see Instances.build)


@dataclass(slots=True)
class Instance:
    """A built function instance on one device."""

    spec: FunctionSpec
    runner: Runner
    device: str  # its lane's: the GPU ("gpu:N"), or "cpu" on a node without one
    model_bytes: int
    tensor_count: int
    bytes_stored: int
    bytes_deduplicated: int
    load_us: int
    tensors: list[str]  # ids of the tensors it uses, leased from the tensor store
    held: frozenset[str]  # the segments its weights view (see TensorMap)
    active: int = 0  # requests computing on it now
    streams: int = 0  # batches computing on it now
    concurrency: int = 1  # batches it may run at once (from its profile, see Batcher)
    compute_s: float = 0.0  # moving average of a batch's compute time (dispatch order)
    last_rows: int = 1  # rows of its last batch: how many an idle device waits for (Batcher)
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # set while active == 0
    gpu: str | None = None  # the GPU whose device copies its lease holds (None: host only)

    def __post_init__(self) -> None:
        self.idle.set()


def us_since(since: float) -> int:
    return int((time.perf_counter() - since) * 1e6)


def _same_build(a: RegisterReply | None, b: RegisterReply) -> bool:
    """Whether an instance built from ``a`` is one built from ``b`` (host views only)."""
    return (
        a is not None
        and (a.model_dir, a.program, a.manifest) == (b.model_dir, b.program, b.manifest)
        and (b.placement is None or all(s.ipc_handle is None for s in b.placement.segments))
    )


Built = tuple[Runner, frozenset[str]]  # a runner and the segments it holds


class Instances:
    """The instances of one worker process, by function, and their leases: one per
    function on one of its lanes (``live``), and more on other lanes when the function is
    scaled out within the node (``replicas``); a request runs on the least busy."""

    def __init__(self, service: Service, tensors: TensorMap, *, holder: str, backend: str) -> None:
        self.service = service  # its NATS connection and config
        self.tensors = tensors
        self.holder = holder  # who holds the leases: unique per process life
        self.backend = backend
        self.live: dict[FunctionRef, Instance] = {}
        self.replicas: dict[FunctionRef, dict[str, Instance]] = {}  # more, by device
        self.loading: dict[FunctionRef, asyncio.Task[Instance]] = {}
        self._adding: dict[tuple[FunctionRef, str], asyncio.Task[Instance]] = {}
        # The store's last answer per model: what a new instance is built over while the
        # store confirms it (see build).
        self._known: dict[tuple[ModelSource, str], RegisterReply] = {}

    async def get(
        self, spec: FunctionSpec, lane: Lane, *, move: bool = False
    ) -> tuple[Instance, bool]:
        """The instance of ``spec``, built on ``lane`` if there is none; returns (instance,
        was_cold). With ``move``, one on another lane is built again on ``lane`` (a load
        the placement sent to another GPU), replacing it as a redeploy does."""
        ref = FunctionRef(spec.tenant, spec.name)
        inst = self.live.get(ref)
        if inst is not None and inst.spec == spec and (not move or inst.device == lane.device):
            return inst, False
        joined = self.loading.get(ref)
        if joined is not None:
            try:
                inst = await asyncio.shield(joined)
                if not move or inst.device == lane.device:
                    return inst, True
            except (DeadlineExceeded, Unavailable):
                # A build started before this request failed on a peer that was away (a
                # store that died and came back): this request builds again, once.
                log.info("worker.build_retried", function=ref.key)
        task = self.loading.get(ref)
        if task is None or task is joined:
            task = asyncio.create_task(self.build(spec, lane))
            self.loading[ref] = task
            task.add_done_callback(lambda t: self._done_loading(ref, t))
        inst = await asyncio.shield(task)
        return inst, True

    def pick(self, ref: FunctionRef) -> Instance | None:
        """The instance of ``ref`` a request runs on: the least busy of its instances."""
        inst = self.live.get(ref)
        more = self.replicas.get(ref)
        if inst is None or not more:
            return inst
        return min([inst, *more.values()], key=lambda i: i.active)

    def every(self) -> list[tuple[FunctionRef, Instance]]:
        """Every instance, first ones and more, with its function."""
        out = list(self.live.items())
        out += [(ref, inst) for ref, more in self.replicas.items() for inst in more.values()]
        return out

    def devices(self, ref: FunctionRef) -> list[str]:
        """The devices ``ref``'s instances are on, its first instance's first."""
        inst = self.live.get(ref)
        return ([inst.device] if inst else []) + list(self.replicas.get(ref, {}))

    async def add(self, spec: FunctionSpec, lane: Lane) -> tuple[Instance, bool]:
        """An instance of ``spec`` on ``lane`` besides the ones it has (a scale-out within
        the node); the first one when it has none. Returns (instance, was_cold)."""
        ref = FunctionRef(spec.tenant, spec.name)
        inst = self.live.get(ref)
        if inst is None or inst.spec != spec:
            return await self.get(spec, lane)
        if inst.device == lane.device:
            return inst, False
        have = self.replicas.get(ref, {}).get(lane.device)
        if have is not None and have.spec == spec:
            return have, False
        key = (ref, lane.device)
        task = self._adding.get(key)
        if task is None:
            task = asyncio.create_task(self.build(spec, lane, replica=True))
            self._adding[key] = task
            task.add_done_callback(lambda _: self._adding.pop(key, None))
        return await asyncio.shield(task), True

    def _done_loading(self, ref: FunctionRef, task: asyncio.Task[Instance]) -> None:
        if self.loading.get(ref) is task:
            del self.loading[ref]

    async def build(self, spec: FunctionSpec, lane: Lane, *, replica: bool = False) -> Instance:
        """Lease the model's tensors from the store and build an instance over them.

        When this worker has built the model before (on the host or a simulated GPU), the
        instance is built over the manifest it got then *while* the store answers; it is
        kept if the store's manifest is the same (the lease then covers those tensors),
        and rebuilt otherwise. A cold start over resident tensors thus costs one store
        round trip, not a round trip plus a build. Built on ``lane``'s threads, its
        lease naming ``lane``'s GPU (the store places the device copies there).
        """
        t0 = time.perf_counter()
        if spec.model.architecture not in RUNNERS and spec.model.architecture != "torch-export":
            raise ModelInvalid(
                f"unknown architecture {spec.model.architecture}", field="model.architecture"
            )
        loop = asyncio.get_running_loop()
        ref = FunctionRef(spec.tenant, spec.name)
        model = (spec.model, spec.tenant if spec.model.private else "")
        guess = self._known.get(model) if self.backend != "cuda" else None
        early = None
        if guess is not None:
            early = loop.run_in_executor(lane.executor, self._make_runner, spec, guess)
        reg = await self._register(spec, ref, lane.gpu, early)
        registered_us = us_since(t0)
        self._remember(model, reg)
        built = await self._kept(early, guess, reg)
        overlapped = built is not None  # the early build was kept
        try:
            if built is None:
                built = await loop.run_in_executor(lane.executor, self._make_runner, spec, reg)
        except BaseException:
            await self.release(ref, lane.gpu)
            raise
        inst = self._instance(spec, reg, built, t0, lane)
        if replica:
            self.replicas.setdefault(ref, {})[lane.device] = inst
        else:
            await self._install(ref, inst)
        log.info(
            "instance.built",
            function=spec.name,
            tenant=spec.tenant,
            device=inst.device,
            us=inst.load_us,
            register_us=registered_us,
            store_us=reg.register_us,
            overlapped=overlapped,
        )
        return inst

    async def _register(
        self,
        spec: FunctionSpec,
        ref: FunctionRef,
        gpu: str | None,
        early: asyncio.Future[Built] | None,
    ) -> RegisterReply:
        """The store's answer for ``spec``'s model, leased to this process; on failure the
        early build (if any) lets its views go."""
        try:
            return await request(
                self.service.nc,
                self._store_subject(subjects.TENSORSTORE_REGISTER),
                RegisterRequest(
                    source=spec.model,
                    tenant=spec.tenant,
                    lease=self.lease_id(ref, gpu),
                    holder=self.holder,
                    device=gpu,
                ),
                RegisterReply,
                timeout=self.service.config.deploy_timeout_s,
                what="tensor store of this node",
            )
        except BaseException:
            if early is not None:
                with contextlib.suppress(Exception):
                    self.tensors.release((await early)[1])
            raise

    def _remember(self, model: tuple[ModelSource, str], reg: RegisterReply) -> None:
        self._known.pop(model, None)
        self._known[model] = reg  # newest last
        while len(self._known) > KNOWN_MODELS:
            del self._known[next(iter(self._known))]

    async def _kept(
        self, early: asyncio.Future[Built] | None, guess: RegisterReply | None, reg: RegisterReply
    ) -> Built | None:
        """The early build if it was built over what the store answered, else None."""
        if early is None:
            return None
        try:
            built = await early
        except Exception:  # the guess was stale (a segment gone): build from the reply
            return None
        if not _same_build(guess, reg):
            self.tensors.release(built[1])
            return None
        return built

    def _instance(
        self, spec: FunctionSpec, reg: RegisterReply, built: Built, t0: float, lane: Lane
    ) -> Instance:
        runner, held = built
        return Instance(
            spec=spec,
            runner=runner,
            device=lane.device,
            gpu=lane.gpu,
            model_bytes=reg.model_bytes,
            tensor_count=len(reg.manifest),
            bytes_stored=reg.bytes_stored,
            bytes_deduplicated=reg.bytes_deduplicated,
            load_us=us_since(t0),
            tensors=sorted({t.id for t in reg.manifest.values()}),
            held=held,
        )

    async def _install(self, ref: FunctionRef, inst: Instance) -> None:
        old = self.live.get(ref)
        self.live[ref] = inst
        stale = self.replicas.get(ref, {})
        for device in [d for d, r in stale.items() if r.spec != inst.spec or d == inst.device]:
            await self._drop(ref, stale.pop(device))  # another spec, or where it now is
        if old is None:
            return
        # A redeploy replaced the spec (the new lease replaced its lease), or a load moved
        # it to another GPU: its lease there goes once its batches are done.
        await self.let_go(old)
        if old.gpu != inst.gpu:
            await self.release(ref, old.gpu)

    def _make_runner(self, spec: FunctionSpec, reg: RegisterReply) -> Built:
        """(On the device thread.) A runner over the tensors ``reg`` names, and what it holds."""
        weights, held = self.tensors.acquire(reg.manifest, reg.placement)
        try:
            if reg.program is not None:  # an exported program: its graph from the store
                path = under(self.service.config.shm_dir, reg.program, "program")
                program = read_file(path)  # never through a link
                return ExportedRunner.from_program(program, weights), held
            return RUNNERS[spec.model.architecture](Path(reg.model_dir), weights), held
        except BaseException:
            self.tensors.release(held)
            raise

    async def remove(self, ref: FunctionRef, device: str | None = None) -> bool:
        """Unload ``ref``'s instances (only the one on ``device``, when given; another
        then serves its requests): views, then leases. False if there was none."""
        more = self.replicas.get(ref, {})
        if device is not None and device in more:
            extra = more.pop(device)
            if not more:
                del self.replicas[ref]
            await self._drop(ref, extra)
            return True
        inst = self.live.get(ref)
        if inst is None or (device is not None and inst.device != device):
            return False
        if device is not None and more:  # another instance takes its place
            self.live[ref] = more.pop(next(iter(more)))
            if not more:
                del self.replicas[ref]
        else:
            del self.live[ref]
            for other in self.replicas.pop(ref, {}).values():
                await self._drop(ref, other)
        await self._drop(ref, inst)
        return True

    async def _drop(self, ref: FunctionRef, inst: Instance) -> None:
        """An instance taken out of the tables: its views once idle, then its lease."""
        await self.let_go(inst)
        await self.release(ref, inst.gpu)

    async def let_go(self, inst: Instance) -> None:
        """Drop a removed instance's views once its running batches are done.

        Only then may its lease go: the store may free what no lease holds.
        """
        await inst.idle.wait()
        self.tensors.release(inst.held)

    async def stop(self) -> None:
        """Cancel the builds under way and forget every instance."""
        tasks = list(self.loading.values())
        for task in tasks:
            task.cancel()
        adding = list(self._adding.values())
        for task in adding:
            task.cancel()
        await asyncio.gather(*tasks, *adding, return_exceptions=True)
        self.live.clear()
        self.replicas.clear()

    # --- leases on the tensor store ------------------------------------------------------

    def lease_id(self, ref: FunctionRef, gpu: str | None) -> str:
        """The lease of ``ref``'s instance on ``gpu``: one per GPU, so that an instance
        moved to another GPU lets go of the copies on the one it left."""
        return f"{self.holder}|{ref.key}" + (f"|{gpu}" if gpu else "")

    def _store_subject(self, verb: str) -> str:
        return subjects.node(self.service.config.node_id, "tensorstore", verb)

    async def release(self, ref: FunctionRef, gpu: str | None) -> None:
        lease_id = self.lease_id(ref, gpu)
        try:
            await request(
                self.service.nc,
                self._store_subject(subjects.TENSORSTORE_RELEASE),
                ReleaseRequest(lease=lease_id),
                ReleaseReply,
                timeout=5,
            )
        except PlatformError as exc:  # the lease lapses on its own if we cannot reach the store
            log.warning("lease.release_failed", lease=lease_id, error=exc.message)

    async def renew(self) -> None:
        """Re-announce every instance's lease (also rebuilds a restarted store's table)."""
        claims = [
            LeaseClaim(id=self.lease_id(ref, inst.gpu), tensors=inst.tensors, device=inst.gpu)
            for ref, inst in self.every()
        ]
        reply = await request(
            self.service.nc,
            self._store_subject(subjects.TENSORSTORE_RENEW),
            RenewRequest(holder=self.holder, leases=claims),
            RenewReply,
            timeout=5,
        )
        if reply.missing:
            log.error("lease.tensors_missing", count=len(reply.missing))
        lost = set(reply.lost)
        for ref, inst in [(r, i) for r, i in self.every() if self.lease_id(r, i.gpu) in lost]:
            # Its device copies died with a restarted store: rebuild on the next request.
            log.warning("instance.lost_device_copies", function=ref.name, tenant=ref.tenant)
            await self.remove(ref, inst.device)
