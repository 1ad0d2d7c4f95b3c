"""Contention-aware path selection: which routes one copy takes and how many bytes on each.

For every (src, dst) pair the planner compiles, once, the sub-graph of the link model
that its candidate routes cover, and the idle optimum's routes as a seed. A decision
then (1) fills the seed routes greedily with what the current load leaves free, (2)
finishes with augmenting paths (Edmonds-Karp) to the maximum flow, which is what
accounts for routes of one plan sharing a resource (two relays behind one switch
uplink) and for rerouting around busy links, (3) splits the bytes so that every part
finishes at the same time given its route's latency, dropping routes too slow to start
to be worth it (water-filling over latency). GPU to GPU it never touches the host when
an NVLink joins the pair; without one, the host-staged route is a fallback used only
when the NVLink routes together offer less than it does.

All times here are *modelled* from the link model, not measured.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from gpufaas.shared.errors import InvalidArgument
from gpufaas.transfer.linkmodel import FLOW_EPS_BPS, HOST, FlowNet, LinkModel, Route

# A route carrying under 1% of a plan's bandwidth costs a copy stream for under 1% gain.
MIN_ROUTE_SHARE: Final = 0.01


@dataclass(frozen=True, slots=True)
class PlanPart:
    """The bytes one route carries and the rate the plan expects of it."""

    route: Route
    offset: int  # where this part's bytes start within the transfer
    nbytes: int
    rate_bps: float


@dataclass(frozen=True, slots=True)
class Plan:
    """Routes and byte counts for one copy, with its modelled (not measured) time."""

    src: str
    dst: str
    nbytes: int
    parts: tuple[PlanPart, ...]
    modelled_time_s: float  # inf when every candidate route is saturated

    @property
    def rate_bps(self) -> float:
        """Total planned rate over all parts."""
        return sum(p.rate_bps for p in self.parts)

    def load_bps(self) -> dict[str, float]:
        """The load this plan adds to each resource while it runs at its planned rates."""
        out: dict[str, float] = {}
        for p in self.parts:
            for r in p.route.resources:
                out[r] = out.get(r, 0.0) + p.rate_bps
        return out


@dataclass(frozen=True, slots=True)
class _Net:
    """One pair's compiled sub-graph: its resources (edge i is resources[i]), seeds, routes."""

    flow: FlowNet
    resources: tuple[str, ...]
    seeds: tuple[tuple[int, ...], ...]  # idle optimum's paths, in local edge indices
    routes: Mapping[tuple[int, ...], Route]
    best: Route  # what a plan with no free bandwidth queues on
    fallback: Route | None  # host-staged route, for GPU pairs without an NVLink


class Planner:
    """Chooses routes and splits bytes for copies on one node's link model."""

    def __init__(self, model: LinkModel) -> None:
        self.model = model
        self._nets: dict[tuple[str, str], _Net] = {}
        for src in model.devices:
            for dst in model.devices:
                if src != dst:
                    self._nets[src, dst] = self._compile(src, dst)

    def _compile(self, src: str, dst: str) -> _Net:
        m = self.model
        candidates = m.routes(src, dst)
        gpu_pair = HOST not in (src, dst)
        primary = [r for r in candidates if r.kind != "host-staged"] if gpu_pair else candidates
        fallback = None
        if gpu_pair and not m.has_direct_nvlink(src, dst):
            fallback = next((r for r in candidates if r.kind == "host-staged"), None)
        resources = tuple(sorted({res for r in primary for res in r.resources}))
        local = {res: i for i, res in enumerate(resources)}
        flow = m.flow_net(src, dst, resources)
        routes = {tuple(local[res] for res in r.resources): r for r in primary}
        seeds: tuple[tuple[int, ...], ...] = ()
        if primary:
            _, idle = flow.max_flow(m.available_bps(resources, None))
            seeds = tuple(p for p, _ in flow.decompose(idle))
        best = primary[0] if primary else candidates[0]
        return _Net(flow, resources, seeds, routes, best, fallback)

    def _route(self, net: _Net, path: tuple[int, ...]) -> Route:
        r = net.routes.get(path)
        return r if r is not None else self.model.route_of([net.resources[e] for e in path])

    def plan(
        self, src: str, dst: str, nbytes: int, load: Mapping[str, float] | None = None
    ) -> Plan:
        """Routes and bytes for copying ``nbytes`` from ``src`` to ``dst`` under ``load``.

        ``load`` maps resource -> bytes/s already in use (missing: idle).
        """
        # every valid pair is compiled; check_pair explains why any other is not
        net = self._nets.get((src, dst)) or self._nets[self.model.check_pair(src, dst)]
        if nbytes < 0:
            raise InvalidArgument(f"nbytes must be >= 0, got {nbytes}", field="nbytes")
        if nbytes == 0:
            return Plan(src, dst, 0, (), 0.0)
        cap = self.model.available_bps(net.resources, load)
        flow = [0.0] * len(cap)
        found: list[tuple[tuple[int, ...], float]] = []
        for path in net.seeds:
            rate = min(cap[e] - flow[e] for e in path)
            if rate > FLOW_EPS_BPS:
                for e in path:
                    flow[e] += rate
                found.append((path, rate))
        if net.seeds and net.flow.augment(cap, flow):
            found = net.flow.decompose(flow)
        rated: list[tuple[Route, float]] = [(self._route(net, p), rate) for p, rate in found]
        if net.fallback is not None:
            r = net.fallback
            spare = min(self.model.available_bps(r.resources, load))
            if spare > FLOW_EPS_BPS and spare > sum(rate for _, rate in rated):
                rated.append((r, spare))  # disjoint from every NVLink route: no overlap
        if not rated:
            return Plan(src, dst, nbytes, (PlanPart(net.best, 0, nbytes, 0.0),), math.inf)
        return _split(src, dst, nbytes, rated)


def _split(src: str, dst: str, nbytes: int, rated: Sequence[tuple[Route, float]]) -> Plan:
    """Bytes per route so that all parts finish together; routes that cannot help are dropped.

    With rates r_i and latencies L_i, parts finish together at T when
    sum r_i * (T - L_i) = nbytes; a route whose latency is not below T would carry nothing,
    and one under ``MIN_ROUTE_SHARE`` of the bandwidth is not worth its copy stream.
    """
    floor = MIN_ROUTE_SHARE * sum(rate for _, rate in rated)
    order = sorted(
        ((route, rate) for route, rate in rated if rate >= floor),
        key=lambda x: (x[0].latency_s, -x[1]),
    )
    total = weighted = 0.0
    finish = math.inf
    chosen: list[tuple[Route, float]] = []
    for route, rate in order:
        if chosen and route.latency_s >= finish:
            break
        total += rate
        weighted += rate * route.latency_s
        finish = (nbytes + weighted) / total
        chosen.append((route, rate))
    counts = [int(rate * (finish - route.latency_s)) for route, rate in chosen]
    widest = max(range(len(chosen)), key=lambda i: chosen[i][1])
    counts[widest] += nbytes - sum(counts)  # rounding: a few bytes at most
    parts: list[PlanPart] = []
    offset = 0
    for (route, rate), n in zip(chosen, counts, strict=True):
        if n > 0:
            parts.append(PlanPart(route, offset, n, rate))
            offset += n
    time_s = max(p.route.latency_s + p.nbytes / p.rate_bps for p in parts)
    return Plan(src, dst, nbytes, tuple(parts), time_s)
