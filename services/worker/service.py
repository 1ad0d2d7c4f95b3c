"""The worker of one node: builds function instances over shared tensors and runs them.

Instances are built from the tensor store's manifest: every weight is a zero-copy
view of a shared-memory segment. Model work runs on one executor thread per device,
never on the event loop.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import msgspec
import structlog
import torch

from gpufaas.shared import subjects
from gpufaas.shared.config import Config
from gpufaas.shared.devices import NodeDevices, parse_devices
from gpufaas.shared.errors import InvalidArgument, ModelInvalid, NotFound, PlatformError
from gpufaas.shared.messages import (
    Breakdown,
    DeviceInfo,
    FunctionSpec,
    InvokeReply,
    LeaseClaim,
    RegisterReply,
    RegisterRequest,
    ReleaseReply,
    ReleaseRequest,
    RenewReply,
    RenewRequest,
    ResolveReply,
    ResolveRequest,
    TensorPayload,
    TensorRef,
    WorkerLoadReply,
    WorkerLoadRequest,
    WorkerRunRequest,
    WorkerUnloadReply,
    WorkerUnloadRequest,
    encode_json,
)
from gpufaas.shared.registry import get_function
from gpufaas.shared.rpc import request
from gpufaas.shared.service import Service
from gpufaas.shared.shm import SegmentCache, write_tube
from gpufaas.worker.device_tier import DeviceTier
from gpufaas.worker.runners import RUNNERS, Output, Runner

log = structlog.get_logger()


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


def _us(since: float) -> int:
    return int((time.perf_counter() - since) * 1e6)


class WorkerService(Service):
    """Runs function instances for its node."""

    name = "worker"

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.node_devices: NodeDevices = parse_devices(config.devices, config.topology)
        gpus = [d for d in self.node_devices.devices if d.kind != "host"]
        # The device instances are placed on. On a real GPU the weights get one device
        # copy per tensor, shared by the instances there; on a simulated GPU compute runs
        # on the CPU over the shared host pages and the GPU's capacity is accounted.
        self.device = gpus[0].name if gpus else "cpu"
        cuda = self.node_devices.backend == "cuda" and torch.cuda.is_available()
        self.torch_device = torch.device("cuda:0" if cuda else "cpu")
        self.tier: DeviceTier | None = None
        if gpus:
            self.tier = DeviceTier(
                gpus[0].name, gpus[0].memory_bytes, self.torch_device if cuda else None
            )
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"dev-{self.device}")
        self.segments = SegmentCache(config.shm_dir)
        self.instances: dict[tuple[str, str], Instance] = {}
        self._loading: dict[tuple[str, str], asyncio.Task[Instance]] = {}
        # Who holds this process's leases on the tensor store: unique per process life.
        self.holder = f"{config.node_id}/{os.getpid()}/{self.started_at:.6f}"

    async def on_start(self) -> None:
        node = self.config.node_id
        self.spawn(self._upkeep_loop(), "upkeep")
        await self.serve(
            subjects.node(node, self.name, subjects.WORKER_LOAD), WorkerLoadRequest, self.load
        )
        await self.serve(
            subjects.node(node, self.name, subjects.WORKER_RUN), WorkerRunRequest, self.run
        )
        await self.serve(
            subjects.node(node, self.name, subjects.WORKER_UNLOAD), WorkerUnloadRequest, self.unload
        )
        await self.publish_event(
            "node.joined",
            {"node": node, "devices": [d.name for d in self.node_devices.devices]},
            dedupe_id=f"node.joined.{node}.{self.started_at}",
        )

    async def on_stop(self) -> None:
        for task in list(self._loading.values()):
            task.cancel()
        await asyncio.gather(*self._loading.values(), return_exceptions=True)
        self.instances.clear()
        # Off the loop: a batch still computing finishes in its thread.
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
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
        t0 = time.perf_counter()
        reg = await request(
            self.nc,
            self._store_subject(subjects.TENSORSTORE_REGISTER),
            RegisterRequest(
                source=spec.model,
                tenant=spec.tenant,
                lease=self._lease_id(spec.tenant, spec.name),
                holder=self.holder,
            ),
            RegisterReply,
            timeout=self.config.deploy_timeout_s,
            what="tensor store of this node",
        )
        runner_cls = RUNNERS.get(spec.model.architecture)
        if runner_cls is None:
            raise ModelInvalid(
                f"unknown architecture {spec.model.architecture}", field="model.architecture"
            )
        loop = asyncio.get_running_loop()

        tensor_ids = {ref.id for ref in reg.manifest.values()}

        def build() -> Runner:
            weights = {name: self._view(ref) for name, ref in reg.manifest.items()}
            if self.tier is None:
                return runner_cls(Path(reg.model_dir), weights)
            weights = self.tier.acquire(reg.manifest, weights, time.time())
            try:
                return runner_cls(Path(reg.model_dir), weights)
            except BaseException:
                self.tier.release(tensor_ids, time.time())
                raise

        try:
            runner = await loop.run_in_executor(self._executor, build)
        except BaseException:
            await self._release(self._lease_id(spec.tenant, spec.name))
            raise
        inst = Instance(
            spec=spec,
            runner=runner,
            device=self.device,
            model_bytes=reg.model_bytes,
            tensor_count=len(reg.manifest),
            bytes_stored=reg.bytes_stored,
            bytes_deduplicated=reg.bytes_deduplicated,
            load_us=_us(t0),
            tensors=sorted(tensor_ids),
        )
        old = self.instances.get((spec.tenant, spec.name))
        if old is not None:  # a redeploy replaced the spec: give back the old device copies
            await self._release_device(old)
        self.instances[(spec.tenant, spec.name)] = inst
        log.info("instance.built", function=spec.name, tenant=spec.tenant, us=inst.load_us)
        return inst

    def _view(self, ref: TensorRef) -> torch.Tensor:
        """A zero-copy tensor over the shared segment."""
        dtype = getattr(torch, ref.dtype)
        count = math.prod(ref.shape)
        if count == 0:
            return torch.empty(ref.shape, dtype=dtype)
        flat = torch.frombuffer(
            self.segments.map(ref.segment), dtype=dtype, count=count, offset=ref.offset
        )
        return flat.view(ref.shape)

    async def load(self, req: WorkerLoadRequest) -> WorkerLoadReply:
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

    async def unload(self, req: WorkerUnloadRequest) -> WorkerUnloadReply:
        inst = self.instances.pop((req.tenant, req.function), None)
        if inst is not None:
            await self._release_device(inst)
            await self._release(self._lease_id(req.tenant, req.function))
        return WorkerUnloadReply(unloaded=inst is not None)

    async def _release_device(self, inst: Instance) -> None:
        if self.tier is not None:
            loop = asyncio.get_running_loop()
            ids = set(inst.tensors)
            await loop.run_in_executor(self._executor, self.tier.release, ids, time.time())

    async def reclaim_device_once(self, now: float) -> int:
        """Free device copies idle for the keep-alive (run each heartbeat; tests pick ``now``)."""
        if self.tier is None:
            return 0
        loop = asyncio.get_running_loop()
        keep = self.config.tensor_keep_alive_s
        return await loop.run_in_executor(self._executor, self.tier.reclaim_once, now, keep)

    def devices(self) -> list[DeviceInfo]:
        """Heartbeat: the device this worker places instances on, with its tier's usage."""
        if self.tier is None:
            return []
        info = next(d for d in self.node_devices.devices if d.name == self.tier.name)
        return [msgspec.structs.replace(info, used_bytes=self.tier.used)]

    # --- leases on the tensor store ------------------------------------------------------

    def _lease_id(self, tenant: str, name: str) -> str:
        return f"{self.holder}|{tenant}/{name}"

    def _store_subject(self, verb: str) -> str:
        return subjects.node(self.config.node_id, "tensorstore", verb)

    async def _release(self, lease_id: str) -> None:
        try:
            await request(self.nc, self._store_subject(subjects.TENSORSTORE_RELEASE),
                          ReleaseRequest(lease=lease_id), ReleaseReply, timeout=5)  # fmt: skip
        except PlatformError as exc:  # the lease lapses on its own if we cannot reach the store
            log.warning("lease.release_failed", lease=lease_id, error=exc.message)

    async def renew_leases(self) -> None:
        """Re-announce every instance's lease (also rebuilds a restarted store's table)."""
        claims = [
            LeaseClaim(id=self._lease_id(t, n), tensors=inst.tensors)
            for (t, n), inst in self.instances.items()
        ]
        reply = await request(self.nc, self._store_subject(subjects.TENSORSTORE_RENEW),
                              RenewRequest(holder=self.holder, leases=claims), RenewReply,
                              timeout=5)  # fmt: skip
        if reply.missing:
            log.error("lease.tensors_missing", count=len(reply.missing))

    async def _upkeep_loop(self) -> None:
        """Each heartbeat: renew the leases, free device copies past their keep-alive."""
        while self.looping:
            await asyncio.sleep(self.config.heartbeat_s)
            try:
                await self.renew_leases()
            except PlatformError as exc:
                log.warning("lease.renew_failed", error=exc.message)
            await self.reclaim_device_once(time.time())

    # --- invocation ------------------------------------------------------------------

    async def run(self, req: WorkerRunRequest) -> InvokeReply:
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
        loop = asyncio.get_running_loop()
        outputs = await loop.run_in_executor(self._executor, inst.runner.infer, inputs)
        compute_us = _us(comp_t)
        xfer_t = time.perf_counter()
        payloads = [await self._output(name, out, req.spec.tenant) for name, out in outputs.items()]
        transfer_us += _us(xfer_t)
        breakdown = Breakdown(
            queue_us=req.queue_us,
            transfer_us=transfer_us,
            load_us=load_us,
            compute_us=compute_us,
            total_us=req.queue_us + _us(t_start),
            cold=cold,
        )
        return InvokeReply(
            function=req.spec.name,
            request_id=req.request_id,
            outputs=payloads,
            node=self.config.node_id,
            device=inst.device,
            breakdown=breakdown,
        )

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
        resolved = await request(
            self.nc,
            subjects.node(self.config.node_id, "transfer", subjects.TRANSFER_RESOLVE),
            ResolveRequest(tube_id=p.tube.id, tenant=tenant),
            ResolveReply,
            timeout=self.config.request_timeout_s,
            what="transfer service of this node",
        )
        data = await asyncio.to_thread(Path(resolved.path).read_bytes)
        if len(data) != resolved.tube.nbytes:
            raise NotFound(f"tube {p.tube.id} is truncated", field=f"inputs[{p.name}]")
        return data

    async def _output(self, name: str, out: Output, tenant: str) -> TensorPayload:
        if len(out.data) <= self.config.inline_threshold:
            return TensorPayload(name=name, datatype=out.datatype, shape=out.shape, data=out.data)  # type: ignore[arg-type]
        tube = await asyncio.to_thread(
            write_tube,
            self.config.shm_dir,
            self.config.node_id,
            tenant,
            datatype=out.datatype,
            shape=out.shape,
            data=out.data,
        )
        await self.buckets.tubes.put(tube.id, encode_json(tube))
        return TensorPayload(name=name, datatype=out.datatype, shape=out.shape, tube=tube)  # type: ignore[arg-type]
