"""From the scheduler's queue views and the tensor store's residency to the policy's snapshot.

Pure functions: the memory service gathers the inputs over NATS and carries out what
:func:`gpufaas.memory.policy.reconcile_once` decides on the snapshot built here.

* An **item** is a model's set of tensor copies on a GPU, named by the store's key of the
  model file (per scope: public or one tenant's private registration), or a tube's copy on
  a GPU (``tube:<id>``: a block of the pool the transfer service allocated for it). A queue
  view names, besides each function's model, the input tubes of its first queued requests
  that have a copy on the node (``QueueEntry.tubes``, with each one's position in the
  queue): the request at position ``k`` is a queued request of its own in the snapshot,
  expected ``k`` requests' time after the function's first, needing the model and its
  tubes. Tubes count only where the model and they fit on the GPU together: an input
  that cannot be kept on the GPU is read from the host tier, never a reason to reject.
* A queued function runs on the GPU placement chose for its instance on this node (the
  queue view says), else where its model is leased (a warm instance), else where its
  copies are resident, else on the node's first GPU; requests a worker reports running
  pin the function to their GPU.
* **Expected start** of a queued function: ``now +`` the device time of the requests
  queued ahead (each function's own per-request time from its profile, carried in the
  queue view, else ``typical_compute_s``), counting the requests queued before it on its
  GPU (functions ordered by their next deadline, none last), and no later than its next
  deadline minus one request's time (it must start by then to have a chance). Simple and documented, not a forecast:
  as the queue ahead drains, the start nears and the prefetch falls due.
* Every byte of the GPU's budget that is neither a complete model's copy nor a tube's
  (other owners' blocks, such as reservations for intermediates, reservations the pool
  could not hold, copies of incomplete models) is one pinned item, so the policy counts
  it as used and never tries to evict it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from gpufaas.memory.policy import (
    DeviceState,
    ItemRef,
    MemoryState,
    QueuedRequest,
    Resident,
    RunningRequest,
)
from gpufaas.shared.constants import DEFAULT_TENANT
from gpufaas.shared.errors import InvalidArgument
from gpufaas.shared.identity import FunctionRef
from gpufaas.shared.memory_client import tube_item
from gpufaas.shared.messages import (
    DeviceResidency,
    ModelItem,
    ModelQuery,
    ModelSource,
    QueuedTube,
    QueueView,
    ResidencyReply,
)

TYPICAL_COMPUTE_S: Final = 0.05  # one batch of a typical function, when nothing better is known
OTHER_ITEM: Final = "@other"  # the pinned item of bytes that are not complete models' copies
PINNED: Final = "@pinned"  # the running request that pins leased copies and OTHER_ITEM


@dataclass(frozen=True, slots=True)
class Demand:
    """A function's work on this node, summed over every scheduler replica's view."""

    function: str  # opaque: the scheduler's key of the function (tenant.name)
    source: ModelSource
    queued: int
    running: int
    next_deadline: float | None
    compute_s: float | None = None  # one request's device time, from the function's profile
    tubes: tuple[QueuedTube, ...] = ()  # its queued requests' input tubes with a copy here
    device: str | None = None  # the GPU placement chose for its instance here (None: unsaid)

    @property
    def tenant(self) -> str:
        return tenant_of(self.function)

    @property
    def query(self) -> ModelQuery:
        return ModelQuery(source=self.source, tenant=self.tenant)


def tenant_of(function: str) -> str:
    """The tenant of a function's key (``tenant.name``; a view from a scheduler that still
    spells it ``tenant/name`` is read too)."""
    try:
        return FunctionRef.parse(function).tenant
    except InvalidArgument:
        return re.split(r"[./]", function, maxsplit=1)[0] or DEFAULT_TENANT


def merge_views(views: Iterable[QueueView]) -> list[Demand]:
    """One demand per function: queued and running summed, the earliest deadline."""
    merged: dict[str, Demand] = {}
    for view in views:
        for e in view.entries:
            seen = merged.get(e.function)
            if seen is None:
                merged[e.function] = Demand(
                    e.function,
                    e.model,
                    e.queued,
                    e.running,
                    e.next_deadline,
                    e.compute_s,
                    _merge_tubes((), e.tubes),
                    e.device,
                )
                continue
            deadlines = [d for d in (seen.next_deadline, e.next_deadline) if d is not None]
            merged[e.function] = Demand(
                e.function,
                seen.source,
                seen.queued + e.queued,
                seen.running + e.running,
                min(deadlines) if deadlines else None,
                seen.compute_s or e.compute_s,
                _merge_tubes(seen.tubes, e.tubes),
                seen.device or e.device,
            )
    return [merged[f] for f in sorted(merged)]


def _merge_tubes(a: Iterable[QueuedTube], b: Iterable[QueuedTube]) -> tuple[QueuedTube, ...]:
    """Each tube once, running first, then at its earliest position (two replicas may both
    queue a reader)."""
    first: dict[str, QueuedTube] = {}
    for t in (*a, *b):
        seen = first.get(t.id)
        if seen is None or (not t.running, t.position) < (not seen.running, seen.position):
            first[t.id] = t
    return tuple(sorted(first.values(), key=lambda t: (t.position, t.id)))


@dataclass(frozen=True, slots=True)
class Budget:
    """What the memory service knows of one GPU beyond the store's copies."""

    device: str
    capacity_bytes: int  # the pool's: the whole device
    h2d_bps: float
    foreign_bytes: int  # other owners' blocks, plus reservations the pool could not hold
    tubes: tuple[Resident, ...] = ()  # tube copies' blocks (``tube:<id>``), not in foreign
    align_bytes: int = 1  # the pool's block alignment (a tube's block is rounded up to it)


@dataclass(slots=True)
class Plan:
    """The snapshot, and what the service needs to carry out and announce the actions."""

    state: MemoryState
    device_of: dict[str, str] = field(default_factory=dict)  # function -> its GPU
    demand_of: dict[str, Demand] = field(default_factory=dict)  # request id -> demand
    item_of: dict[str, ModelItem] = field(default_factory=dict)  # function -> its model item
    unresolved: dict[str, str] = field(default_factory=dict)  # function -> why it has no item
    tube_of: dict[str, QueuedTube] = field(default_factory=dict)  # tube item -> the tube


def build(
    now: float,
    demands: list[Demand],
    residency: ResidencyReply,
    budgets: Mapping[str, Budget],
    *,
    running_on: Mapping[str, str] | None = None,
    typical_compute_s: float = TYPICAL_COMPUTE_S,
) -> Plan:
    """The policy's snapshot for every GPU with a budget.

    ``residency.models`` answers ``[d.query for d in demands]`` in order; ``running_on``
    maps a function the workers report running to its GPU.
    """
    plan = Plan(MemoryState(()))
    residents = {d.device: d for d in residency.devices if d.device in budgets}
    default = next(iter(budgets), "")
    queues: dict[str, list[tuple[Demand, ModelItem]]] = {d: [] for d in budgets}
    pins: dict[str, set[str]] = {d: set() for d in budgets}
    for demand, item in zip(demands, residency.models, strict=True):
        if not item.item:
            plan.unresolved[demand.function] = item.error or "unknown model"
            continue
        device = (
            (running_on or {}).get(demand.function)
            or demand.device
            or _home(item.item, residents, default)
        )
        if device not in budgets:
            continue
        plan.device_of[demand.function] = device
        plan.item_of[demand.function] = item
        if demand.running:
            pins[device].add(item.item)
        pins[device].update(tube_item(t.id) for t in demand.tubes if t.running)
        if demand.queued:
            queues[device].append((demand, item))
    devices = []
    for name, budget in budgets.items():
        queue = _queue(now, queues[name], typical_compute_s, budget)
        by_function = {d.function: d for d, _ in queues[name]}
        for q in queue:
            plan.demand_of[q.id] = by_function[q.function]
        for d, _ in queues[name]:
            plan.tube_of.update((tube_item(t.id), t) for t in d.tubes)
        devices.append(_device(budget, residents.get(name), pins[name], queue))
    plan.state = MemoryState(tuple(devices))
    return plan


def _home(item: str, residents: Mapping[str, DeviceResidency], default: str) -> str:
    """Where a model's requests run: its leased copy's GPU, else a resident copy's, else
    the default GPU."""
    for want_leased in (True, False):
        for name, dev in residents.items():
            if any(m.item == item and (m.leased or not want_leased) for m in dev.models):
                return name
    return default


def _queue(
    now: float,
    entries: list[tuple[Demand, ModelItem]],
    typical_compute_s: float,
    budget: Budget,
) -> tuple[QueuedRequest, ...]:
    """One queued request per function (its next), and one per later position that reads
    tubes, ``k`` requests' time after the first."""
    order = sorted(entries, key=lambda e: (_deadline_key(e[0].next_deadline), e[0].function))
    out = []
    ahead_s = 0.0  # device time of the requests queued ahead
    for demand, item in order:
        each = demand.compute_s if demand.compute_s is not None else typical_compute_s
        start = now + ahead_s
        if demand.next_deadline is not None:
            start = min(start, max(now, demand.next_deadline - each))
        model = ItemRef(item.item, item.nbytes)
        at: dict[int, list[ItemRef]] = {0: []}
        for t in demand.tubes:
            if not t.running and t.position < max(demand.queued, 1):
                size = -(-t.nbytes // budget.align_bytes) * budget.align_bytes
                at.setdefault(t.position, []).append(ItemRef(tube_item(t.id), size))
        for k in sorted(at):
            tubes = at[k]
            if model.nbytes + sum(r.nbytes for r in tubes) > budget.capacity_bytes:
                tubes = []  # read from the host tier instead (see the module docstring)
            if k and not tubes:
                continue
            rid = demand.function if k == 0 else f"{demand.function}#{k}"
            out.append(QueuedRequest(rid, demand.function, (model, *tubes), start + k * each))
        ahead_s += demand.queued * each
    return tuple(out)


def _deadline_key(deadline: float | None) -> float:
    return math.inf if deadline is None else deadline


def _device(
    budget: Budget,
    residency: DeviceResidency | None,
    pins: set[str],
    queue: tuple[QueuedRequest, ...],
) -> DeviceState:
    models = residency.models if residency is not None else []
    stored = residency.used_bytes if residency is not None else 0
    resident = [Resident(m.item, m.nbytes, m.last_used) for m in models]
    resident += budget.tubes
    pinned = {m.item for m in models if m.leased} | pins
    # Bytes not in complete models' copies, and other owners' blocks: used, never evicted.
    # Models sharing tensors count them twice: the surplus is given back as capacity.
    other = budget.foreign_bytes + stored - sum(m.nbytes for m in models)
    capacity = budget.capacity_bytes + max(0, -other)
    if other > 0:
        resident.append(Resident(OTHER_ITEM, other, 0.0))
        pinned.add(OTHER_ITEM)
    running = (RunningRequest(PINNED, tuple(sorted(pinned))),) if pinned else ()
    return DeviceState(
        budget.device, max(1, capacity), budget.h2d_bps, tuple(resident), running, queue
    )
