"""The autoscaling leader: one replica (a KV lease) sums every replica's load reports and
scales each function out, in, or to zero (``autoscale.py`` decides).

Scaling in takes a node out of the function's record first and unloads it a tick later,
once requests already sent there have arrived. Scaling out stops at the tenant's GPU
memory quota (``FunctionRegistry.room_for``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import structlog
from msgspec.structs import replace as msgspec_replace

from gpufaas.scheduler.autoscale import Autoscaler, FunctionLoad
from gpufaas.scheduler.dispatch import Dispatcher
from gpufaas.scheduler.functions import FunctionRegistry, ref_of, scaled
from gpufaas.scheduler.host import Host
from gpufaas.scheduler.profiles import effective_config, service_rps
from gpufaas.scheduler.profiling import Profiles
from gpufaas.shared import constants as c
from gpufaas.shared.errors import NotFound, QuotaExceeded
from gpufaas.shared.identity import FunctionRef
from gpufaas.shared.kv import Conflict
from gpufaas.shared.messages import (
    FunctionRecord,
    ProfileRecord,
    ScaleReply,
    ScaleRequest,
    SchedulerLoad,
)
from gpufaas.shared.registry import instance_count, records

log = structlog.get_logger()


@dataclass(slots=True)
class Totals:
    """One function's load summed over the replicas' reports."""

    arrivals: int = 0
    queued: int = 0
    in_flight: int = 0


def sum_reports(reports: Iterable[SchedulerLoad]) -> dict[str, Totals]:
    """Per function key, the sum of the given reports."""
    totals: dict[str, Totals] = {}
    for report in reports:
        for f in report.functions:
            t = totals.setdefault(f.function, Totals())
            t.arrivals += f.arrivals
            t.queued += f.queued
            t.in_flight += f.in_flight
    return totals


def counted(report: SchedulerLoad) -> SchedulerLoad:
    """A report whose arrivals were counted (they are since its replica's last report)."""
    return msgspec_replace(
        report, functions=[msgspec_replace(f, arrivals=0) for f in report.functions]
    )


def function_load(
    record: FunctionRecord, profile: ProfileRecord | None, live: int, totals: Totals
) -> FunctionLoad:
    """What the autoscaler sees of one function."""
    config = effective_config(profile, record.spec)
    return FunctionLoad(
        ref_of(record.spec).key,
        live,
        totals.queued,
        totals.in_flight,
        config.capacity,
        service_rps(profile, config),
    )


def _extra_gpu(record: FunctionRecord, live: list[str]) -> tuple[str, str] | None:
    """An instance to scale in within a node: the newest GPU of the live node with the
    most instances (None when each has one)."""
    nodes = [n for n in live if len(record.gpus.get(n, [])) > 1]
    if not nodes:
        return None
    node = max(nodes, key=lambda n: (len(record.gpus[n]), n))
    return node, record.gpus[node][-1]


def to_drop(live: list[str], desired: int, busy: Counter[str]) -> set[str]:
    """The instances to scale in: all at zero, else the least busy one."""
    if desired == 0:
        return set(live)
    return {min(live, key=lambda n: (busy[n], n))}


class Leader:
    """The leader's lease, the replicas' load reports and the scaling they lead to."""

    def __init__(
        self,
        host: Host,
        autoscaler: Autoscaler,
        profiles: Profiles,
        registry: FunctionRegistry,
        dispatcher: Dispatcher,
    ) -> None:
        self.host = host
        self.autoscaler = autoscaler
        self.profiles = profiles
        self.registry = registry
        self.dispatcher = dispatcher
        self.leader = False
        self._revision = 0
        self.reports: dict[str, SchedulerLoad] = {}  # replica -> its latest load report
        # (function, node, GPU) -> since when: an instance scaled in, unloaded once the
        # requests sent to it have arrived (GPU None: every instance on the node).
        self.draining: dict[tuple[FunctionRef, str, str | None], float] = {}

    def report(self, load: SchedulerLoad) -> None:
        """A replica's load report (our own included)."""
        self.reports[load.replica] = load

    async def lead(self) -> bool:
        """Take or keep the autoscaling lease (a KV key with the leases bucket's TTL)."""
        leases, value = self.host.kv.leases, self.host.replica.encode()
        if self.leader:
            try:
                self._revision = await leases.put_if(c.SCHEDULER_LEADER_KEY, value, self._revision)
            except Conflict:
                self.leader = False
            return self.leader
        created = await leases.create(c.SCHEDULER_LEADER_KEY, value)
        if created is not None:
            self._revision, self.leader = created, True
            log.info("autoscale.leader", replica=self.host.replica)
        return self.leader

    async def tick(self, now: float) -> None:
        """As leader: sum the fresh reports, decide, scale, and unload drained instances."""
        stale_s = 3 * self.host.config.autoscale_interval_s + 1
        fresh = [r for r in self.reports.values() if now - r.at <= stale_s]
        totals = sum_reports(fresh)
        for report in fresh:
            self.reports[report.replica] = counted(report)
        deployed = await records(self.host.kv.functions)
        loads = []
        for record in deployed:
            ref = ref_of(record.spec)
            if record.rescaled_at:
                self.autoscaler.forget_before(ref.key, record.rescaled_at)
            t = totals.get(ref.key, Totals())
            if t.arrivals:
                self.autoscaler.observe(ref.key, now, t.arrivals)
            live = [n for n in record.nodes if n in self.host.workers]
            count = instance_count(record, live)
            loads.append(function_load(record, await self.profiles.of(ref), count, t))
        by_key = {ref_of(r.spec).key: r for r in deployed}
        for key, decision in self.autoscaler.decide(now, loads).items():
            if decision.desired != decision.current:
                await self.scale(by_key[key], decision.desired, decision.reason, now)
        await self.finish_draining(now)

    async def scale(self, record: FunctionRecord, desired: int, reason: str, now: float) -> None:
        """One step towards ``desired`` instances: one more (on another GPU of a node that
        has the function when placement finds that cheapest, else on another node), or
        one fewer (another GPU's first, then the least busy node), or none at zero."""
        spec, workers = record.spec, self.host.workers
        live = [n for n in record.nodes if n in workers]
        count = instance_count(record, live)
        if desired > count:
            if not await self.registry.room_for(record, count + 1):
                return  # the tenant's GPU memory quota holds no more instances
            updated = await self._scale_out(record, live)
        elif desired > 0 and (extra := _extra_gpu(record, live)) is not None:
            node, gpu = extra  # within a node first: the node keeps serving
            updated = await self.registry.change_gpu(spec, node, gpu, add=False)
            self.draining[(ref_of(spec), node, gpu)] = now
        else:
            fq = self.dispatcher.queues.get(ref_of(spec).key)
            drop = to_drop(live, desired, fq.in_flight if fq else Counter[str]())
            updated = await self.registry.update_nodes(spec, lambda n: n not in drop)
            for node in drop:  # unloaded next tick, once requests already sent have arrived
                self.draining[(ref_of(spec), node, None)] = now
        if updated is not None:
            await self.host.publish_event("function.scaled", scaled(spec, count, updated, reason))

    async def _scale_out(self, record: FunctionRecord, live: list[str]) -> FunctionRecord | None:
        """One more instance where placement says among the GPUs without one: on a node
        that has the function (a GPU of it it names), or another node."""
        spec, workers = record.spec, self.host.workers
        at = await self.registry.placer.place(spec, new=True)
        if at.warm:
            return None  # no GPU without one left
        if at.node in live:
            if at.gpu is None or not record.gpus.get(at.node):
                return None  # a node without GPUs, or a record from before: one per node
            await self.registry.load(at.node, spec, at.gpu, replica=True)
            return await self.registry.change_gpu(spec, at.node, at.gpu, add=True)
        await self.registry.load(at.node, spec, at.gpu)
        return await self.registry.add_instance(spec, at.node, at.gpu, lambda n: n in workers)

    async def rescale(self, req: ScaleRequest, now: float) -> ScaleReply:
        """The model repository's load (one instance now, where it has none) or unload (no
        instance; requests sent already finish first, as when scaling in). Any replica
        does it; the record's ``rescaled_at`` tells the leader's autoscaler to forget the
        activity before it, so neither is undone by the next tick. Later, the function
        scales as any other: a loaded one back to zero after keep-alive without requests,
        an unloaded one up again at its next request."""
        ref = FunctionRef(req.tenant, req.name)
        record = await self.host.kv.functions.value(ref.key)
        if record is None:
            raise NotFound(f"model {req.name!r} not found", field="name")
        self.autoscaler.forget_before(ref.key, now)
        record = await self.registry.mark_rescaled(record.spec, now) or record
        live = [n for n in record.nodes if n in self.host.workers]
        if req.load and not live:
            if not await self.registry.room_for(record, 1):
                raise QuotaExceeded(
                    f"tenant {req.tenant!r} has no GPU memory quota left for an instance "
                    f"of {req.name!r}",
                    field="gpu_memory_bytes",
                )
            await self.scale(record, 1, "repository load", now)
        elif not req.load and live:
            await self.scale(record, 0, "repository unload", now)
        return ScaleReply(function=await self.registry.cache.record(ref) or record)

    async def finish_draining(self, now: float) -> None:
        for (ref, node, gpu), since in list(self.draining.items()):
            if now - since < self.host.config.autoscale_interval_s:
                continue
            del self.draining[(ref, node, gpu)]
            record = await self.registry.cache.record(ref)
            here = record.gpus.get(node, []) if record and node in record.nodes else None
            if here is not None and (gpu is None or gpu in here):
                continue  # scaled back onto it meanwhile
            await self.registry.workers.unload(node, ref, gpu)
