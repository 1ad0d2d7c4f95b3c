"""Residency policies under memory pressure: a discrete-event simulation of a multi-model trace.

Several models (10-20 GB each, 8 by default) whose weights together exceed two simulated
32 GB GPUs serve a synthetic trace shaped like the Azure Functions trace (Shahrad et al.,
"Serverless in the Wild", ATC 2020; see reference/workloads.md): Zipf popularity over
models and bursty arrivals (a two-state MMPP: calm, and bursts at 4x the calm rate). Each
model has a home GPU (most popular first, to the GPU with the least load so far), the
same for every policy; each GPU runs one request at a time from a FIFO queue; a load
takes bytes / host->GPU bandwidth (PCIe 3.0, 12.5 GB/s, reference/hardware.md) on the
GPU's own link, one copy at a time. Three policies see the same trace and seed:

  (a) queue-aware: ``gpufaas.memory.policy.reconcile_once`` after every event, with the
      queue's expected start times; it evicts what no queued request needs first and
      prefetches while the previous request still runs,
  (b) LRU on demand: the head request's model is loaded when the GPU is free for it,
      evicting least recently used models until it fits,
  (c) static reservations: each GPU reserves room for its most popular home models
      (pinned once loaded, never evicted) plus one reload slot sized for the largest of
      the rest, which share that slot and reload whenever it holds another model.

Evicting weights costs no copy (the host tier keeps them); "bytes swapped" counts the
host->GPU bytes loaded. Every time here is **simulated**, not measured.

Run:  .venv/bin/python bench/memory_trace.py [--seed 1] [--requests 4000] [--json out.json]
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import platform
import random
import statistics
import sys
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import _platform as harness

from gpufaas.memory.policy import (
    DeviceState,
    ItemRef,
    MemoryState,
    QueuedRequest,
    Resident,
    RunningRequest,
    reconcile_once,
)

GB: Final = 10**9
LABEL: Final = "simulated"
PolicyName = Literal["queue-aware", "lru", "static"]
POLICIES: Final[tuple[PolicyName, ...]] = ("queue-aware", "lru", "static")
DEFAULT_RATE_PER_S: Final = 1.5


@dataclass(frozen=True, slots=True)
class TraceConfig:
    """The simulated node and workload; defaults are the figures in bench/README.md."""

    models: int = 8
    gpus: int = 2
    capacity_bytes: int = 32 * GB
    h2d_bps: float = 12.5e9  # PCIe 3.0 x16, measured pinned (reference/hardware.md)
    min_model_bytes: int = 10 * GB
    max_model_bytes: int = 20 * GB
    infer_base_s: float = 0.1
    infer_s_per_gb: float = 0.01  # larger models run longer: 0.2-0.3 s per request
    rate_per_s: float = DEFAULT_RATE_PER_S  # mean arrivals over the whole node
    zipf_s: float = 1.0
    burst_factor: float = 4.0
    calm_dwell_s: float = 16.0
    burst_dwell_s: float = 4.0
    slack_s: float = 0.25  # prefetch slack for the queue-aware policy


@dataclass(frozen=True, slots=True)
class Model:
    """One model: its weights are one item on its home GPU."""

    name: str
    nbytes: int
    infer_s: float
    weight: float
    home: int


@dataclass(frozen=True, slots=True)
class Arrival:
    """One request of the trace."""

    id: str
    t_s: float
    model: int


@dataclass(frozen=True, slots=True)
class Result:
    """One policy's figures over the trace (all times simulated)."""

    policy: str
    completed: int
    rejected: int
    p50_s: float
    p99_s: float
    mean_s: float
    bytes_swapped: int
    bytes_evicted: int
    loads: int
    makespan_s: float


def make_trace(seed: int, requests: int, cfg: TraceConfig) -> tuple[list[Model], list[Arrival]]:
    """Models with random sizes and Zipf weights, and an MMPP arrival trace."""
    rng = random.Random(seed)
    step = GB // 2
    sizes = [
        rng.randrange(cfg.min_model_bytes, cfg.max_model_bytes + 1, step) for _ in range(cfg.models)
    ]
    ranks = list(range(cfg.models))
    rng.shuffle(ranks)  # popularity independent of size
    weights = [1.0 / (r + 1) ** cfg.zipf_s for r in ranks]
    load = [0.0] * cfg.gpus
    homes = [0] * cfg.models
    for m in sorted(range(cfg.models), key=lambda m: -weights[m]):
        homes[m] = min(range(cfg.gpus), key=lambda g: (load[g], g))
        load[homes[m]] += weights[m]
    models = [
        Model(
            f"m{m}",
            sizes[m],
            cfg.infer_base_s + cfg.infer_s_per_gb * sizes[m] / GB,
            weights[m],
            homes[m],
        )
        for m in range(cfg.models)
    ]
    burst_share = cfg.burst_dwell_s / (cfg.burst_dwell_s + cfg.calm_dwell_s)
    calm_rate = cfg.rate_per_s / (1 - burst_share + burst_share * cfg.burst_factor)
    arrivals: list[Arrival] = []
    t, bursting = 0.0, False
    while len(arrivals) < requests:
        dwell_end = t + rng.expovariate(1 / (cfg.burst_dwell_s if bursting else cfg.calm_dwell_s))
        rate = calm_rate * (cfg.burst_factor if bursting else 1.0)
        while len(arrivals) < requests:
            t += rng.expovariate(rate)
            if t >= dwell_end:
                t = dwell_end
                break
            model = rng.choices(range(cfg.models), weights=weights)[0]
            arrivals.append(Arrival(f"r{len(arrivals)}", t, model))
        bursting = not bursting
    return models, arrivals


@dataclass(slots=True)
class _Gpu:
    index: int
    resident: dict[int, float] = field(default_factory=dict)  # landed model -> last use
    loading: dict[int, float] = field(default_factory=dict)  # model -> when its copy lands
    queue: deque[Arrival] = field(default_factory=deque)
    running: tuple[Arrival, float] | None = None  # request and its end time
    link_free_s: float = 0.0
    pinned_models: frozenset[int] = frozenset()  # static policy only


class Simulation:
    """One policy over one trace: events in time order, one step per GPU after each."""

    def __init__(
        self, policy: PolicyName, models: list[Model], arrivals: list[Arrival], cfg: TraceConfig
    ) -> None:
        self.policy = policy
        self.models = models
        self.arrivals = arrivals
        self.cfg = cfg
        self.gpus = [_Gpu(g) for g in range(cfg.gpus)]
        self.events: list[tuple[float, int, str, int, int]] = []  # t, seq, kind, gpu, arg
        self.seq = 0
        self.latencies: list[float] = []
        self.rejected = 0
        self.swapped = 0
        self.evicted = 0
        self.loads = 0
        self.now_s = 0.0
        if policy == "static":
            for gpu in self.gpus:
                gpu.pinned_models = self._static_partition(gpu.index)

    def _static_partition(self, g: int) -> frozenset[int]:
        home = sorted(
            (m for m in range(len(self.models)) if self.models[m].home == g),
            key=lambda m: -self.models[m].weight,
        )
        for k in range(len(home), -1, -1):
            pinned, rest = home[:k], home[k:]
            slot = max((self.models[m].nbytes for m in rest), default=0)
            if sum(self.models[m].nbytes for m in pinned) + slot <= self.cfg.capacity_bytes:
                return frozenset(pinned)
        return frozenset()

    def _push(self, t_s: float, kind: str, gpu: int, arg: int) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t_s, self.seq, kind, gpu, arg))

    def run(self) -> Result:
        """Play the whole trace and summarise it."""
        for i, a in enumerate(self.arrivals):
            self._push(a.t_s, "arrive", self.models[a.model].home, i)
        while self.events:
            t_s, _, kind, g, arg = heapq.heappop(self.events)
            self.now_s = t_s
            gpu = self.gpus[g]
            if kind == "arrive":
                gpu.queue.append(self.arrivals[arg])
            elif kind == "landed":
                del gpu.loading[arg]
                gpu.resident[arg] = t_s
            else:  # "done"
                assert gpu.running is not None
                req, _ = gpu.running
                gpu.running = None
                gpu.resident[req.model] = t_s
                self.latencies.append(t_s - req.t_s)
            self._step(gpu)
        lat = sorted(self.latencies)
        return Result(
            policy=self.policy,
            completed=len(lat),
            rejected=self.rejected,
            p50_s=_percentile(lat, 0.50),
            p99_s=_percentile(lat, 0.99),
            mean_s=statistics.fmean(lat) if lat else 0.0,
            bytes_swapped=self.swapped,
            bytes_evicted=self.evicted,
            loads=self.loads,
            makespan_s=self.now_s,
        )

    def _load(self, gpu: _Gpu, m: int) -> None:
        start = max(self.now_s, gpu.link_free_s)
        gpu.link_free_s = start + self.models[m].nbytes / self.cfg.h2d_bps
        gpu.loading[m] = gpu.link_free_s
        self.swapped += self.models[m].nbytes
        self.loads += 1
        self._push(gpu.link_free_s, "landed", gpu.index, m)

    def _evict(self, gpu: _Gpu, m: int) -> None:
        del gpu.resident[m]
        self.evicted += self.models[m].nbytes

    def _step(self, gpu: _Gpu) -> None:
        if self.policy == "queue-aware":
            self._reconcile(gpu)
        elif gpu.running is None and gpu.queue:
            self._on_demand(gpu, gpu.queue[0].model)
        if gpu.running is None and gpu.queue and gpu.queue[0].model in gpu.resident:
            req = gpu.queue.popleft()
            end = self.now_s + self.models[req.model].infer_s
            gpu.running = (req, end)
            gpu.resident[req.model] = self.now_s
            self._push(end, "done", gpu.index, 0)

    def _on_demand(self, gpu: _Gpu, m: int) -> None:
        """LRU and static: load the head's model when the GPU is free for it."""
        if m in gpu.resident or m in gpu.loading:
            return
        need = self.models[m].nbytes
        if self.policy == "static" and m not in gpu.pinned_models:
            for other in [o for o in gpu.resident if o not in gpu.pinned_models]:
                self._evict(gpu, other)  # the single reload slot
        else:
            for other in sorted(gpu.resident, key=lambda o: (gpu.resident[o], o)):
                if self._used(gpu) + need <= self.cfg.capacity_bytes:
                    break
                self._evict(gpu, other)
        self._load(gpu, m)

    def _used(self, gpu: _Gpu) -> int:
        return sum(self.models[m].nbytes for m in (*gpu.resident, *gpu.loading))

    def _reconcile(self, gpu: _Gpu) -> None:
        actions = reconcile_once(self.now_s, self._snapshot(gpu), slack_s=self.cfg.slack_s)
        for e in actions.evict:
            self._evict(gpu, int(e.item))
        for p in actions.prefetch:
            self._load(gpu, int(p.item))
        for r in actions.rejected:
            gpu.queue = deque(q for q in gpu.queue if q.id != r.request)
            self.rejected += 1

    def _snapshot(self, gpu: _Gpu) -> MemoryState:
        """The policy's view of one GPU: in-flight copies pinned like running requests."""
        now = self.now_s
        resident = [Resident(str(m), self.models[m].nbytes, t) for m, t in gpu.resident.items()]
        resident += [Resident(str(m), self.models[m].nbytes, now) for m in gpu.loading]
        running = [RunningRequest(f"load:{m}", (str(m),)) for m in gpu.loading]
        t = now
        if gpu.running is not None:
            running.append(RunningRequest(gpu.running[0].id, (str(gpu.running[0].model),)))
            t = gpu.running[1]
        queue = []
        for req in gpu.queue:
            model = self.models[req.model]
            start = max(t, now)
            queue.append(
                QueuedRequest(req.id, model.name, (ItemRef(str(req.model), model.nbytes),), start)
            )
            if req.model in gpu.loading:
                start = max(start, gpu.loading[req.model])
            elif req.model not in gpu.resident:
                start += model.nbytes / self.cfg.h2d_bps
            t = start + model.infer_s
        device = DeviceState(
            f"sim:{gpu.index}",
            self.cfg.capacity_bytes,
            self.cfg.h2d_bps,
            tuple(resident),
            tuple(running),
            tuple(queue),
        )
        return MemoryState((device,))


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def run_all(seed: int, requests: int, cfg: TraceConfig | None = None) -> list[Result]:
    """Every policy over the same trace (same seed), queue-aware first."""
    cfg = cfg or TraceConfig()
    models, arrivals = make_trace(seed, requests, cfg)
    return [Simulation(p, models, arrivals, cfg).run() for p in POLICIES]


def main(argv: list[str] | None = None) -> int:
    """Run the three policies on one trace and print (and optionally save) the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--rate", type=float, default=DEFAULT_RATE_PER_S)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    cfg = TraceConfig(rate_per_s=args.rate)
    models, _ = make_trace(args.seed, args.requests, cfg)
    results = run_all(args.seed, args.requests, cfg)
    machine = {
        "cpu": harness.cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "device": f"{cfg.gpus} simulated GPUs x {cfg.capacity_bytes / GB:.0f} GB",
    }
    print(f"machine : {machine['cpu']}, {machine['cores']} cores, Python {machine['python']}")
    print(f"device  : {machine['device']}, host->GPU {cfg.h2d_bps / GB:.1f} GB/s each ({LABEL})")
    total = sum(m.nbytes for m in models)
    print(
        f"trace   : {args.requests} requests, seed {args.seed}, {cfg.rate_per_s} req/s mean "
        f"(MMPP, bursts x{cfg.burst_factor}), Zipf s={cfg.zipf_s}; "
        f"{len(models)} models, {total / GB:.1f} GB of weights"
    )
    for m in sorted(models, key=lambda m: -m.weight):
        print(
            f"  {m.name}: {m.nbytes / GB:5.1f} GB, {m.infer_s * 1000:.0f} ms/request "
            f"({LABEL}), share {m.weight / sum(x.weight for x in models):5.1%}, home sim:{m.home}"
        )
    base = results[0]
    print(
        f"\n{'policy':<12} {'p50 s':>8} {'p99 s':>8} {'mean s':>8} {'GB swapped':>11} "
        f"{'loads':>6} {'p50/(a)':>8} {'p99/(a)':>8} {'swap/(a)':>9}  ({LABEL})"
    )
    for r in results:
        print(
            f"{r.policy:<12} {r.p50_s:8.3f} {r.p99_s:8.3f} {r.mean_s:8.3f} "
            f"{r.bytes_swapped / GB:11.1f} {r.loads:6d} {_ratio(r.p50_s, base.p50_s):>8} "
            f"{_ratio(r.p99_s, base.p99_s):>8} {_ratio(r.bytes_swapped, base.bytes_swapped):>9}"
            f"  ({LABEL}; {r.completed} done, {r.rejected} rejected, makespan {r.makespan_s:.0f} s)"
        )
    if args.json is not None:
        doc: dict[str, Any] = {
            "label": LABEL,
            "machine": machine,
            "seed": args.seed,
            "requests": args.requests,
            "config": asdict(cfg),
            "models": [asdict(m) for m in models],
            "results": [asdict(r) for r in results],
        }
        args.json.write_text(json.dumps(doc, indent=2))
        print(f"wrote {args.json}")
    return 0


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base > 0 else "n/a"


if __name__ == "__main__":
    sys.exit(main())
