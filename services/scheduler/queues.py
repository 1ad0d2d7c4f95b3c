"""Per-function queues: requests wait here, earliest deadline first, for room on an instance.

An instance holds at most ``capacity`` requests at once (its batch size times its
concurrency, twice over: one batch forming while one computes); the rest wait in the
scheduler, where the autoscaler sees them and the memory manager is told about them
(the queue view). No I/O: the service owns the futures' resolution.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from gpufaas.shared import constants as c
from gpufaas.shared.identity import FunctionRef
from gpufaas.shared.messages import QueuedTube, Tube

_seq = itertools.count()


@dataclass(eq=False, slots=True)
class Pending:
    """A request waiting for an instance; ``node`` resolves to where it may run."""

    deadline: float
    request_id: str
    node: asyncio.Future[str]
    seq: int = field(default_factory=lambda: next(_seq))
    cold_us: int = 0  # it waited for an instance to be built: how long that took
    worker_us: int = 0  # of which waiting for a worker process of its tenant
    new_process: bool = False  # that process had to be started (no spare was ready)
    loaded_bytes: int = 0  # bytes the tensor store read for that instance (not resident)
    prefer: str | None = None  # the node to run on when it has room (where the inputs are)
    tubes: tuple[Tube, ...] = ()  # its input tubes (told to the memory managers, see view)

    def __lt__(self, other: Pending) -> bool:
        return (self.deadline, self.seq) < (other.deadline, other.seq)


@dataclass(slots=True)
class FunctionQueue:
    """One function's waiting requests and what each of its instances holds now."""

    ref: FunctionRef
    waiting: list[Pending] = field(default_factory=list)  # a heap
    in_flight: Counter[str] = field(default_factory=Counter)
    # Requests sent to a node (by ``Pending.seq``): the node and their input tubes, pinned.
    running_tubes: dict[int, tuple[str, tuple[Tube, ...]]] = field(default_factory=dict)
    arrivals: int = 0  # since the last load report
    last_deadline_miss: float = 0.0
    # Answers per second out of this queue while requests wait in it (a moving average of
    # the gaps between them; idle time is not counted): how long the waiting requests take
    # to drain (``expected_wait``) and how soon a turned-away caller may find room.
    drain_rate: float = 0.0
    _last_release: float = 0.0

    @property
    def key(self) -> str:
        """``tenant.name``, as in the functions bucket."""
        return self.ref.key

    def push(self, p: Pending) -> None:
        self.arrivals += 1
        heapq.heappush(self.waiting, p)

    def queued(self) -> int:
        return sum(1 for p in self.waiting if not p.node.done())

    def assign(self, rooms: Mapping[str, int]) -> list[tuple[Pending, str]]:
        """Give waiting requests, most urgent first, to the node whose instances have the
        most room (``rooms``: how many each node's instances hold at once)."""
        out = []
        nodes = list(rooms)

        def free(n: str) -> int:
            return rooms[n] - self.in_flight[n]

        while self.waiting and nodes:
            head = self.waiting[0]
            if head.node.done():  # cancelled, or timed out while waiting
                heapq.heappop(self.waiting)
                continue
            node = min(nodes, key=lambda n: (n != head.prefer, -free(n), n))
            if free(node) <= 0:
                node = min(nodes, key=lambda n: (-free(n), n))
            if free(node) <= 0:
                break
            heapq.heappop(self.waiting)
            self.in_flight[node] += 1
            out.append((head, node))
        return out

    def release(self, node: str, now: float | None = None) -> None:
        self.in_flight[node] -= 1
        if self.in_flight[node] <= 0:
            del self.in_flight[node]
        now = time.monotonic() if now is None else now
        if self._last_release:
            gap = max(now - self._last_release, 1e-6)
            rate = 1.0 / gap
            self.drain_rate = rate if not self.drain_rate else 0.8 * self.drain_rate + 0.2 * rate
        # A gap counts only while requests wait: the next one measures the service rate,
        # not an idle spell.
        self._last_release = now if self.queued() else 0.0

    def full(self, limit: int) -> bool:
        """Whether ``limit`` requests wait already (the next one is turned away)."""
        return len(self.waiting) >= limit and self.queued() >= limit

    def expected_wait(self) -> float | None:
        """Seconds until the requests waiting now have drained at the recent rate (None
        when none wait, or no rate is known yet)."""
        queued = self.queued()
        if not queued or self.drain_rate <= 0:
            return None
        return queued / self.drain_rate

    def retry_after(self) -> float:
        """Seconds until the waiting requests have drained at the recent rate (a default
        when none is known), bounded: what a turned-away caller is told to wait."""
        if self.drain_rate <= 0:
            return c.RETRY_AFTER_DEFAULT_S
        wait = self.queued() / self.drain_rate
        return min(max(wait, c.RETRY_AFTER_DEFAULT_S), c.RETRY_AFTER_MAX_S)

    def next_deadline(self) -> float | None:
        live = [p.deadline for p in self.waiting if not p.node.done()]
        return min(live) if live else None

    def queued_tubes(self, node: str, limit: int) -> list[QueuedTube]:
        """The input tubes with a copy on ``node`` of the requests running there (``running``)
        and of the first waiting requests, each with its request's position in the queue
        (0: the next to run), at most ``limit``. Only copies on the node itself: its memory
        manager brings a tube from its host tier to its GPU, never across nodes."""
        out: list[QueuedTube] = []
        for where, tubes in self.running_tubes.values():
            for t in tubes:
                if where == node and len(out) < limit:
                    out.append(
                        QueuedTube(
                            id=t.id, tenant=t.tenant, nbytes=t.nbytes, position=0, running=True
                        )
                    )
        live = sorted(p for p in self.waiting if not p.node.done())
        for position, p in enumerate(live):
            for t in p.tubes:
                if len(out) >= limit:
                    return out
                if any(pl.node == node for pl in t.placements):
                    out.append(
                        QueuedTube(id=t.id, tenant=t.tenant, nbytes=t.nbytes, position=position)
                    )
        return out
