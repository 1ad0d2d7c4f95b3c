"""The node's link model: what bandwidth each link offers and which routes a copy can take.

Built once from a :class:`~gpufaas.shared.devices.Topology`. Every link direction is a
*resource* with a capacity in bytes/s, named by a string (``pcie:gpu:0:h2d``,
``uplink:switch0:h2d``, ``nvlink:gpu:0>gpu:3``, ``nvswitch:gpu:0:out``,
``hostmem:read``), so a caller's load map is plain ``{resource: bytes/s}``. GPUs that
share a PCIe switch (``pcie_switch`` in the topology's GPU list, the ``shared`` tag of
its host links) also share that switch's uplink: one more resource on their routes. An
NVSwitch fabric gives each GPU one port per direction instead of a resource per pair.

Candidate routes for every (src, dst) pair are enumerated here at construction, never
on the request path. Bandwidths are the topology's link-model inputs (peak or measured
figures from ``reference/hardware.md``); every time derived from them is *modelled*.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from gpufaas.shared.devices import Link, Topology
from gpufaas.shared.errors import InvalidArgument
from gpufaas.shared.identity import Device, is_gpu

HOST: Final = "host"
HOST_MEMORY_READ: Final = "hostmem:read"  # host -> device traffic reads host DRAM
HOST_MEMORY_WRITE: Final = "hostmem:write"
# DGX-1: 150 GB/s of NVLink between quad neighbours needs a 4-hop relay (0>4>6>2>3)
DEFAULT_MAX_NVLINK_HOPS: Final = 4
FLOW_EPS_BPS: Final = 1e3  # residuals below 1 kB/s count as zero (float noise at GB/s)

Direction = Literal["h2d", "d2h"]
RouteKind = Literal["direct", "relay", "host-staged"]


def pcie_resource(gpu: str, direction: Direction) -> str:
    """The resource of one GPU's own PCIe link in one direction."""
    return f"pcie:{gpu}:{direction}"


def uplink_resource(switch: str, direction: Direction) -> str:
    """The resource of a PCIe switch's uplink to the CPU, shared by the GPUs behind it."""
    return f"uplink:{switch}:{direction}"


def nvlink_resource(a: str, b: str) -> str:
    """The resource of the NVLink bundle from ``a`` to ``b`` (all its links together)."""
    return f"nvlink:{a}>{b}"


def nvswitch_resource(gpu: str, direction: Literal["out", "in"]) -> str:
    """The resource of a GPU's port into (``out``) or out of (``in``) an NVSwitch fabric."""
    return f"nvswitch:{gpu}:{direction}"


@dataclass(frozen=True, slots=True)
class Route:
    """One path a copy can take: the devices it crosses and the resources it uses."""

    src: str
    dst: str
    hops: tuple[str, ...]  # devices in order, src first and dst last
    resources: tuple[str, ...]  # each used once, in path order
    latency_s: float  # sum of the latencies of the links crossed
    capacity_bps: float  # bottleneck when idle: min over resources
    kind: RouteKind

    @property
    def name(self) -> str:
        """``host>gpu:2>gpu:0``: the hops, for logs and tables."""
        return ">".join(self.hops)

    @property
    def relays(self) -> int:
        """GPUs the bytes pass through on the way (the host of a staged copy excluded)."""
        return sum(1 for h in self.hops[1:-1] if h != HOST)


@dataclass(frozen=True, slots=True)
class _Edge:
    tail: str
    head: str
    resource: str
    latency_s: float


class FlowNet:
    """Max-flow (Edmonds-Karp) over a small directed graph whose edges are resources.

    Small enough that a Python BFS per augmenting path costs microseconds; ``augment``
    can start from any feasible flow, so a caller can seed it with a good guess.
    """

    __slots__ = ("_arcs", "_n", "_out", "edges", "sink", "source")

    def __init__(self, n_nodes: int, edges: Sequence[tuple[int, int]], source: int, sink: int):
        self._n = n_nodes
        self.edges = tuple(edges)
        self.source = source
        self.sink = sink
        # per node: (other node, edge, forward?) for residual arcs; forward-only for paths
        arcs: list[list[tuple[int, int, bool]]] = [[] for _ in range(n_nodes)]
        out: list[list[tuple[int, int]]] = [[] for _ in range(n_nodes)]
        for e, (u, v) in enumerate(self.edges):
            arcs[u].append((v, e, True))
            arcs[v].append((u, e, False))
            out[u].append((v, e))
        self._arcs = tuple(tuple(a) for a in arcs)
        self._out = tuple(tuple(o) for o in out)

    def augment(self, cap: Sequence[float], flow: list[float]) -> int:
        """Raise ``flow`` (in place) to a maximum flow under ``cap``; returns the paths added."""
        n, s, t, arcs = self._n, self.source, self.sink, self._arcs
        added = 0
        while True:
            pred: list[tuple[int, int, bool] | None] = [None] * n
            pred[s] = (s, -1, True)
            queue = [s]
            for u in queue:
                for v, e, fwd in arcs[u]:
                    if pred[v] is None and (cap[e] - flow[e] if fwd else flow[e]) > FLOW_EPS_BPS:
                        pred[v] = (u, e, fwd)
                        queue.append(v)
                if pred[t] is not None:
                    break
            if pred[t] is None:
                return added
            push = math.inf
            v = t
            while v != s:
                u, e, fwd = pred[v]  # type: ignore[misc]  # set on every node of the path
                push = min(push, cap[e] - flow[e] if fwd else flow[e])
                v = u
            v = t
            while v != s:
                u, e, fwd = pred[v]  # type: ignore[misc]
                flow[e] += push if fwd else -push
                v = u
            added += 1

    def max_flow(self, cap: Sequence[float]) -> tuple[float, list[float]]:
        """The maximum flow value and the flow on each edge, from zero."""
        flow = [0.0] * len(self.edges)
        self.augment(cap, flow)
        return self.value(flow), flow

    def value(self, flow: Sequence[float]) -> float:
        """Net flow out of the source."""
        s = self.source
        return sum(flow[e] for e, (u, v) in enumerate(self.edges) if u == s) - sum(
            flow[e] for e, (u, v) in enumerate(self.edges) if v == s
        )

    def decompose(self, flow: Sequence[float]) -> list[tuple[tuple[int, ...], float]]:
        """Split a flow into distinct source-sink paths (edge indices, rate); cycles are dropped."""
        left = list(flow)
        s, t, out = self.source, self.sink, self._out
        paths: dict[tuple[int, ...], float] = {}
        while True:
            nodes = [s]
            path: list[int] = []
            on_path = {s: 0}
            u = s
            while u != t:
                step = next(((v, e) for v, e in out[u] if left[e] > FLOW_EPS_BPS), None)
                if step is None:  # rounding left a stub: drop the edge that led here
                    if not path:
                        return list(paths.items())
                    left[path[-1]] = 0.0
                    break
                v, e = step
                if v in on_path:  # a cycle carries nothing from s to t: cancel it
                    cycle = [*path[on_path[v] :], e]
                    least = min(left[c] for c in cycle)
                    for c in cycle:
                        left[c] -= least
                    break
                path.append(e)
                nodes.append(v)
                on_path[v] = len(path)
                u = v
            else:
                rate = min(left[e] for e in path)
                for e in path:
                    left[e] -= rate
                key = tuple(path)
                paths[key] = paths.get(key, 0.0) + rate


class LinkModel:
    """Resources, capacities and precomputed candidate routes of one node's links."""

    def __init__(
        self,
        topology: Topology,
        *,
        host_memory_bps: float | None = None,
        max_nvlink_hops: int = DEFAULT_MAX_NVLINK_HOPS,
    ) -> None:
        """``host_memory_bps`` bounds host DRAM per direction (unbounded when None: the
        topology files carry no measured figure); relays go up to ``max_nvlink_hops``."""
        if max_nvlink_hops < 1:
            raise InvalidArgument("max_nvlink_hops must be >= 1", field="max_nvlink_hops")
        if host_memory_bps is not None and not host_memory_bps > 0:
            raise InvalidArgument("host_memory_bps must be positive", field="host_memory_bps")
        self.topology = topology
        self.max_nvlink_hops = max_nvlink_hops
        gpus = sorted(int(g["index"]) for g in topology.gpus)
        self.gpus: tuple[str, ...] = tuple(Device.gpu(i).name for i in gpus)
        self.devices: tuple[str, ...] = (HOST, *self.gpus)
        self._switch_of = _switch_groups(topology)
        self._edges: list[_Edge] = []
        self._down: dict[str, tuple[int, ...]] = {}  # gpu -> edges host ... gpu over PCIe
        self._up: dict[str, tuple[int, ...]] = {}
        self.capacities_bps: dict[str, float] = {}
        self.host_memory_bps = host_memory_bps
        self._build_edges(topology.links, host_memory_bps)
        self._edge_of = {e.resource: i for i, e in enumerate(self._edges)}
        self._nv_out: dict[str, list[int]] = {}  # gpu -> its NVLink / NVSwitch out edges
        for i, e in enumerate(self._edges):
            if is_gpu(e.tail) and e.resource.startswith(("nvlink:", "nvswitch:")):
                self._nv_out.setdefault(e.tail, []).append(i)
        self._routes: dict[tuple[str, str], tuple[Route, ...]] = {}
        for src in self.devices:
            for dst in self.devices:
                if src != dst:
                    self._routes[src, dst] = tuple(self._enumerate(src, dst))
        self._full_nets: dict[tuple[str, str], FlowNet] = {}

    # --- construction ----------------------------------------------------------------

    def _add(self, tail: str, head: str, resource: str, bps: float, latency_s: float) -> int:
        self._edges.append(_Edge(tail, head, resource, latency_s))
        self.capacities_bps[resource] = bps
        return len(self._edges) - 1

    def _build_edges(self, links: Iterable[Link], host_memory_bps: float | None) -> None:
        pcie: dict[str, Link] = {}
        nvswitch_ports: dict[str, Link] = {}
        for ln in links:
            self._check_link(ln)
            bps, lat = ln.gbps * 1e9, ln.latency_us * 1e-6
            if HOST in (ln.a, ln.b):
                pcie[ln.b if ln.a == HOST else ln.a] = ln
            elif ln.kind.startswith("nvswitch"):
                for g in (ln.a, ln.b):
                    if g not in nvswitch_ports or nvswitch_ports[g].gbps < ln.gbps:
                        nvswitch_ports[g] = ln
            else:
                self._add(ln.a, ln.b, nvlink_resource(ln.a, ln.b), bps, lat)
                self._add(ln.b, ln.a, nvlink_resource(ln.b, ln.a), bps, lat)
        for g, ln in nvswitch_ports.items():
            # a crossing pays the fabric's latency once, on the way out
            bps, lat = ln.gbps * 1e9, ln.latency_us * 1e-6
            self._add(g, "nvswitch", nvswitch_resource(g, "out"), bps, lat)
            self._add("nvswitch", g, nvswitch_resource(g, "in"), bps, 0.0)
        self._build_pcie(pcie, host_memory_bps)

    def _check_link(self, ln: Link) -> None:
        if ln.a not in self.devices or ln.b not in self.devices or ln.a == ln.b:
            raise InvalidArgument(
                f"topology {self.topology.name}: link {ln.a}-{ln.b} names a device "
                f"it does not list",
                field="topology",
            )
        if not ln.gbps > 0 or ln.latency_us < 0:
            raise InvalidArgument(
                f"topology {self.topology.name}: link {ln.a}-{ln.b} needs gbps > 0 "
                f"and latency_us >= 0",
                field="topology",
            )

    def _build_pcie(self, pcie: Mapping[str, Link], host_memory_bps: float | None) -> None:
        """Host memory, switch uplinks and each GPU's own link, both directions."""
        read_from, write_to = HOST, HOST
        host_down: tuple[int, ...] = ()
        host_up: tuple[int, ...] = ()
        if host_memory_bps is not None:
            read_from, write_to = "host:read", "host:write"
            host_down = (self._add(HOST, read_from, HOST_MEMORY_READ, host_memory_bps, 0.0),)
            host_up = (self._add(write_to, HOST, HOST_MEMORY_WRITE, host_memory_bps, 0.0),)
        members: dict[str, list[str]] = {}
        for g in pcie:
            members.setdefault(self._switch_of.get(g, g), []).append(g)
        for switch, gs in sorted(members.items()):
            down, up = read_from, write_to
            sw_down, sw_up = host_down, host_up
            if len(gs) > 1:  # a real shared uplink: one more resource on every member's route
                bps = max(pcie[g].gbps for g in gs) * 1e9
                down, up = f"{switch}:down", f"{switch}:up"
                sw_down += (self._add(read_from, down, uplink_resource(switch, "h2d"), bps, 0.0),)
                sw_up = (self._add(up, write_to, uplink_resource(switch, "d2h"), bps, 0.0), *sw_up)
            for g in gs:
                ln = pcie[g]
                bps, lat = ln.gbps * 1e9, ln.latency_us * 1e-6
                self._down[g] = (*sw_down, self._add(down, g, pcie_resource(g, "h2d"), bps, lat))
                self._up[g] = (self._add(g, up, pcie_resource(g, "d2h"), bps, lat), *sw_up)

    def _enumerate(self, src: str, dst: str) -> list[Route]:
        """Candidate routes of one pair, best first (fewest relays, then widest)."""
        found: list[tuple[int, ...]] = []
        if src == HOST:
            for entry in self.gpus:
                down = self._pcie_path(entry, "h2d")
                if down is not None:
                    for nv in self._nvlink_paths(entry, dst):
                        found.append(down + nv)
        elif dst == HOST:
            for exit_ in self.gpus:
                up = self._pcie_path(exit_, "d2h")
                if up is not None:
                    for nv in self._nvlink_paths(src, exit_):
                        found.append(nv + up)
        else:
            found.extend(p for p in self._nvlink_paths(src, dst) if p)
            up, down = self._pcie_path(src, "d2h"), self._pcie_path(dst, "h2d")
            if up is not None and down is not None:
                found.append(up + down)
        routes = [self.route_of([self._edges[i].resource for i in p]) for p in found]
        routes.sort(key=lambda r: (r.kind == "host-staged", r.relays, -r.capacity_bps, r.hops))
        return routes

    def _pcie_path(self, gpu: str, direction: Direction) -> tuple[int, ...] | None:
        """Edges between the host and a GPU over PCIe (host memory and uplink included)."""
        return (self._down if direction == "h2d" else self._up).get(gpu)

    def _nvlink_paths(self, src: str, dst: str) -> list[tuple[int, ...]]:
        """Simple GPU-to-GPU paths of at most ``max_nvlink_hops`` hops (empty if src is dst)."""
        if src == dst:
            return [()]
        paths: list[tuple[int, ...]] = []
        fabric_in = [j for j, f in enumerate(self._edges) if f.tail == "nvswitch"]

        def walk(node: str, visited: frozenset[str], path: tuple[int, ...], hops: int) -> None:
            for i in self._nv_out.get(node, ()):
                e = self._edges[i]
                if e.head == "nvswitch":  # crossing the fabric: out port, then an in port
                    if "nvswitch" in visited:
                        continue
                    for j in fabric_in:
                        if self._edges[j].head not in visited:
                            step(self._edges[j].head, visited | {"nvswitch"}, (*path, i, j), hops)
                elif e.head not in visited:
                    step(e.head, visited, (*path, i), hops)

        def step(node: str, visited: frozenset[str], path: tuple[int, ...], hops: int) -> None:
            if node == dst:
                paths.append(path)
            elif hops + 1 < self.max_nvlink_hops:
                walk(node, visited | {node}, path, hops + 1)

        walk(src, frozenset({src}), (), 0)
        return paths

    def route_of(self, resources: Sequence[str]) -> Route:
        """The route that crosses these resources, in path order."""
        path = [self._edges[self._edge_of[r]] for r in resources]
        hops = [path[0].tail] + [e.head for e in path]
        devices = tuple(h for h in hops if h == HOST or is_gpu(h))
        staged = HOST in devices[1:-1]
        return Route(
            src=devices[0],
            dst=devices[-1],
            hops=devices,
            resources=tuple(e.resource for e in path),
            latency_s=sum(e.latency_s for e in path),
            capacity_bps=min(self.capacities_bps[e.resource] for e in path),
            kind="host-staged" if staged else "direct" if len(devices) == 2 else "relay",
        )

    # --- queries ---------------------------------------------------------------------

    def check_device(self, name: str) -> str:
        """``name`` if this node has that device; otherwise an error naming the ones it has."""
        if name not in self.devices:
            raise InvalidArgument(
                f"unknown device {name!r} on topology {self.topology.name}; "
                f"it has {', '.join(self.devices)}",
                field="tier",
            )
        return name

    def check_pair(self, src: str, dst: str) -> tuple[str, str]:
        """Both devices exist and differ (a copy onto itself is not a transfer)."""
        self.check_device(src)
        self.check_device(dst)
        if src == dst:
            raise InvalidArgument(f"source and destination are both {src}", field="tier")
        return src, dst

    def switch_of(self, gpu: str) -> str | None:
        """The PCIe switch whose uplink ``gpu`` shares with other GPUs, if any."""
        switch = self._switch_of.get(self.check_device(gpu))
        up = uplink_resource(switch, "h2d") if switch else None
        return switch if up in self.capacities_bps else None

    def routes(self, src: str, dst: str) -> tuple[Route, ...]:
        """Precomputed candidate routes from ``src`` to ``dst``, best first."""
        return self._routes[self.check_pair(src, dst)]

    def has_direct_nvlink(self, a: str, b: str) -> bool:
        """Whether two GPUs are joined by an NVLink bundle or the same NVSwitch fabric."""
        routes = self.routes(a, b)
        return HOST not in (a, b) and any(r.kind == "direct" for r in routes)

    def flow_net(self, src: str, dst: str, resources: Sequence[str]) -> FlowNet:
        """A max-flow network from ``src`` to ``dst`` over these resources' links only;
        its edge ``i`` is ``resources[i]``."""
        edges = [self._edges[self._edge_of[r]] for r in resources]
        names = sorted({x for e in edges for x in (e.tail, e.head)} | {src, dst})
        index = {name: i for i, name in enumerate(names)}
        return FlowNet(
            len(names), [(index[e.tail], index[e.head]) for e in edges], index[src], index[dst]
        )

    def max_flow_bps(self, src: str, dst: str, load: Mapping[str, float] | None = None) -> float:
        """The most bytes/s the whole resource graph can carry from ``src`` to ``dst``.

        Every path counts, however many relays or host stages it takes: an upper bound
        that no route choice can beat (``load`` is subtracted from the capacities first).
        """
        everything = [e.resource for e in self._edges]
        net = self._full_nets.get((src, dst))
        if net is None:
            net = self._full_nets[self.check_pair(src, dst)] = self.flow_net(src, dst, everything)
        value, _ = net.max_flow(self.available_bps(everything, load))
        return value

    def max_flow_time(
        self, src: str, dst: str, nbytes: int, load: Mapping[str, float] | None = None
    ) -> float:
        """Modelled seconds of the optimum for one transfer: size / max-flow + min latency."""
        self.check_pair(src, dst)
        if nbytes <= 0:
            return 0.0
        bps = self.max_flow_bps(src, dst, load)
        if bps <= 0:
            return math.inf
        return nbytes / bps + min(r.latency_s for r in self.routes(src, dst))

    def available_bps(
        self, resources: Sequence[str], load: Mapping[str, float] | None
    ) -> list[float]:
        """Capacity minus load, never below zero, for each resource in order."""
        caps = self.capacities_bps
        if not load:
            return [caps[r] for r in resources]
        return [max(caps[r] - load.get(r, 0.0), 0.0) for r in resources]


def _switch_groups(topology: Topology) -> dict[str, str]:
    """GPU name -> PCIe switch name, for GPUs whose entry names a ``pcie_switch``."""
    out: dict[str, str] = {}
    for g in topology.gpus:
        sw = g.get("pcie_switch")
        if sw is not None:
            out[Device.gpu(int(g["index"])).name] = f"switch{sw}"
    return out
