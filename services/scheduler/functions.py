"""Deploying and deleting functions, and the one writer of their instance nodes in KV.

A deploy is held to its tenant's quotas (``shared/quotas.py``): the functions it has, and
the GPU memory their instances' models take, checked before placement, again with the
model's size once known (before its instance is loaded when the node's tensor store
knows the model, else right after), and once more after the record is written: of
concurrent deploys that together pass a quota, the ones that see each other are undone
(both, at worst), so the quota holds across scheduler replicas.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import structlog
from msgspec.structs import replace as msgspec_replace

from gpufaas.scheduler.host import Host
from gpufaas.scheduler.placer import Placer
from gpufaas.scheduler.profiling import Profiles, check_slo
from gpufaas.scheduler.workers import WorkerClient
from gpufaas.shared import subjects
from gpufaas.shared.catalog import validate_source
from gpufaas.shared.errors import AlreadyExists, NotFound, QuotaExceeded
from gpufaas.shared.identity import FunctionRef
from gpufaas.shared.messages import (
    DeleteReply,
    DeleteRequest,
    DeployReply,
    DeployRequest,
    FunctionRecord,
    FunctionSpec,
    WorkerBindReply,
    WorkerLoadReply,
    WorkerLoadRequest,
)
from gpufaas.shared.quotas import Quotas, check_deploy, gpu_bytes, over_gpu_memory
from gpufaas.shared.registry import FunctionCache, instance_count, records

log = structlog.get_logger()

UPDATE_ATTEMPTS = 20


def ref_of(spec: FunctionSpec) -> FunctionRef:
    return FunctionRef(spec.tenant, spec.name)


def scaled(spec: FunctionSpec, before: int, updated: FunctionRecord, reason: str) -> dict[str, Any]:
    """The ``function.scaled`` event of a function whose nodes went from ``before`` to
    ``updated.nodes``, and why."""
    return {
        "function": spec.name,
        "tenant": spec.tenant,
        "from": before,
        "to": instance_count(updated),
        "nodes": updated.nodes,
        "gpus": updated.gpus,
        "reason": reason,
    }


def with_instances(
    record: FunctionRecord, keep: Callable[[str], bool], new: tuple[str, str | None] | None = None
) -> FunctionRecord:
    """``record`` with only the instance nodes ``keep`` says (and their GPUs), then the
    ``new`` (node, GPU), if any."""
    nodes = [n for n in record.nodes if keep(n) and (new is None or n != new[0])]
    gpus = {n: g for n, g in record.gpus.items() if n in nodes}
    if new is not None:
        nodes.append(new[0])
        if new[1] is not None:
            gpus[new[0]] = [new[1]]
    return msgspec_replace(record, nodes=nodes, gpus=gpus)


def with_gpu(record: FunctionRecord, node: str, gpu: str, *, add: bool) -> FunctionRecord:
    """``record`` with one more instance on ``gpu`` of ``node`` (a node it is on, whose
    GPUs it names), or one fewer there (never the node's last: ``update_nodes`` drops a
    node)."""
    have = list(record.gpus.get(node, []))
    if node not in record.nodes or not have:
        return record
    if add and gpu not in have:
        have.append(gpu)
    elif not add and gpu in have and len(have) > 1:
        have.remove(gpu)
    return msgspec_replace(record, gpus={**record.gpus, node: have})


class FunctionRegistry:
    """Deploy (place, load, profile batch 1, record) and delete; instance nodes in KV."""

    def __init__(
        self,
        host: Host,
        cache: FunctionCache,
        placer: Placer,
        workers: WorkerClient,
        profiles: Profiles,
    ) -> None:
        self.host = host
        self.cache = cache
        self.placer = placer
        self.workers = workers
        self.profiles = profiles
        self.quotas = Quotas.from_config(host.config)

    async def load(
        self, node: str, spec: FunctionSpec, gpu: str | None = None, *, replica: bool = False
    ) -> tuple[WorkerLoadReply, WorkerBindReply | None]:
        """Build an instance of ``spec`` on ``gpu`` of ``node`` (None: the node's first GPU,
        or its host), or another one there besides those the node has (``replica``); the
        bind's reply, if one was needed."""
        return await self.workers.call(
            node,
            spec.tenant,
            subjects.WORKER_LOAD,
            WorkerLoadRequest(spec=spec, device=gpu, replica=replica),
            WorkerLoadReply,
            timeout=self.host.config.deploy_timeout_s,
        )

    async def deploy(self, req: DeployRequest) -> DeployReply:
        spec = req.spec
        validate_source(spec.model)
        existing = await self.host.kv.functions.value(ref_of(spec).key)
        if existing is not None:
            if existing.spec == spec:
                return DeployReply(function=existing, created=False)
            raise AlreadyExists(
                f"function {spec.name!r} exists with another spec; delete it first", field="name"
            )
        await self.check_quotas(spec, 0)
        at = await self.placer.place(spec)
        node = at.node
        if self._gpu_quota(spec):  # the model's size, before it is loaded, where known
            loc = await self.placer.locality(node, spec)
            await self.check_quotas(spec, loc.model_bytes if loc and loc.known else 0)
        loaded, _ = await self.load(node, spec, at.gpu)
        try:
            if self._gpu_quota(spec):
                await self.check_quotas(spec, loaded.model_bytes)
            first = await self.profiles.measure(node, spec, [1], repeats=3, deadline_s=30)
            choice = check_slo(spec, first.points)
        except BaseException:
            await self.workers.unload(node, ref_of(spec))
            raise
        record = FunctionRecord(
            spec=spec,
            inputs=loaded.inputs,
            outputs=loaded.outputs,
            model_bytes=loaded.model_bytes,
            tensor_count=loaded.tensor_count,
            nodes=[node],
            created_at=time.time(),
            gpus={node: [at.gpu]} if at.gpu else {},
        )
        winner = await self._create(record, node)
        if winner is not None:
            return DeployReply(function=winner, created=False)
        await self.profiles.put(spec, first, complete=False, reason=choice)
        if self.host.config.profile_s > 0:
            self.host.after_reply(self.profiles.sweep(node, spec))
        await self.host.publish_event(
            "function.deployed",
            {
                "function": spec.name,
                "tenant": spec.tenant,
                "node": node,
                "device": loaded.device,
                "gpu": at.gpu,
                "model_bytes": loaded.model_bytes,
                "bytes_stored": loaded.bytes_stored,
                "bytes_deduplicated": loaded.bytes_deduplicated,
                "load_us": loaded.load_us,
            },
        )
        return DeployReply(function=record, created=True)

    # --- quotas ----------------------------------------------------------------------------

    def _gpu_quota(self, spec: FunctionSpec) -> bool:
        return self.quotas.of(spec.tenant).gpu_memory_bytes > 0

    async def check_quotas(self, spec: FunctionSpec, model_bytes: int) -> None:
        """``QuotaExceeded`` naming the quota when ``spec`` (not deployed yet; a model of
        ``model_bytes``, 0 when not known yet) would take its tenant past one."""
        quota = self.quotas.of(spec.tenant)
        if quota.max_functions == 0 and quota.gpu_memory_bytes == 0:
            return
        deployed = await records(self.host.kv.functions, spec.tenant)
        check_deploy(self.quotas, spec.tenant, spec.name, deployed, model_bytes)

    async def room_for(self, record: FunctionRecord, instances: int) -> bool:
        """Whether the tenant's GPU memory quota holds ``instances`` instances of
        ``record``'s function (the autoscaler asks before it adds one)."""
        spec = record.spec
        if not self._gpu_quota(spec):
            return True
        deployed = await records(self.host.kv.functions, spec.tenant)
        others = [r for r in deployed if r.spec.name != spec.name]
        why = over_gpu_memory(self.quotas, spec.tenant, others, gpu_bytes(record, instances))
        if why is not None:
            log.info("autoscale.quota", tenant=spec.tenant, function=spec.name, reason=why)
        return why is None

    async def _create(self, record: FunctionRecord, node: str) -> FunctionRecord | None:
        """Write a new function's record; ``None`` once written, or the record of a
        concurrent deploy of the same spec that won (then this one's instance goes).
        Written, the tenant's quotas are counted again with the records of concurrent
        deploys: past one, this deploy is undone and refused."""
        spec = record.spec
        try:
            created = await self.host.kv.functions.create(ref_of(spec).key, record)
        except BaseException:
            await self.workers.unload(node, ref_of(spec))
            raise
        if created is not None:
            try:
                await self.check_quotas(spec, record.model_bytes)
            except QuotaExceeded as exc:
                await self._undo(spec, node)
                raise QuotaExceeded(
                    f"{exc.message}, counting deploys made at the same time", field=exc.field
                ) from None
            return None
        winner = await self.host.kv.functions.value(ref_of(spec).key)
        if winner is not None and winner.spec == spec:
            return winner  # answer as if we had been second
        await self.workers.unload(node, ref_of(spec))
        raise AlreadyExists(f"function {spec.name!r} was deployed concurrently", field="name")

    async def _undo(self, spec: FunctionSpec, node: str) -> None:
        """Take back a function just recorded: its record, then its instances (on ``node``,
        and wherever a request may have cold-started one meanwhile)."""
        ref = ref_of(spec)
        await self.host.kv.functions.delete(ref.key)
        self.cache.forget(spec.tenant, spec.name)
        for n in {node} | set(self.host.workers):
            await self.workers.unload(n, ref)

    async def delete(self, req: DeleteRequest) -> DeleteReply:
        ref = FunctionRef(req.tenant, req.name)
        record = await self.host.kv.functions.value(ref.key)
        if record is None:
            raise NotFound(f"function {req.name!r} not found", field="name")
        await self.host.kv.functions.delete(ref.key)
        self.cache.forget(req.tenant, req.name)
        for node in set(record.nodes) | set(self.host.workers):
            await self.workers.unload(node, ref)
        await self.host.publish_event(
            "function.deleted", {"function": req.name, "tenant": req.tenant}
        )
        return DeleteReply(name=req.name)

    async def update_nodes(
        self, spec: FunctionSpec, keep: Callable[[str], bool]
    ) -> FunctionRecord | None:
        """Keep only the instance nodes ``keep`` says in KV (compare-and-set, retried);
        None when the function is gone or was redeployed with another spec."""
        return await self._update(spec, lambda record: with_instances(record, keep))

    async def add_instance(
        self, spec: FunctionSpec, node: str, gpu: str | None, keep: Callable[[str], bool]
    ) -> FunctionRecord | None:
        """Record a new instance on ``gpu`` of ``node`` (last: the newest), keeping the
        other nodes ``keep`` says (as ``update_nodes``)."""
        return await self._update(spec, lambda r: with_instances(r, keep, (node, gpu)))

    async def change_gpu(
        self, spec: FunctionSpec, node: str, gpu: str, *, add: bool
    ) -> FunctionRecord | None:
        """Record an instance more (``add``) or fewer on ``gpu`` of ``node``, where the
        function is already (a scale-out or scale-in within the node)."""
        return await self._update(spec, lambda r: with_gpu(r, node, gpu, add=add))

    async def mark_rescaled(self, spec: FunctionSpec, at: float) -> FunctionRecord | None:
        """Record a repository load or unload at ``at`` (as ``update_nodes``)."""
        return await self._update(spec, lambda record: msgspec_replace(record, rescaled_at=at))

    async def _update(
        self, spec: FunctionSpec, change: Callable[[FunctionRecord], FunctionRecord]
    ) -> FunctionRecord | None:
        def changed(record: FunctionRecord | None) -> FunctionRecord | None:
            if record is None or record.spec != spec:
                return None
            return change(record)

        entry = await self.host.kv.functions.update(
            ref_of(spec).key, changed, attempts=UPDATE_ATTEMPTS
        )
        if entry is None or entry.value.spec != spec:
            return None
        self.cache.remember(entry.value)
        return entry.value
