"""Deploying and deleting functions, and the one writer of their instance nodes in KV."""

from __future__ import annotations

import time
from collections.abc import Callable

from msgspec.structs import replace as msgspec_replace

from gpufaas.scheduler.host import Host
from gpufaas.scheduler.placer import Placer
from gpufaas.scheduler.profiling import Profiles, check_slo
from gpufaas.scheduler.workers import WorkerClient
from gpufaas.shared import subjects
from gpufaas.shared.catalog import validate_source
from gpufaas.shared.errors import AlreadyExists, NotFound
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
from gpufaas.shared.registry import FunctionCache

UPDATE_ATTEMPTS = 20


def ref_of(spec: FunctionSpec) -> FunctionRef:
    return FunctionRef(spec.tenant, spec.name)


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

    async def load(
        self, node: str, spec: FunctionSpec
    ) -> tuple[WorkerLoadReply, WorkerBindReply | None]:
        """Build an instance of ``spec`` on ``node`` (the bind's reply, if one was needed)."""
        return await self.workers.call(
            node,
            spec.tenant,
            subjects.WORKER_LOAD,
            WorkerLoadRequest(spec=spec),
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
        node = await self.placer.place(spec)
        loaded, _ = await self.load(node, spec)
        try:
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
                "model_bytes": loaded.model_bytes,
                "bytes_stored": loaded.bytes_stored,
                "bytes_deduplicated": loaded.bytes_deduplicated,
                "load_us": loaded.load_us,
            },
        )
        return DeployReply(function=record, created=True)

    async def _create(self, record: FunctionRecord, node: str) -> FunctionRecord | None:
        """Write a new function's record; ``None`` once written, or the record of a
        concurrent deploy of the same spec that won (then this one's instance goes)."""
        spec = record.spec
        try:
            created = await self.host.kv.functions.create(ref_of(spec).key, record)
        except BaseException:
            await self.workers.unload(node, ref_of(spec))
            raise
        if created is not None:
            return None
        winner = await self.host.kv.functions.value(ref_of(spec).key)
        if winner is not None and winner.spec == spec:
            return winner  # answer as if we had been second
        await self.workers.unload(node, ref_of(spec))
        raise AlreadyExists(f"function {spec.name!r} was deployed concurrently", field="name")

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
        self, spec: FunctionSpec, change: Callable[[list[str]], list[str]]
    ) -> FunctionRecord | None:
        """Change a function's instance nodes in KV (compare-and-set, retried); None when
        the function is gone or was redeployed with another spec."""

        def changed(record: FunctionRecord | None) -> FunctionRecord | None:
            if record is None or record.spec != spec:
                return None
            return msgspec_replace(record, nodes=change(list(record.nodes)))

        entry = await self.host.kv.functions.update(
            ref_of(spec).key, changed, attempts=UPDATE_ATTEMPTS
        )
        if entry is None or entry.value.spec != spec:
            return None
        self.cache.remember(entry.value)
        return entry.value
