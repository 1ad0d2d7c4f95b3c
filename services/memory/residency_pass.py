"""The queue-aware residency pass of model copies and tube copies on the node's GPUs.

Each pass reads what each GPU's tensor store holds, which of the pools' blocks hold tube
copies and what the scheduler's queue views say queued and running requests will touch
(``planner.py``); the policy (``policy.py``) decides, and the pass carries it out: it
evicts what no queued request needs first, then what is needed latest, never a leased
copy (a tube's copy goes to the host tier through the transfer service's ``release``);
it prefetches a queued request's model and input tubes before it reaches the head of its
queue, and announces working sets that can never fit, pressure, and the model cache.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, Protocol

import structlog
from nats.aio.client import Client as NATS

from gpufaas.memory import planner, policy
from gpufaas.memory.holds import Holds
from gpufaas.memory.ledger import Ledger, Movable
from gpufaas.memory.residency import ResidencyBook
from gpufaas.shared import subjects
from gpufaas.shared.errors import PlatformError
from gpufaas.shared.memory_client import TUBE_ITEM
from gpufaas.shared.messages import (
    CachedModel,
    EnsureReply,
    EnsureRequest,
    EvictModelReply,
    EvictModelRequest,
    M,
    ModelCache,
    Msg,
    PrefetchReply,
    PrefetchRequest,
    ResidencyReply,
    ResidencyRequest,
    TubeReleaseReply,
    TubeReleaseRequest,
)
from gpufaas.shared.rpc import request

log = structlog.get_logger()

STORE_TIMEOUT_S: Final = 5.0  # residency and evictions: bookkeeping on the store's thread

_WHAT: Final = {
    "tensorstore": "tensor store of this node",
    "transfer": "transfer service of this node",
}

# An event to publish, awaited: (kind, data).
Publish = Callable[[str, dict[str, Any]], Awaitable[None]]


class Peers(Protocol):
    """The node's services a residency pass asks: the tensor store and the transfer service."""

    async def residency(self, req: ResidencyRequest) -> ResidencyReply: ...

    async def evict_model(self, req: EvictModelRequest) -> EvictModelReply: ...

    async def prefetch_model(self, req: PrefetchRequest) -> PrefetchReply: ...

    async def release_tube(self, req: TubeReleaseRequest) -> TubeReleaseReply: ...

    async def ensure_tube(self, req: EnsureRequest) -> EnsureReply: ...


class NodePeers(Peers):
    """:class:`Peers` over NATS, on this node's subjects."""

    def __init__(
        self,
        nc: Callable[[], NATS],
        node: str,
        *,
        request_timeout_s: float,
        deploy_timeout_s: float,
    ) -> None:
        self._nc = nc  # the service's connection, made after this
        self.node = node
        self.request_timeout_s = request_timeout_s
        self.deploy_timeout_s = deploy_timeout_s

    async def _ask(self, service: str, verb: str, msg: Msg, reply: type[M], timeout: float) -> M:
        subject = subjects.node(self.node, service, verb)
        what = _WHAT[service]
        return await request(self._nc(), subject, msg, reply, timeout=timeout, what=what)

    async def residency(self, req: ResidencyRequest) -> ResidencyReply:
        verb = subjects.TENSORSTORE_RESIDENCY
        return await self._ask("tensorstore", verb, req, ResidencyReply, STORE_TIMEOUT_S)

    async def evict_model(self, req: EvictModelRequest) -> EvictModelReply:
        verb = subjects.TENSORSTORE_EVICT
        return await self._ask("tensorstore", verb, req, EvictModelReply, STORE_TIMEOUT_S)

    async def prefetch_model(self, req: PrefetchRequest) -> PrefetchReply:
        verb, timeout = subjects.TENSORSTORE_PREFETCH, self.deploy_timeout_s
        return await self._ask("tensorstore", verb, req, PrefetchReply, timeout)

    async def release_tube(self, req: TubeReleaseRequest) -> TubeReleaseReply:
        verb, timeout = subjects.TRANSFER_RELEASE, self.request_timeout_s
        return await self._ask("transfer", verb, req, TubeReleaseReply, timeout)

    async def ensure_tube(self, req: EnsureRequest) -> EnsureReply:
        verb, timeout = subjects.TRANSFER_ENSURE, self.request_timeout_s
        return await self._ask("transfer", verb, req, EnsureReply, timeout)


class ResidencyPass:
    """One queue-aware residency pass at a time: plan, carry out, announce."""

    def __init__(
        self,
        ledger: Ledger,
        holds: Holds,
        book: ResidencyBook,
        peers: Peers,
        publish: Publish,
        *,
        h2d_bps: Mapping[str, float],
        typical_compute_s: float = planner.TYPICAL_COMPUTE_S,
    ) -> None:
        self.ledger = ledger
        self.holds = holds
        self.book = book
        self.peers = peers
        self.publish = publish
        self.node = ledger.keys.node
        self.h2d_bps = dict(h2d_bps)
        self.typical_compute_s = typical_compute_s
        # Never under the ledger's lock: the store it calls gives blocks back while it evicts.
        self.lock = asyncio.Lock()
        self.owners: dict[str, str] = {}  # private model item -> its tenant (last residency)

    async def run(self, now: float, horizon_s: float = 0.0) -> policy.Actions:
        """One pass at ``now``: evict, prefetch, reject; publish the model cache. Idempotent:
        a second pass at the same ``now`` does nothing. ``horizon_s``: the time to the next
        pass; prefetches due before it start now. Returns the actions carried out."""
        if not self.ledger.pools.gpus:
            return policy.Actions()
        async with self.lock:
            return await self._pass(now, horizon_s)

    async def _pass(self, now: float, horizon_s: float) -> policy.Actions:
        demands = planner.merge_views(await self.book.fresh_views(now))
        residency = await self.peers.residency(ResidencyRequest(models=[d.query for d in demands]))
        plan = planner.build(
            now,
            demands,
            residency,
            self.budgets(residency.owner),
            running_on=self.holds.running_on(d.function for d in demands),
            typical_compute_s=self.typical_compute_s,
        )
        self.owners = {
            m.item: m.tenant for d in residency.devices for m in d.models if m.tenant is not None
        }
        for fn, why in plan.unresolved.items():
            log.info("memory.model_unresolved", function=fn, error=why)
        slack = policy.DEFAULT_SLACK_S + horizon_s
        evicted: list[policy.Evict] = []
        prefetched: list[policy.Prefetch] = []
        rejected: list[policy.Rejected] = []
        for device in plan.state.devices:
            actions = policy.reconcile_once(now, policy.MemoryState((device,)), slack_s=slack)
            rejected += actions.rejected
            done_evict, done_prefetch = await self.carry_out(plan, actions, now)
            evicted += done_evict
            prefetched += done_prefetch
            await self._announce_pressure(device, actions)
        rejected = await self._announce_rejections(plan, rejected, now)
        if evicted or prefetched:
            residency = await self.peers.residency(ResidencyRequest())
        await self._publish_cache(residency, now)
        pressed = any(d.name in self.book.pressed for d in plan.state.devices)
        return policy.Actions(tuple(evicted), tuple(prefetched), tuple(rejected), pressed)

    def budgets(self, store_owner: str) -> dict[str, planner.Budget]:
        """Per GPU: the blocks the store's copies do not account for, and the tube copies
        (movable items of the policy, by the ``item`` their allocation named)."""
        out = {}
        for device, pool in self.ledger.pools.gpus.items():
            align = pool.align
            foreign = 0
            tubes: dict[str, policy.Resident] = {}
            for a in pool.allocations():
                nbytes = -(-a.nbytes // align) * align
                item, at, swap = self.ledger.items.get((device, a.id), Movable("", 0.0, 0))
                if item.startswith(TUBE_ITEM) and item not in tubes:
                    tubes[item] = policy.Resident(item, nbytes, at, swap)
                elif a.owner != store_owner:
                    foreign += nbytes
            foreign += pool.stats().held_bytes  # reservations for intermediates
            foreign += self.holds.short_bytes(device)
            out[device] = planner.Budget(
                device, pool.capacity, self.h2d_bps[device], foreign, tuple(tubes.values()), align
            )
        return out

    # --- carrying out ------------------------------------------------------------------

    async def carry_out(
        self, plan: planner.Plan, actions: policy.Actions, now: float
    ) -> tuple[list[policy.Evict], list[policy.Prefetch]]:
        """Evictions first, then prefetches (into the room they made), in the policy's order.

        An eviction refused because the item is in use (a model copy leased meanwhile, a
        tube being copied) leaves no room for the prefetches: they wait for the next pass,
        as does any after a prefetch that failed.
        """
        evicted, blocked = await self._evictions(actions.evict)
        if blocked:
            return evicted, []
        return evicted, await self._prefetches(plan, actions.prefetch, now)

    async def _evictions(self, evict: tuple[policy.Evict, ...]) -> tuple[list[policy.Evict], bool]:
        """The evictions done, and whether one was refused for an item in use."""
        evicted: list[policy.Evict] = []
        for e in evict:
            done, nbytes, detail = await self._evict(e)
            if done is None:
                return evicted, True
            if not done:
                continue
            evicted.append(e)
            await self.publish(
                "memory.evicted",
                {
                    "node": self.node,
                    "device": e.device,
                    "bytes": nbytes,
                    "reason": e.reason,
                    "item": e.item,
                    "needed_at": e.needed_at_s,
                    **detail,
                },
            )
        return evicted, False

    async def _prefetches(
        self, plan: planner.Plan, prefetch: tuple[policy.Prefetch, ...], now: float
    ) -> list[policy.Prefetch]:
        """The prefetches done, in order, up to the first that fails."""
        prefetched: list[policy.Prefetch] = []
        for p in prefetch:
            demand = plan.demand_of[p.request]
            try:
                copied = await self._prefetch(plan, p, demand)
            except PlatformError as exc:
                log.warning(
                    "memory.prefetch_failed",
                    device=p.device,
                    function=demand.function,
                    item=p.item,
                    code=exc.code,
                    error=exc.message,
                )
                break
            prefetched.append(p)
            await self.publish(
                "memory.prefetched",
                {
                    "node": self.node,
                    "device": p.device,
                    "bytes": p.nbytes,
                    "bytes_copied": copied,
                    "reason": "queued request",
                    "item": p.item,
                    "function": demand.function,
                    "tenant": demand.tenant,
                    "what": "tube" if p.item.startswith(TUBE_ITEM) else "model",
                    "needed_at": p.needed_at_s,
                    "lead_s": p.lead_s,
                    "early_s": p.needed_at_s - now,
                },
            )
        return prefetched

    async def _evict(self, e: policy.Evict) -> tuple[bool | None, int, dict[str, object]]:
        """Carry out one eviction: (done, GPU bytes given back, event details); done None:
        refused because the item is in use, so stop this pass's actions."""
        if e.item.startswith(TUBE_ITEM):
            return await self._release_tube(e)
        reply = await self.peers.evict_model(EvictModelRequest(device=e.device, item=e.item))
        if not reply.evicted:
            log.info("memory.evict_refused", device=e.device, item=e.item, reason=reply.reason)
            return (False if reply.reason == "not resident" else None), 0, {}
        # A tenant's private model is that tenant's event; a public one is platform-wide.
        return True, reply.nbytes, {"what": "idle model copies", "tenant": self.owners.get(e.item)}

    async def _release_tube(self, e: policy.Evict) -> tuple[bool | None, int, dict[str, object]]:
        """A tube's copy is the transfer service's to move: to the host tier, swapped there
        first when the node has no host copy."""
        tube_id = e.item.removeprefix(TUBE_ITEM)
        try:
            released = await self.peers.release_tube(
                TubeReleaseRequest(tube_id=tube_id, tier=e.device)
            )
        except PlatformError as exc:  # the host pool is full, the transfer service away
            log.warning(
                "memory.evict_failed",
                device=e.device,
                item=e.item,
                code=exc.code,
                error=exc.message,
            )
            return None, 0, {}
        if not released.released:
            log.info("memory.evict_refused", device=e.device, item=e.item, reason=released.reason)
            return (None if released.reason == "copy in flight" else False), 0, {}
        detail: dict[str, object] = {
            "what": "tube copy",
            "tube": tube_id,
            "tenant": released.tenant,  # a tenant's tube: shown to that tenant only
            "swapped_bytes": released.swapped_bytes,
        }
        return True, released.nbytes, detail

    async def _prefetch(
        self, plan: planner.Plan, p: policy.Prefetch, demand: planner.Demand
    ) -> int:
        """Carry out one prefetch; returns the bytes copied (0: it was resident)."""
        tube = plan.tube_of.get(p.item)
        if tube is not None:  # the transfer service copies it back from the host tier
            ensure = EnsureRequest(tube_id=tube.id, tenant=tube.tenant, tier=p.device)
            return (await self.peers.ensure_tube(ensure)).nbytes
        place = PrefetchRequest(device=p.device, source=demand.source, tenant=demand.tenant)
        return (await self.peers.prefetch_model(place)).bytes_copied

    # --- announcing --------------------------------------------------------------------

    async def _announce_pressure(self, device: policy.DeviceState, actions: policy.Actions) -> None:
        """``memory.pressure`` when a device becomes short of memory (not again while it is)."""
        if not self.book.press(device.name, actions.pressure):
            return
        gone = {e.item for e in actions.evict}
        coming = {p.item for p in actions.prefetch}
        held = device.used_bytes - sum(e.nbytes for e in actions.evict)
        held += sum(p.nbytes for p in actions.prefetch)
        wanted = {i.id: i.nbytes for q in device.queue for i in q.items}
        resident = {r.id for r in device.resident} - gone
        missing = sum(n for i, n in wanted.items() if i not in resident and i not in coming)
        short = max(0, held + missing - device.capacity_bytes)
        await self.publish(
            "memory.pressure",
            {
                "node": self.node,
                "device": device.name,
                "bytes": short,
                "reason": (
                    f"queued and running requests need {short} bytes more than "
                    f"{device.name} holds; copies in use stay"
                ),
            },
        )

    async def _announce_rejections(
        self, plan: planner.Plan, rejected: list[policy.Rejected], now: float
    ) -> list[policy.Rejected]:
        """Announce (once, and in KV) working sets that can never fit; forget the others.
        Returns those announced now."""
        announced = await self.book.settle_rejections(rejected, now)
        for r in announced:
            log.warning(
                "memory.rejected",
                device=r.device,
                function=r.function,
                bytes=r.working_set_bytes,
                reason=r.reason,
            )
            await self.publish(
                "memory.rejected",
                {
                    "node": self.node,
                    "device": r.device,
                    "function": r.function,
                    "tenant": plan.demand_of[r.request].tenant,
                    "bytes": r.working_set_bytes,
                    "capacity_bytes": r.capacity_bytes,
                    "reason": r.reason,
                },
            )
        return announced

    async def _publish_cache(self, residency: ResidencyReply, now: float) -> None:
        """The model cache: per GPU, the models complete on it, in KV and as an event when it
        changes (what the scheduler can place by)."""
        for dev in residency.devices:
            if dev.device not in self.ledger.pools.gpus:
                continue
            models = sorted(
                (
                    CachedModel(
                        item=m.item, nbytes=m.nbytes, leased=m.leased, file=m.file, tenant=m.tenant
                    )
                    for m in dev.models
                ),
                key=lambda m: m.item,
            )
            cache = ModelCache(node=self.node, device=dev.device, at=now, models=models)
            if not await self.book.publish_cache(cache):
                continue
            # A platform-wide event: items are opaque keys, and only public models are
            # listed (a private model's item is its tenant's; files and tenants stay in KV).
            await self.publish(
                "memory.residency",
                {
                    "node": self.node,
                    "device": dev.device,
                    "bytes": sum(m.nbytes for m in models),
                    "reason": "changed",
                    "models": [
                        {"item": m.item, "bytes": m.nbytes, "leased": m.leased}
                        for m in models
                        if m.tenant is None
                    ],
                    "private_models": sum(1 for m in models if m.tenant is not None),
                },
            )
