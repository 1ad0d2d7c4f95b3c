"""Queue-aware residency: what each GPU evicts, what it brings back early, what it refuses.

A pure function of a snapshot (FaaSTube's queue-aware memory, ARCHITECTURE.md idea 3).
The memory service builds a :class:`MemoryState` from its pools and the scheduler's
queue view, calls :func:`reconcile_once` with its clock, and carries out the actions
(evicted data goes to the host tier, prefetches are host->GPU copies). Rules, per device:

* **Evict** only under pressure (resident bytes over capacity, or room needed for a due
  prefetch): first items no queued request needs, least recently used first; then items
  queued requests need, the one needed latest first. Within each group, items free to
  drop (weights, whose bytes the host keeps; a tube with a host copy) go before items
  that must be copied out first (``Resident.swap_bytes``: a tube whose only copy is on
  the GPU): that copy would hold the link ahead of the prefetch the room is for. An item a running request uses is
  never evicted, and a prefetch never evicts an item needed as soon as or sooner than
  the item it brings in, so two prefetches cannot evict each other back and forth.
* **Prefetch** a non-resident item a queued request needs once
  ``expected_start - now <= nbytes / h2d_bps + slack``, soonest-needed first; the first
  due item that cannot be made to fit stops the pass (later ones would take its room).
* **Reject** a queued request whose working set exceeds the device's capacity: it could
  never run there, and trying would only thrash the device.

Same snapshot, same actions; after :func:`apply_actions`, a second pass at the same time
yields none (idempotent, so a reconcile loop can retry a step safely).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Final, Literal

from gpufaas.shared.errors import InvalidArgument

DEFAULT_SLACK_S: Final = 0.05  # covers copy launch latency and a busy link's jitter

EvictReason = Literal["unneeded", "needed-later"]


@dataclass(frozen=True, slots=True)
class ItemRef:
    """An item a queued request will touch: a model's tensor set or a tube, by id and size."""

    id: str
    nbytes: int


@dataclass(frozen=True, slots=True)
class Resident:
    """An item on the device, with its last use (the LRU order among unneeded items)."""

    id: str
    nbytes: int
    last_used_s: float
    swap_bytes: int = 0  # bytes copied to the host to evict it (0: the host has them)


@dataclass(frozen=True, slots=True)
class RunningRequest:
    """A request executing now: every item it uses is pinned.

    A host->GPU copy in flight is passed as one too (its item is pinned until it lands).
    """

    id: str
    items: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class QueuedRequest:
    """A request waiting on this device, with the scheduler's estimate of when it starts."""

    id: str
    function: str
    items: tuple[ItemRef, ...]
    expected_start_s: float


@dataclass(frozen=True, slots=True)
class DeviceState:
    """One GPU: capacity, residents, running and queued requests (queue order), its link."""

    name: str
    capacity_bytes: int
    h2d_bps: float  # host->GPU bandwidth used for prefetch lead times
    resident: tuple[Resident, ...] = ()
    running: tuple[RunningRequest, ...] = ()
    queue: tuple[QueuedRequest, ...] = ()

    @property
    def used_bytes(self) -> int:
        """Bytes of every resident item."""
        return sum(r.nbytes for r in self.resident)


@dataclass(frozen=True, slots=True)
class MemoryState:
    """A snapshot of every device the memory manager decides for."""

    devices: tuple[DeviceState, ...]


@dataclass(frozen=True, slots=True)
class Evict:
    """Move ``item`` off ``device`` to the host tier."""

    device: str
    item: str
    nbytes: int
    reason: EvictReason
    needed_at_s: float | None  # earliest expected start of a queued request using it


@dataclass(frozen=True, slots=True)
class Prefetch:
    """Copy ``item`` host->``device`` now, so it is resident before ``request`` starts."""

    device: str
    item: str
    nbytes: int
    request: str
    needed_at_s: float
    lead_s: float  # nbytes / h2d_bps + slack: how early the copy had to begin


@dataclass(frozen=True, slots=True)
class Rejected:
    """A queued request that can never run on ``device``: its working set is too big."""

    device: str
    request: str
    function: str
    working_set_bytes: int
    capacity_bytes: int
    reason: str


@dataclass(frozen=True, slots=True)
class Actions:
    """What one reconcile pass decided; ``pressure``: some device is short of memory."""

    evict: tuple[Evict, ...] = ()
    prefetch: tuple[Prefetch, ...] = ()
    rejected: tuple[Rejected, ...] = ()
    pressure: bool = False

    @property
    def empty(self) -> bool:
        """True when there is nothing to do (pressure alone is not an action)."""
        return not (self.evict or self.prefetch or self.rejected)


def reconcile_once(
    now_s: float, state: MemoryState, *, slack_s: float = DEFAULT_SLACK_S
) -> Actions:
    """Decide evictions, prefetches and rejections for every device at time ``now_s``."""
    if slack_s < 0:
        raise InvalidArgument("slack_s must be >= 0", field="slack_s")
    evict: list[Evict] = []
    prefetch: list[Prefetch] = []
    rejected: list[Rejected] = []
    pressure = False
    for device in state.devices:
        plan = _DevicePlan(device, now_s, slack_s)
        evict += plan.evict
        prefetch += plan.prefetch
        rejected += plan.rejected
        pressure = pressure or plan.pressure
    return Actions(tuple(evict), tuple(prefetch), tuple(rejected), pressure)


def apply_actions(state: MemoryState, actions: Actions, now_s: float) -> MemoryState:
    """The state after ``actions`` completed: evicted gone, prefetched resident, rejected dequeued.

    Treats copies as instantaneous; a caller that models copy time applies them as they land.
    """
    by_device = {d.name: d for d in state.devices}
    evicted = {(e.device, e.item) for e in actions.evict}
    dropped = {(r.device, r.request) for r in actions.rejected}
    devices = []
    for name, device in by_device.items():
        resident = [r for r in device.resident if (name, r.id) not in evicted]
        resident += [
            Resident(p.item, p.nbytes, now_s) for p in actions.prefetch if p.device == name
        ]
        queue = tuple(q for q in device.queue if (name, q.id) not in dropped)
        devices.append(replace(device, resident=tuple(resident), queue=queue))
    return MemoryState(tuple(devices))


def _check(device: DeviceState) -> None:
    if device.capacity_bytes <= 0:
        raise InvalidArgument("capacity_bytes must be > 0", field="capacity_bytes")
    if device.h2d_bps <= 0:
        raise InvalidArgument("h2d_bps must be > 0", field="h2d_bps")
    ids = [r.id for r in device.resident]
    if len(ids) != len(set(ids)):
        raise InvalidArgument(f"{device.name}: an item is resident twice", field="resident")
    sizes = [r.nbytes for r in device.resident]
    sizes += [i.nbytes for q in device.queue for i in q.items]
    if any(n < 0 for n in sizes):
        raise InvalidArgument(f"{device.name}: negative nbytes", field="nbytes")


class _DevicePlan:
    """One device's decisions, computed at construction (internal to reconcile_once)."""

    def __init__(self, device: DeviceState, now_s: float, slack_s: float) -> None:
        _check(device)
        self.device = device
        self.evict: list[Evict] = []
        self.prefetch: list[Prefetch] = []
        self.rejected: list[Rejected] = []
        self.pressure = False
        self.pinned = {i for r in device.running for i in r.items}
        self.resident = {r.id: r for r in device.resident}
        self.used = device.used_bytes
        # item -> (earliest expected start, queue position, the request behind it)
        self.need: dict[str, tuple[float, int, QueuedRequest]] = {}
        for pos, req in enumerate(device.queue):
            if self._reject_if_too_big(req):
                continue
            for ref in req.items:
                seen = self.need.get(ref.id)
                if seen is None or (req.expected_start_s, pos) < seen[:2]:
                    self.need[ref.id] = (req.expected_start_s, pos, req)
        self._relieve_over_capacity()
        self._prefetch_due(now_s, slack_s)

    def _reject_if_too_big(self, req: QueuedRequest) -> bool:
        sizes = {ref.id: ref.nbytes for ref in req.items}
        working_set = sum(sizes.values())
        if working_set <= self.device.capacity_bytes:
            return False
        self.rejected.append(
            Rejected(
                device=self.device.name,
                request=req.id,
                function=req.function,
                working_set_bytes=working_set,
                capacity_bytes=self.device.capacity_bytes,
                reason=(
                    f"working set of {working_set} bytes exceeds the capacity of "
                    f"{self.device.name} ({self.device.capacity_bytes} bytes)"
                ),
            )
        )
        return True

    def _needed_at(self, item: str) -> float | None:
        seen = self.need.get(item)
        return None if seen is None else seen[0]

    def _victims(self, sooner_than_s: float | None) -> list[Resident]:
        """Evictable residents in eviction order; with a bound, only those needed later."""
        candidates = []
        for r in self.resident.values():
            if r.id in self.pinned:
                continue
            needed_at = self._needed_at(r.id)
            costly = r.swap_bytes > 0  # must be copied out first: after the free ones
            if needed_at is None:
                key: tuple[int, bool, float, float, str] = (0, costly, r.last_used_s, 0.0, r.id)
            elif sooner_than_s is None or needed_at > sooner_than_s:
                key = (1, costly, -needed_at, r.last_used_s, r.id)
            else:
                continue
            candidates.append((key, r))
        candidates.sort(key=lambda kr: kr[0])
        return [r for _, r in candidates]

    def _take(self, victim: Resident) -> None:
        needed_at = self._needed_at(victim.id)
        reason: EvictReason = "unneeded" if needed_at is None else "needed-later"
        del self.resident[victim.id]
        self.used -= victim.nbytes
        self.evict.append(Evict(self.device.name, victim.id, victim.nbytes, reason, needed_at))

    def _relieve_over_capacity(self) -> None:
        if self.used <= self.device.capacity_bytes:
            return
        self.pressure = True
        for victim in self._victims(None):
            if self.used <= self.device.capacity_bytes:
                break
            self._take(victim)

    def _prefetch_due(self, now_s: float, slack_s: float) -> None:
        missing: dict[str, tuple[float, int, ItemRef, QueuedRequest]] = {}
        for item, (needed_at, pos, req) in self.need.items():
            if item in self.resident:
                continue
            ref = next(r for r in req.items if r.id == item)
            missing[item] = (needed_at, pos, ref, req)
        capacity = self.device.capacity_bytes
        for needed_at, _, ref, req in sorted(missing.values(), key=lambda m: (m[0], m[1], m[2].id)):
            lead_s = ref.nbytes / self.device.h2d_bps + slack_s
            if needed_at - now_s > lead_s:
                continue  # not due yet; a larger item needed later may be
            if self.used + ref.nbytes > capacity:
                self.pressure = True
                victims = self._victims(needed_at)
                room = capacity - self.used + sum(v.nbytes for v in victims)
                if room < ref.nbytes:
                    return  # blocked: later items must not take the room this one waits for
                for victim in victims:
                    if self.used + ref.nbytes <= capacity:
                        break
                    self._take(victim)
            self.used += ref.nbytes
            self.prefetch.append(
                Prefetch(self.device.name, ref.id, ref.nbytes, req.id, needed_at, lead_s)
            )
