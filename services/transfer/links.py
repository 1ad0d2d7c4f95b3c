"""The node's links as the transfer service uses them: plans against the load in flight.

Every copy between tiers of this node is planned by the planner (``planner.py``) against
the resources the copies already in flight use, so a copy that arrives while another
holds GPU 0's PCIe link is routed around it. On simulated GPUs the plan's modelled time
is the copy's reported duration (labelled simulated); on a real GPU the plan only picks
the routes and the copy is timed. The bytes each link has carried are counted as copies
finish (``LinkBytes``), for the transfer service's ``links`` verb.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from gpufaas.shared.devices import Topology
from gpufaas.shared.messages import LinkInfo, LinksReply
from gpufaas.transfer.linkmodel import LinkModel
from gpufaas.transfer.planner import Plan, Planner


class LinkBytes:
    """Bytes carried per link and direction since the service started, counted when a copy
    finishes: each route's bytes on every hop of the route. Thread-safe (real GPUs' copies
    finish on executor threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bytes: dict[tuple[str, str], int] = {}

    def add(self, hops: Sequence[str], nbytes: int) -> None:
        """``nbytes`` carried along ``hops`` (``("host", "gpu:2", "gpu:0")``)."""
        with self._lock:
            for a, b in itertools.pairwise(hops):
                self._bytes[a, b] = self._bytes.get((a, b), 0) + nbytes

    def moved(self, a: str, b: str) -> int:
        """Bytes carried from ``a`` to ``b`` so far."""
        with self._lock:
            return self._bytes.get((a, b), 0)


class NodeLinks:
    """The planner of one node, the load of the copies it has planned and not finished, and
    the bytes its links have carried."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.model = LinkModel(topology)
        self.planner = Planner(self.model)
        self.moved = LinkBytes()
        self._lock = threading.Lock()
        self._inflight: dict[int, dict[str, float]] = {}
        self._ids = itertools.count()

    def load_bps(self) -> dict[str, float]:
        """Bytes/s in use per resource by the copies in flight."""
        total: dict[str, float] = {}
        with self._lock:
            for load in self._inflight.values():
                for resource, bps in load.items():
                    total[resource] = total.get(resource, 0.0) + bps
        return total

    @contextmanager
    def copying(self, src: str, dst: str, nbytes: int) -> Iterator[Plan]:
        """Plan a copy against the load in flight; its load counts until the block ends,
        its bytes once the block ends without an error."""
        plan = self.planner.plan(src, dst, nbytes, self.load_bps())
        key = next(self._ids)
        with self._lock:
            self._inflight[key] = plan.load_bps()
        try:
            yield plan
        finally:
            with self._lock:
                del self._inflight[key]
        for part in plan.parts:
            self.moved.add(part.route.hops, part.nbytes)


def links_reply(links: NodeLinks | None, *, simulated: bool) -> LinksReply:
    """The node's topology links with the bytes each has carried (none without GPUs)."""
    if links is None:
        return LinksReply(topology="", simulated=simulated, links=[])
    out = [
        LinkInfo(
            a=ln.a,
            b=ln.b,
            kind=ln.kind,
            gbps=ln.gbps,
            bytes_a_to_b=links.moved.moved(ln.a, ln.b),
            bytes_b_to_a=links.moved.moved(ln.b, ln.a),
        )
        for ln in links.topology.links
    ]
    return LinksReply(topology=links.topology.name, simulated=simulated, links=out)


def describe(plan: Plan) -> str:
    """``host->gpu:0 over 4 routes: host>gpu:0 40%, host>gpu:2>gpu:0 20%, ...``."""
    parts = [(p.route.name, p.nbytes) for p in plan.parts]
    return describe_routes(plan.src, plan.dst, plan.nbytes, parts)


def describe_routes(src: str, dst: str, nbytes: int, parts: list[tuple[str, int]]) -> str:
    """A copy's routes and the share of the bytes each carried, largest first."""
    if not parts or not nbytes:
        return f"{src}->{dst}"
    shares = ", ".join(f"{name} {n / nbytes:.0%}" for name, n in sorted(parts, key=lambda p: -p[1]))
    return f"{src}->{dst} over {len(parts)} route{'s' if len(parts) > 1 else ''}: {shares}"
