"""The node's links as the transfer service uses them: plans against the load in flight.

Every copy between tiers of this node is planned by the planner (``planner.py``) against
the resources the copies already in flight use, so a copy that arrives while another
holds GPU 0's PCIe link is routed around it. On simulated GPUs the plan's modelled time
is the copy's reported duration (labelled simulated); on a real GPU the plan only picks
the routes and the copy is timed.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from gpufaas.shared.devices import Topology
from gpufaas.transfer.linkmodel import LinkModel
from gpufaas.transfer.planner import Plan, Planner


class NodeLinks:
    """The planner of one node, and the load of the copies it has planned and not finished."""

    def __init__(self, topology: Topology) -> None:
        self.model = LinkModel(topology)
        self.planner = Planner(self.model)
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
        """Plan a copy against the load in flight; its load counts until the block ends."""
        plan = self.planner.plan(src, dst, nbytes, self.load_bps())
        key = next(self._ids)
        with self._lock:
            self._inflight[key] = plan.load_bps()
        try:
            yield plan
        finally:
            with self._lock:
                del self._inflight[key]


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
