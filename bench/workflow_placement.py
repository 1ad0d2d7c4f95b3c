"""Workflow steps placed near their input tubes vs placement blind to them (simulated).

A cluster of simulated 8-GPU DGX-1 nodes (``dgx1-v100``: hybrid cube-mesh NVLink, four
PCIe 3.0 switches; 2 nodes by default) runs a FaaSTube-shaped workflow set: models and
operators stitched into DAGs (decode -> detect -> classify, embed -> rerank, a video
fan-out/fan-in, a backbone with two heads), intermediates from KB (embeddings, logits) to
hundreds of MB (image batches, frames, feature maps); shapes from reference/workloads.md.
Workflows arrive as a Poisson stream (deterministic seed).

Each step, when its inputs are ready, goes to an instance of its function chosen by the
scheduler's own ``gpufaas.scheduler.placement.choose`` over one view per (node, GPU), built
as the placer builds them (``placer.node_gpus`` from each node's heartbeat, ``nearness``
against the NVLinks of its topology, ``inputs_at`` of the step's input tubes): a warm
instance with room (fewer than ``--room`` of its steps queued or running), else a new
instance (a cold start: init, the weights over the network when the node does not hold
them yet, then host -> GPU by the planner), up to ``--max-instances``, else the instance
free first. The two policies differ only in ``near``:

  (a) data-aware: ``near`` is where the step's input tubes are (its producers' GPU);
  (b) blind: ``near`` is FAR for every GPU (the same ``choose`` ignoring the data).

Every intermediate moves by the transfer planner's plan (``gpufaas.transfer.planner``
over the ``LinkModel`` of the topology, under the load of the copies already running on
that node): nothing on the same GPU, GPU -> GPU over NVLink (relays included) on one node,
and across nodes GPU -> host (the planner), the network (``--net-gbps``, one copy at a
time per pair of nodes), host -> GPU (the planner). The request's input goes host -> GPU
and the workflow's outputs GPU -> host the same way. A step computes for its fixed time
once its inputs have landed, its instance is loaded and its GPU is free: a GPU runs one
step at a time, in the order they were placed (``--gpu-sharing concurrent``: every
instance runs on its own, as if the GPU had room for all). Everything is **SIMULATED**: no GPU ran,
every time is from the link model and the per-step costs below.

Run:  .venv/bin/python bench/workflow_placement.py [--quick] [--nodes 2] [--seed 1] [--json PATH]
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Final, Literal

import _platform as harness
from sched_trace import SimNode, sim_nodes

from gpufaas.scheduler.placement import NodeView, choose, nearness
from gpufaas.scheduler.placer import NodeGpus, Where, inputs_at
from gpufaas.shared.devices import DEFAULT_TOPOLOGY, load_topology
from gpufaas.shared.messages import Placement, Tube
from gpufaas.transfer.linkmodel import HOST, LinkModel
from gpufaas.transfer.planner import Planner

KIB: Final = 2**10
MIB: Final = 2**20
GIB: Final = 2**30
GB: Final = 1e9
LABEL: Final = "SIMULATED"
PolicyName = Literal["data-aware", "blind"]
POLICIES: Final[tuple[PolicyName, ...]] = ("data-aware", "blind")
NEAR_NAMES: Final = ("input GPU", "NVLink nbr", "same node", "other node")
Medium = Literal["nvlink", "pcie", "network"]


@dataclass(frozen=True, slots=True)
class Step:
    """One step of a workflow: its function's weights, compute time per call, output size
    and the steps it reads (none: the request's input)."""

    name: str
    weight_gib: float
    compute_ms: float
    out_bytes: int
    after: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Workflow:
    """A DAG of steps (in an order where every step follows its inputs) and its input."""

    name: str
    input_bytes: int
    share: float
    steps: tuple[Step, ...]


# FaaSTube-shaped (reference/workloads.md): models and operators in a DAG, intermediates
# from KB to hundreds of MB. Sizes are the tensors' (fp16 images and feature maps); the
# compute times are per call of a batch on a V100-class GPU, rough figures, the same for
# both policies.
WORKFLOWS: Final = (
    Workflow(
        "detect-classify",  # 32 JPEGs -> 32x3x640x640 fp16 -> 128 crops 3x224x224 -> logits
        6 * MIB,
        0.3,
        (
            Step("decode", 0.05, 6.0, 75 * MIB),
            Step("detect", 0.5, 25.0, 37 * MIB, ("decode",)),
            Step("classify", 0.3, 10.0, 500 * KIB, ("detect",)),
        ),
    ),
    Workflow(
        "embed-rerank",  # a query and 64 passages -> 64x384 fp32 embeddings -> scores
        64 * KIB,
        0.3,
        (
            Step("embed", 0.09, 4.0, 96 * KIB),
            Step("rerank", 1.25, 15.0, 1 * KIB, ("embed",)),
        ),
    ),
    Workflow(
        "video-fanout",  # 16 1080p frames (fp16) -> boxes, masks, depth -> one summary
        24 * MIB,
        0.2,
        (
            Step("decode", 0.05, 10.0, 190 * MIB),
            Step("detect", 0.5, 25.0, 4 * MIB, ("decode",)),
            Step("segment", 1.0, 30.0, 32 * MIB, ("decode",)),
            Step("depth", 1.3, 20.0, 63 * MIB, ("decode",)),
            Step("fuse", 0.1, 8.0, 1 * MIB, ("detect", "segment", "depth")),
        ),
    ),
    Workflow(
        "backbone-heads",  # 32 images -> ViT-L features 32x577x1024 fp16 -> two heads
        3 * MIB,
        0.2,
        (
            Step("backbone", 1.13, 30.0, 36 * MIB),
            Step("cls-head", 0.01, 2.0, 128 * KIB, ("backbone",)),
            Step("det-head", 0.2, 6.0, 2 * MIB, ("backbone",)),
        ),
    ),
)


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """The simulated cluster and load; every field is a command-line flag."""

    nodes: int = 2
    topology: str = DEFAULT_TOPOLOGY
    gpus_per_node: int = 8
    workflows: int = 4000
    rate_wps: float = 80.0  # workflows per second, Poisson
    # 100 Gb/s between nodes (one EDR InfiniBand port of a DGX-1): an assumption, the
    # reference files give no network figure.
    net_gbps: float = 12.5
    init_s: float = 0.25  # an instance's runtime set-up before its weights' copy
    room: int = 2  # a warm instance takes a step while fewer than this are queued on it
    max_instances: int = 4  # per function
    # serial: a GPU runs one step at a time (processes time-slice it); concurrent: each
    # instance runs on its own, as if the GPU had room for all (MPS at no slowdown; optimistic)
    gpu_sharing: Literal["serial", "concurrent"] = "serial"
    warmup: float = 0.1  # the share of workflows, first arrived, not counted (cold starts)
    seed: int = 1


@dataclass(slots=True)
class Moved:
    """Bytes moved, by the kind of link crossed (a copy's part counts once for each kind
    its route crosses: a host copy relayed over NVLink counts in both)."""

    nvlink: int = 0
    pcie: int = 0
    network: int = 0

    def add(self, medium: Medium, nbytes: int) -> None:
        setattr(self, medium, getattr(self, medium) + nbytes)


@dataclass(frozen=True, slots=True)
class Result:
    """One policy's figures over the workflows counted (all simulated)."""

    policy: str
    workflows: int
    p50_s: float
    p99_s: float
    mean_s: float
    per_workflow: dict[str, tuple[float, float]]  # name -> (p50, p99)
    tubes: Moved  # intermediates between steps
    io: Moved  # the requests' inputs and the workflows' outputs
    placed: dict[str, int]  # where steps ran relative to their inputs (NEAR_NAMES)
    cold_starts: int
    bytes_loaded: int
    spread: dict[str, list[int]]  # node -> instances on each of its GPUs at the end


@dataclass(slots=True)
class _Instance:
    fn: str
    node: str
    gpu: str
    ready_s: float
    ends: list[float] = field(default_factory=list)  # its steps' end times

    def queued(self, now: float) -> int:
        self.ends = [e for e in self.ends if e > now]
        return len(self.ends)


@dataclass(slots=True)
class _Copy:
    start_s: float
    end_s: float
    load: dict[str, float]  # resource -> bytes/s (the plan's)


class Links:
    """The copies' paths and times: one planner per topology, the load of the copies
    running on each node, one network copy at a time per pair of nodes."""

    def __init__(self, cfg: BenchConfig, nodes: Sequence[SimNode]) -> None:
        topo = nodes[0].devices.topology or load_topology(cfg.topology)
        self.planner = Planner(LinkModel(topo))
        self.net_bps = cfg.net_gbps * GB
        self.running: dict[str, list[_Copy]] = {n.name: [] for n in nodes}
        self.net_free: dict[tuple[str, str], float] = {}

    def _local(
        self, node: str, src: str, dst: str, nbytes: int, t: float, *, moved: Moved
    ) -> float:
        """One copy on ``node`` starting at ``t``, planned under the load then; its end."""
        running = self.running[node] = [c for c in self.running[node] if c.end_s > t - 1.0]
        while True:
            now = [c for c in running if c.start_s <= t < c.end_s]
            load: dict[str, float] = {}
            for c in now:
                for r, bps in c.load.items():
                    load[r] = load.get(r, 0.0) + bps
            plan = self.planner.plan(src, dst, nbytes, load)
            if math.isfinite(plan.modelled_time_s) or not now:
                break
            t = min(c.end_s for c in now)  # every route is full: wait for a copy to end
        for part in plan.parts:
            kinds = {r.split(":", 1)[0] for r in part.route.resources}
            if kinds & {"nvlink", "nvswitch"}:
                moved.add("nvlink", part.nbytes)
            if kinds & {"pcie", "uplink"}:
                moved.add("pcie", part.nbytes)
        end = t + plan.modelled_time_s
        running.append(_Copy(t, end, plan.load_bps()))
        return end

    def copy(self, src: Where, dst: Where, nbytes: int, t: float, moved: Moved) -> float:
        """When ``nbytes`` from (node, tier) ``src`` have landed at ``dst``, starting at ``t``."""
        if src == dst or nbytes <= 0:
            return t
        if src[0] == dst[0]:
            return self._local(src[0], src[1], dst[1], nbytes, t, moved=moved)
        if src[1] != HOST:
            t = self._local(src[0], src[1], HOST, nbytes, t, moved=moved)
        pair = (src[0], dst[0])
        start = max(t, self.net_free.get(pair, 0.0))
        t = self.net_free[pair] = start + nbytes / self.net_bps
        moved.add("network", nbytes)
        if dst[1] != HOST:
            t = self._local(dst[0], HOST, dst[1], nbytes, t, moved=moved)
        return t


class Simulation:
    """One policy over one arrival sequence: steps placed when their inputs are ready."""

    def __init__(
        self, policy: PolicyName, cfg: BenchConfig, arrivals: Sequence[tuple[float, int]]
    ) -> None:
        self.policy = policy
        self.cfg = cfg
        self.arrivals = arrivals
        self.nodes = sim_nodes(cfg.nodes, cfg.gpus_per_node, cfg.topology, _gpu_bytes(cfg))
        self.links = Links(cfg, self.nodes)
        self.instances: dict[str, list[_Instance]] = {}
        self.free: dict[tuple[str, ...], float] = {}  # a GPU (serial) or an instance: free at
        self.used: dict[Where, int] = {}  # weights on each GPU
        self.count: Counter[Where] = Counter()  # instances on each GPU
        self.resident: set[tuple[str, str]] = set()  # (node, function): weights on its host
        self.tubes, self.io = Moved(), Moved()
        self.placed: Counter[int] = Counter()
        self.cold_starts = 0
        self.bytes_loaded = 0
        # (invocation, step) -> where its output is and when it was done
        self.done: dict[tuple[int, str], tuple[Where, float]] = {}
        self.latency: dict[int, float] = {}

    def run(self) -> Result:
        """Play every workflow to its end and summarise."""
        events: list[tuple[float, int, int, str]] = []
        seq = 0
        for k, (t, w) in enumerate(self.arrivals):
            for step in WORKFLOWS[w].steps:
                if not step.after:
                    seq += 1
                    events.append((t, seq, k, step.name))
        heapq.heapify(events)
        waiting: dict[tuple[int, str], int] = {}
        while events:
            now, _, k, name = heapq.heappop(events)
            wf = WORKFLOWS[self.arrivals[k][1]]
            self._run_step(k, wf, _step(wf, name), now)
            for nxt in wf.steps:
                if name in nxt.after:
                    left = waiting.get((k, nxt.name), len(nxt.after)) - 1
                    waiting[k, nxt.name] = left
                    if left == 0:
                        ready = max(self.done[k, a][1] for a in nxt.after)
                        seq += 1
                        heapq.heappush(events, (ready, seq, k, nxt.name))
        return self._result()

    def _run_step(self, k: int, wf: Workflow, step: Step, now: float) -> None:
        """Place ``step`` of invocation ``k`` at ``now``, copy its inputs, compute."""
        fn = f"{wf.name}/{step.name}"
        tubes = [(self.done[k, a][0], _step(wf, a).out_bytes) for a in step.after]
        near = inputs_at([_tube(at, n) for at, n in tubes]) if tubes else None
        inst = self._instance(fn, step, near, now)
        at: Where = (inst.node, inst.gpu)
        arrive = now
        if tubes:
            self.placed[_near(at, near, self.nodes)] += 1
            for src, nbytes in tubes:
                arrive = max(arrive, self.links.copy(src, at, nbytes, now, self.tubes))
        else:
            arrive = self.links.copy((inst.node, HOST), at, wf.input_bytes, now, self.io)
        runs_on = at if self.cfg.gpu_sharing == "serial" else (fn, *at)
        start = max(arrive, inst.ready_s, self.free.get(runs_on, 0.0))
        end = self.free[runs_on] = start + step.compute_ms / 1e3
        inst.ends.append(end)
        self.done[k, step.name] = (at, end)
        if not any(step.name in s.after for s in wf.steps):  # a sink: its output to the host
            out = self.links.copy(at, (inst.node, HOST), step.out_bytes, end, self.io)
            t0 = self.arrivals[k][0]
            self.latency[k] = max(self.latency.get(k, 0.0), out - t0)

    def _instance(self, fn: str, step: Step, near: Where | None, now: float) -> _Instance:
        """A warm instance with room, else a new one, both where ``choose`` says; at the
        cap (or with an instance on every GPU), the instance that is free first."""
        mine = {(i.node, i.gpu): i for i in self.instances.setdefault(fn, [])}
        views = self._views(fn, step, mine, near if self.policy == "data-aware" else None, now)
        chosen = choose(views) if views else None
        if chosen is not None and chosen.warm:
            return mine[chosen.node, chosen.gpu or HOST]
        if chosen is None or len(mine) >= self.cfg.max_instances:
            return min(mine.values(), key=lambda i: (max(i.ends, default=0.0), i.node, i.gpu))
        return self._cold_start(fn, step, (chosen.node, chosen.gpu or HOST), now)

    def _views(
        self,
        fn: str,
        step: Step,
        mine: dict[Where, _Instance],
        near: Where | None,
        now: float,
    ) -> list[NodeView]:
        """One view per GPU of every node, as ``Placer._views`` builds them; a GPU whose
        instance of ``fn`` has no room is left out (it cannot take a second one)."""
        weights = int(step.weight_gib * GIB)
        views = []
        for node in self.nodes:
            gpus: NodeGpus = node.gpus(
                {g: self.used.get((node.name, g), 0) for g in node.gpu_names}
            )
            load = {g: self.count[node.name, g] for g in gpus.names}
            resident = (node.name, fn) in self.resident
            for gpu in gpus.names:
                inst = mine.get((node.name, gpu))
                if inst is not None and inst.queued(now) >= self.cfg.room:
                    continue
                close, gbps = nearness(node.name, gpu, near, gpus.links)
                views.append(
                    NodeView(
                        node=node.name,
                        warm=inst is not None,
                        theta=1.0 if resident else 0.0,
                        bytes_to_load=0 if resident else weights,
                        functions=load[gpu],
                        free_bytes=gpus.free.get(gpu),
                        near=close,
                        on_gpu=inst is not None,
                        gpu=gpu,
                        link_gbps=gbps,
                        node_functions=sum(load.values()),
                    )
                )
        return views

    def _cold_start(self, fn: str, step: Step, at: Where, now: float) -> _Instance:
        """A new instance of ``fn`` on ``at``: init, the weights to the node if it does
        not hold them (the network), then host -> GPU by the planner."""
        weights = int(step.weight_gib * GIB)
        t = now + self.cfg.init_s
        if (at[0], fn) not in self.resident:
            t += weights / self.links.net_bps
            self.resident.add((at[0], fn))
        ready = self.links.copy((at[0], HOST), at, weights, t, Moved())
        inst = _Instance(fn, at[0], at[1], ready)
        self.instances[fn].append(inst)
        self.used[at] = self.used.get(at, 0) + weights
        self.count[at] += 1
        self.cold_starts += 1
        self.bytes_loaded += weights
        return inst

    def _result(self) -> Result:
        first = int(self.cfg.warmup * len(self.arrivals))
        counted = [k for k in self.latency if k >= first]
        lat = sorted(self.latency[k] for k in counted)
        per: dict[str, tuple[float, float]] = {}
        for w, wf in enumerate(WORKFLOWS):
            mine = sorted(self.latency[k] for k in counted if self.arrivals[k][1] == w)
            per[wf.name] = (percentile(mine, 50), percentile(mine, 99))
        spread = {n.name: [self.count[n.name, g] for g in n.gpu_names] for n in self.nodes}
        return Result(
            policy=self.policy,
            workflows=len(lat),
            p50_s=percentile(lat, 50),
            p99_s=percentile(lat, 99),
            mean_s=sum(lat) / len(lat) if lat else float("nan"),
            per_workflow=per,
            tubes=self.tubes,
            io=self.io,
            placed={NEAR_NAMES[r]: self.placed[r] for r in range(len(NEAR_NAMES))},
            cold_starts=self.cold_starts,
            bytes_loaded=self.bytes_loaded,
            spread=spread,
        )


def _step(wf: Workflow, name: str) -> Step:
    return next(s for s in wf.steps if s.name == name)


def _tube(at: Where, nbytes: int) -> Tube:
    """A step's output as the scheduler sees it: a tube with one copy, on its GPU."""
    place = Placement(node=at[0], tier=at[1], segment="sim")
    return Tube(
        id="sim",
        tenant="bench",
        datatype="UINT8",
        shape=[nbytes],
        nbytes=nbytes,
        placements=[place],
    )


def _near(at: Where, inputs: Where | None, nodes: Sequence[SimNode]) -> int:
    """How close ``at`` is to ``inputs`` (``placement.nearness``; FAR on another node)."""
    node = next(n for n in nodes if n.name == at[0])
    links = node.gpus({}).links
    return nearness(at[0], at[1], inputs, links)[0]


def _gpu_bytes(cfg: BenchConfig) -> int:
    devs = load_topology(cfg.topology).gpus
    return int(devs[0]["memory_bytes"])


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of already sorted values."""
    if not sorted_values:
        return float("nan")
    pos = (len(sorted_values) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def make_arrivals(cfg: BenchConfig) -> list[tuple[float, int]]:
    """(time, workflow) pairs: Poisson at ``rate_wps``, workflows drawn by their shares."""
    rng = random.Random(cfg.seed)
    shares = [w.share for w in WORKFLOWS]
    t, out = 0.0, []
    for _ in range(cfg.workflows):
        t += rng.expovariate(cfg.rate_wps)
        out.append((t, rng.choices(range(len(WORKFLOWS)), shares)[0]))
    return out


def run_all(cfg: BenchConfig) -> list[Result]:
    """Both policies over the same arrivals, data-aware first."""
    arrivals = make_arrivals(cfg)
    return [Simulation(p, cfg, arrivals).run() for p in POLICIES]


# --- the report ------------------------------------------------------------------------


def _gib(n: int) -> str:
    return f"{n / GIB:,.1f}"


def _x(blind: float, aware: float) -> str:
    """blind / data-aware (above 1: data-aware is lower)."""
    if aware <= 0:
        return "inf" if blind > 0 else "n/a"
    return f"{blind / aware:.2f}x"


def report(cfg: BenchConfig, results: Sequence[Result]) -> list[str]:
    """The plain-text report (after the machine), one string per line."""
    lines = [
        f"cluster : {cfg.nodes} nodes x {cfg.gpus_per_node} GPUs ({cfg.topology}: NVLink "
        f"pairs, PCIe host links; {LABEL}), {cfg.net_gbps:g} GB/s between nodes (assumed), "
        f"GPU sharing {cfg.gpu_sharing}",
        f"load    : {cfg.workflows} workflows, Poisson {cfg.rate_wps:g}/s, seed {cfg.seed}; "
        f"first {cfg.warmup:.0%} not counted; room {cfg.room} queued steps, "
        f"<= {cfg.max_instances} instances per function",
        "workflows (share: steps as name[compute ms -> output]):",
    ]
    for wf in WORKFLOWS:
        steps = ", ".join(
            f"{s.name}[{s.compute_ms:g} ms -> {_size(s.out_bytes)}]" for s in wf.steps
        )
        lines.append(f"  {wf.name:<16} {wf.share:.0%}, input {_size(wf.input_bytes)}: {steps}")
    lines += [
        "",
        f"{'policy':<11} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8}  {'hand-off GiB over':>27}"
        f"  {'request in/out GiB':>18} {'cold':>5}  ({LABEL})",
        f"{'':<11} {'':>8} {'':>8} {'':>8}  {'NVLink':>8} {'PCIe':>8} {'network':>9}"
        f"  {'NVLink':>8} {'PCIe':>9} {'starts':>5}",
    ]
    for r in results:
        lines.append(
            f"{r.policy:<11} {r.p50_s * 1e3:8.1f} {r.p99_s * 1e3:8.1f} {r.mean_s * 1e3:8.1f}  "
            f"{_gib(r.tubes.nvlink):>8} {_gib(r.tubes.pcie):>8} {_gib(r.tubes.network):>9}  "
            f"{_gib(r.io.nvlink):>8} {_gib(r.io.pcie):>9} {r.cold_starts:5d}"
        )
    lines += ["", f"p50 / p99 ms per workflow ({LABEL}):"]
    for wf in WORKFLOWS:
        cells = "   ".join(
            f"{r.policy} {r.per_workflow[wf.name][0] * 1e3:6.1f} / "
            f"{r.per_workflow[wf.name][1] * 1e3:6.1f}"
            for r in results
        )
        lines.append(f"  {wf.name:<16} {cells}")
    lines += ["", "where steps with input tubes ran, relative to them:"]
    for r in results:
        cells = ", ".join(f"{k} {v}" for k, v in r.placed.items())
        lines.append(f"  {r.policy:<11} {cells}")
    lines += ["", "instances per GPU at the end (gpu:0 first), by node:"]
    for r in results:
        cells = "  ".join(f"{n} [{' '.join(map(str, c))}]" for n, c in r.spread.items())
        lines.append(f"  {r.policy:<11} {cells}")
    return [*lines, "", *ratios(results)]


def ratios(results: Sequence[Result]) -> list[str]:
    """blind / data-aware for latency and bytes moved."""
    aware, blind = results
    return [
        f"blind / data-aware ({LABEL}; above 1: data-aware is lower): "
        f"p50 {_x(blind.p50_s, aware.p50_s)}, p99 {_x(blind.p99_s, aware.p99_s)}, "
        f"mean {_x(blind.mean_s, aware.mean_s)}",
        f"  hand-off bytes: PCIe {_x(blind.tubes.pcie, aware.tubes.pcie)}, "
        f"NVLink {_x(blind.tubes.nvlink, aware.tubes.nvlink)}, "
        f"network {_x(blind.tubes.network, aware.tubes.network)}",
    ]


def _size(n: int) -> str:
    return f"{n / MIB:g} MiB" if n >= MIB else f"{n / KIB:g} KiB"


def parse_args(argv: list[str] | None) -> tuple[BenchConfig, Path | None]:
    """The configuration from the command line (``--quick``: 600 workflows)."""
    d = BenchConfig()
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="600 workflows")
    ap.add_argument("--workflows", type=int, default=None, help=f"default {d.workflows}")
    ap.add_argument("--rate", type=float, default=d.rate_wps, help="workflows per second")
    ap.add_argument("--nodes", type=int, default=d.nodes)
    ap.add_argument("--topology", default=d.topology)
    ap.add_argument("--gpus-per-node", type=int, default=d.gpus_per_node)
    ap.add_argument("--net-gbps", type=float, default=d.net_gbps)
    ap.add_argument("--room", type=int, default=d.room)
    ap.add_argument("--max-instances", type=int, default=d.max_instances)
    ap.add_argument("--gpu-sharing", choices=("serial", "concurrent"), default=d.gpu_sharing)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--json", type=Path, default=None, metavar="PATH")
    a = ap.parse_args(argv)
    n = a.workflows if a.workflows is not None else (600 if a.quick else d.workflows)
    for name, value in (("workflows", n), ("nodes", a.nodes), ("room", a.room)):
        if value < 1:
            ap.error(f"--{name} must be >= 1")
    if a.rate <= 0 or a.net_gbps <= 0 or a.max_instances < 1:
        ap.error("--rate and --net-gbps must be > 0, --max-instances >= 1")
    cfg = BenchConfig(
        nodes=a.nodes,
        topology=a.topology,
        gpus_per_node=a.gpus_per_node,
        workflows=n,
        rate_wps=a.rate,
        net_gbps=a.net_gbps,
        room=a.room,
        max_instances=a.max_instances,
        gpu_sharing=a.gpu_sharing,
        seed=a.seed,
    )
    return cfg, a.json


def main(argv: list[str] | None = None) -> int:
    """Run both policies on one arrival sequence and print the figures."""
    cfg, json_path = parse_args(argv)
    m = harness.machine(f"{cfg.nodes} simulated {cfg.topology} nodes ({LABEL}; no GPU ran)")
    harness.print_machine(m)
    t0 = time.perf_counter()
    results = run_all(cfg)
    wall_s = time.perf_counter() - t0
    print("\n".join(report(cfg, results)))
    print(f"(simulation took {wall_s:.1f} s of wall time for both policies)")
    harness.write_json(
        json_path,
        m,
        {
            "label": LABEL,
            "config": asdict(cfg),
            "workflows": [asdict(w) for w in WORKFLOWS],
            "results": [asdict(r) for r in results],
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
