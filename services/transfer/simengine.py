"""A simulated copy engine: real bytes, simulated time, on a node's link model.

Transfers arrive with a size, a deadline and a ``copy(offset, nbytes)`` callback that
moves the real bytes of one chunk (the caller makes it copy between host segments, so
the destination is byte-exact). Time is a :class:`VirtualClock` that only this engine
advances, event by event (arrivals, chunks fully sent, chunks landing); nothing
sleeps. On each arrival the planner plans the new transfer against the current load;
on each arrival or completion (of a transfer, or of one of its routes) the bandwidth
allocator recomputes every rate. Bytes
progress along each route at its rate (a fluid model) and land one route latency after
they are sent; each chunk is handed to ``copy`` when it lands, in order per route.

Chunks are sized from the cost of issuing one copy: ``chunk >= overhead * bandwidth *
factor`` (about 10-20 us per copy issued from Python, per ``reference/hardware.md``, so
MiB-scale chunks keep that overhead under 1/factor). The overhead itself is not charged
to simulated time, which is why a lone transfer takes exactly the planner's modelled time.

Every time this module reports is **simulated**, never measured.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from gpufaas.shared.errors import InvalidArgument
from gpufaas.transfer.bandwidth import Allocation, Demand, Flow, allocate
from gpufaas.transfer.linkmodel import LinkModel, Route
from gpufaas.transfer.planner import Plan, Planner

MIB: Final = 2**20
DEFAULT_COPY_OVERHEAD_S: Final = 15e-6  # one copy issued from Python (torch/cupy), H100 class
DEFAULT_CHUNK_FACTOR: Final = 10  # chunk time >= 10x the issue overhead: <= 10% lost to it
DEFAULT_MIN_CHUNK_NBYTES: Final = 1 * MIB
DEFAULT_MAX_CHUNK_NBYTES: Final = 64 * MIB

CopyFn = Callable[[int, int], None]


class VirtualClock:
    """Simulated seconds; moves only forward, and only when the engine moves it."""

    def __init__(self, start_s: float = 0.0) -> None:
        self.now_s = start_s

    def advance_to(self, t_s: float) -> None:
        """Move simulated time forward to ``t_s``."""
        if t_s < self.now_s:
            raise ValueError(f"simulated time cannot go back ({t_s} < {self.now_s})")
        self.now_s = t_s

    def __repr__(self) -> str:
        return f"VirtualClock(simulated now={self.now_s:.9f} s)"


@dataclass(frozen=True, slots=True)
class SimTransfer:
    """One copy to simulate; ``deadline_s`` is absolute on the engine's virtual clock."""

    id: str
    src: str
    dst: str
    nbytes: int
    copy: CopyFn = field(repr=False)  # moves bytes [offset, offset + n) of this transfer
    deadline_s: float | None = None
    inference_latency_s: float = 0.0


@dataclass(frozen=True, slots=True, repr=False)
class TransferRecord:
    """What one finished transfer did; every ``*_sim_s`` is simulated time, not measured."""

    id: str
    src: str
    dst: str
    nbytes: int
    routes: tuple[Route, ...]
    route_nbytes: tuple[int, ...]
    submitted_sim_s: float
    finished_sim_s: float  # when its last byte landed
    planned_sim_s: float  # the plan's modelled duration when it started
    deadline_s: float | None
    inference_latency_s: float
    deadline_met: bool | None  # landed by deadline - inference latency; None: no deadline
    at_risk: tuple[str, ...]  # reasons the allocator gave while it was in flight
    chunks: int

    @property
    def duration_sim_s(self) -> float:
        """Simulated seconds from arrival to the last byte landing."""
        return self.finished_sim_s - self.submitted_sim_s

    def __repr__(self) -> str:
        met = {True: "deadline met", False: "deadline MISSED", None: "no deadline"}
        return (
            f"TransferRecord({self.id}: {self.src}->{self.dst} {self.nbytes} B over "
            f"{len(self.routes)} route(s), simulated {self.submitted_sim_s:.6f}->"
            f"{self.finished_sim_s:.6f} s = {self.duration_sim_s * 1e3:.3f} ms simulated "
            f"(planned {self.planned_sim_s * 1e3:.3f} ms), {met[self.deadline_met]})"
        )


class _Part:
    """One route of a transfer in flight (mutable bookkeeping of the fluid model)."""

    __slots__ = (
        "base",
        "chunk",
        "emitted",
        "landings",
        "last_landing_s",
        "nbytes",
        "rate_bps",
        "route",
        "sent",
        "weight",
    )

    def __init__(self, route: Route, base: int, nbytes: int, weight: float, chunk: int) -> None:
        self.route = route
        self.base = base  # offset of this part's bytes within the transfer
        self.nbytes = nbytes
        self.weight = weight
        self.chunk = chunk
        self.sent = 0.0  # bytes put on the route so far
        self.emitted = 0  # bytes cut into chunks (each waits in `landings`)
        self.rate_bps = 0.0
        self.landings: deque[tuple[float, int, int]] = deque()  # (time, offset, nbytes)
        self.last_landing_s = 0.0

    @property
    def sending(self) -> bool:
        return self.emitted < self.nbytes

    @property
    def done(self) -> bool:
        return not self.sending and not self.landings


@dataclass(slots=True)
class _Active:
    spec: SimTransfer
    plan: Plan
    parts: list[_Part]
    submitted_s: float
    risks: list[str] = field(default_factory=list)
    chunks: int = 0


class SimCopyEngine:
    """Copies transfers chunk by chunk on a virtual clock; all its times are simulated."""

    def __init__(
        self,
        model: LinkModel,
        *,
        clock: VirtualClock | None = None,
        planner: Planner | None = None,
        copy_overhead_s: float = DEFAULT_COPY_OVERHEAD_S,
        chunk_factor: float = DEFAULT_CHUNK_FACTOR,
        min_chunk_nbytes: int = DEFAULT_MIN_CHUNK_NBYTES,
        max_chunk_nbytes: int = DEFAULT_MAX_CHUNK_NBYTES,
    ) -> None:
        if not 0 < min_chunk_nbytes <= max_chunk_nbytes:
            raise InvalidArgument("need 0 < min_chunk_nbytes <= max_chunk_nbytes", field="chunk")
        self.model = model
        self.clock = clock or VirtualClock()
        self.planner = planner or Planner(model)
        self.copy_overhead_s = copy_overhead_s
        self.chunk_factor = chunk_factor
        self.min_chunk_nbytes = min_chunk_nbytes
        self.max_chunk_nbytes = max_chunk_nbytes
        self.records: list[TransferRecord] = []
        self.last_allocation: Allocation | None = None
        self._arrivals: list[tuple[float, int, SimTransfer]] = []  # heap
        self._seq = 0
        self._active: dict[str, _Active] = {}
        self._dirty = False  # rates must be recomputed before time moves on

    def __repr__(self) -> str:
        return (
            f"SimCopyEngine({self.model.topology.name}, simulated now={self.now_s:.9f} s, "
            f"{len(self._active)} active, {len(self._arrivals)} pending)"
        )

    @property
    def now_s(self) -> float:
        """The engine's simulated time."""
        return self.clock.now_s

    @property
    def idle(self) -> bool:
        """Nothing in flight and nothing waiting to arrive."""
        return not self._active and not self._arrivals

    def chunk_nbytes(self, bandwidth_bps: float) -> int:
        """Chunk size for a route of this bandwidth: whole MiB, overhead <= 1/factor."""
        raw = self.copy_overhead_s * bandwidth_bps * self.chunk_factor
        size = math.ceil(raw / MIB) * MIB
        return min(max(size, self.min_chunk_nbytes), self.max_chunk_nbytes)

    def submit(self, transfer: SimTransfer, *, at_s: float | None = None) -> None:
        """Queue ``transfer`` to arrive at ``at_s`` (simulated; default: now)."""
        self.model.check_pair(transfer.src, transfer.dst)
        if transfer.nbytes < 0:
            raise InvalidArgument(f"nbytes must be >= 0, got {transfer.nbytes}", field="nbytes")
        when = self.now_s if at_s is None else at_s
        if when < self.now_s:
            raise InvalidArgument(
                f"arrival {when} s is before the simulated now {self.now_s} s", field="at_s"
            )
        if transfer.id in self._active or any(t.id == transfer.id for *_, t in self._arrivals):
            raise InvalidArgument(f"transfer {transfer.id!r} is already in flight", field="id")
        heapq.heappush(self._arrivals, (when, self._seq, transfer))
        self._seq += 1

    def run_until(self, t_s: float) -> list[TransferRecord]:
        """Advance simulated time to ``t_s``; returns the transfers that finished meanwhile."""
        return self._run(t_s)

    def run_until_idle(self) -> list[TransferRecord]:
        """Advance until every submitted transfer has finished; returns them."""
        return self._run(math.inf)

    def load_bps(self) -> dict[str, float]:
        """Current rate on each resource, summed over the transfers in flight."""
        out: dict[str, float] = {}
        for a in self._active.values():
            for p in a.parts:
                for r in p.route.resources:
                    out[r] = out.get(r, 0.0) + p.rate_bps
        return out

    # --- the event loop --------------------------------------------------------------

    def _run(self, limit_s: float) -> list[TransferRecord]:
        if limit_s < self.now_s:
            raise InvalidArgument(
                f"cannot run until {limit_s} s: simulated now is {self.now_s} s", field="t_s"
            )
        done_before = len(self.records)
        while True:
            now = self.now_s
            self._land_due(now)
            while self._arrivals and self._arrivals[0][0] <= now:
                _, _, spec = heapq.heappop(self._arrivals)
                self._start(spec, now)
                self._dirty = True
            self._retire(now)
            if self._dirty and self._active:
                self._reallocate(now)
            self._dirty = False
            nxt = self._next_event_s()
            if math.isinf(nxt) and self._active:
                raise RuntimeError(f"simulation stalled at {now} s: no route has bandwidth")
            if nxt > limit_s or math.isinf(nxt):  # nothing happens before the limit: coast
                if math.isinf(limit_s):
                    break
                self._send(now, limit_s)
                self.clock.advance_to(limit_s)
                break
            self._send(now, nxt)
            self.clock.advance_to(nxt)
        return self.records[done_before:]

    def _next_event_s(self) -> float:
        nxt = self._arrivals[0][0] if self._arrivals else math.inf
        for a in self._active.values():
            for p in a.parts:
                if p.landings:
                    nxt = min(nxt, p.landings[0][0])
                if p.sending and p.rate_bps > 0:  # the next chunk is fully sent
                    cut = min(p.emitted + p.chunk, p.nbytes)
                    nxt = min(nxt, self.now_s + max(cut - p.sent, 0.0) / p.rate_bps)
        return nxt

    def _send(self, t0: float, t1: float) -> None:
        """Move every route's bytes forward from ``t0`` to ``t1`` and cut finished chunks.

        A chunk's cut time is computed exactly as in ``_next_event_s``, so the chunk
        whose cut is the event that ends this step is always cut, whatever the rounding.
        """
        for a in self._active.values():
            for p in a.parts:
                if not p.sending or p.rate_bps <= 0:
                    continue
                while p.emitted < p.nbytes:
                    cut = min(p.emitted + p.chunk, p.nbytes)
                    at = t0 + max(cut - p.sent, 0.0) / p.rate_bps
                    if at > t1:
                        break
                    landing = at + p.route.latency_s
                    p.landings.append((landing, p.base + p.emitted, cut - p.emitted))
                    p.last_landing_s = landing
                    p.emitted = cut
                    a.chunks += 1
                if p.emitted < p.nbytes:
                    moved = p.sent + p.rate_bps * (t1 - t0)
                    p.sent = min(max(moved, float(p.emitted)), float(p.nbytes))
                else:
                    p.sent = float(p.nbytes)
                    self._dirty = True  # its bandwidth is free for the others

    def _land_due(self, now: float) -> None:
        """Hand every chunk that has landed by ``now`` to its copy callback, in time order."""
        due: list[tuple[float, int, int, _Active, _Part]] = []
        for a in self._active.values():
            for p in a.parts:
                for when, offset, n in p.landings:
                    if when > now:
                        break
                    due.append((when, offset, n, a, p))
        due.sort(key=lambda x: (x[0], x[1]))
        for _, offset, n, a, p in due:
            a.spec.copy(offset, n)  # if it raises, the chunk stays due for the next run
            p.landings.popleft()  # per route, landings are in offset order

    def _retire(self, now: float) -> None:
        """Record the transfers whose every byte has landed."""
        for tid in [t for t, a in self._active.items() if all(p.done for p in a.parts)]:
            a = self._active.pop(tid)
            self._record(a, max((p.last_landing_s for p in a.parts), default=now))
            self._dirty = True

    def _start(self, spec: SimTransfer, now: float) -> None:
        if spec.nbytes == 0:
            plan = self.planner.plan(spec.src, spec.dst, 0)
            self._record(_Active(spec, plan, [], now), now)
            return
        plan = self.planner.plan(spec.src, spec.dst, spec.nbytes, self._newcomer_load())
        parts = [
            _Part(
                p.route,
                p.offset,
                p.nbytes,
                p.rate_bps if p.rate_bps > 0 else 1.0,
                min(self.chunk_nbytes(p.route.capacity_bps), p.nbytes),
            )
            for p in plan.parts
        ]
        self._active[spec.id] = _Active(spec, plan, parts, now)

    def _newcomer_load(self) -> dict[str, float]:
        """The load a new transfer should plan against: what it would be left under sharing.

        Reserved least rates stay out of reach; the rest of a resource would be split
        evenly with the transfers already on it, so a busy link looks that much fuller.
        """
        caps = self.model.capacities_bps
        reserved: dict[str, float] = {}
        users: dict[str, int] = {}
        alloc = self.last_allocation
        for tid, a in self._active.items():
            for r in {r for p in a.parts for r in p.route.resources}:
                users[r] = users.get(r, 0) + 1
            if alloc is not None:
                for p in a.parts:
                    least = alloc.reserved_bps.get((tid, p.route), 0.0)
                    for r in p.route.resources:
                        reserved[r] = reserved.get(r, 0.0) + least
        return {
            r: caps[r] - max(caps[r] - reserved.get(r, 0.0), 0.0) / (1 + n)
            for r, n in users.items()
        }

    def _reallocate(self, now: float) -> None:
        demands = [
            Demand(
                tid,
                tuple(
                    Flow(p.route, math.ceil(p.nbytes - p.sent), p.weight)
                    for p in a.parts
                    if p.sending
                ),
                a.spec.deadline_s,
                a.spec.inference_latency_s,
            )
            for tid, a in self._active.items()
        ]
        alloc = allocate(now, demands, self.model.capacities_bps)
        self.last_allocation = alloc
        for tid, a in self._active.items():
            for p in a.parts:
                p.rate_bps = alloc.rate(tid, p.route) if p.sending else 0.0
        for risk in alloc.at_risk:
            a = self._active[risk.transfer_id]
            if risk.cause not in {r.split(":", 1)[0] for r in a.risks}:
                a.risks.append(f"{risk.cause}: {risk.detail} (at simulated {now:.6f} s)")

    def _record(self, a: _Active, finished: float) -> None:
        spec = a.spec
        met = None
        if spec.deadline_s is not None:
            met = finished <= spec.deadline_s - spec.inference_latency_s + 1e-12
        self.records.append(
            TransferRecord(
                id=spec.id,
                src=spec.src,
                dst=spec.dst,
                nbytes=spec.nbytes,
                routes=tuple(p.route for p in a.parts),
                route_nbytes=tuple(p.nbytes for p in a.parts),
                submitted_sim_s=a.submitted_s,
                finished_sim_s=finished,
                planned_sim_s=a.plan.modelled_time_s,
                deadline_s=spec.deadline_s,
                inference_latency_s=spec.inference_latency_s,
                deadline_met=met,
                at_risk=tuple(a.risks),
                chunks=a.chunks,
            )
        )
