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

With ``--tube-gb X`` (X > 0) the same policies run a second time, on the same trace, with
one input tube per request as a second item: an intermediate tensor a previous workflow
step left on the request's home GPU, uniform 0.5X..1.5X GB (drawn from its own RNG, so
the trace itself does not change). A tube is produced on the GPU at arrival when there is
room, else written to the host (no copy) and loaded before the request runs; a request
runs once its model and its tube are resident, and its tube is freed when it finishes.
Unlike weights, evicting a tube that has no host copy yet costs a GPU->host copy (a swap
out) on the GPU's link, in line with its loads. The queue-aware policy gives each queued
request the items (model, tube); LRU evicts models and tubes alike; static keeps its model
partition and fits tubes in the room left, evicting other tubes first (least recently used),
then the reload slot's model, and only as a last resort a reserved model the head does not need.

Run:  .venv/bin/python bench/memory_trace.py [--seed 1] [--requests 4000] [--tube-gb 0]
      [--json out.json]
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
from dataclasses import asdict, dataclass, field, replace
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
    """One request of the trace; ``tube_bytes`` is its input tube (0: none)."""

    id: str
    t_s: float
    model: int
    tube_bytes: int = 0


@dataclass(frozen=True, slots=True)
class Result:
    """One policy's figures over the trace (all times simulated)."""

    policy: str
    completed: int
    rejected: int
    p50_s: float
    p99_s: float
    mean_s: float
    bytes_swapped: int  # host->GPU bytes loaded (models and tubes)
    bytes_swapped_out: int  # GPU->host bytes: tubes evicted without a host copy
    bytes_evicted: int
    loads: int
    makespan_s: float
    tubes_to_host: int = 0  # tubes written to the host at arrival: no room on the GPU


def make_trace(
    seed: int, requests: int, cfg: TraceConfig, tube_gb: float = 0.0
) -> tuple[list[Model], list[Arrival]]:
    """Models with random sizes and Zipf weights, and an MMPP arrival trace.

    Tubes come from a second RNG (``seed + 1``) after the trace is drawn, so ``tube_gb``
    changes neither the models nor the arrivals, only the tube each request carries.
    """
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
    if tube_gb > 0:
        tube_rng = random.Random(seed + 1)
        arrivals = [
            replace(a, tube_bytes=int(tube_gb * GB * tube_rng.uniform(0.5, 1.5))) for a in arrivals
        ]
    return models, arrivals


@dataclass(slots=True)
class _Gpu:
    index: int
    resident: dict[int, float] = field(default_factory=dict)  # landed item -> last use
    loading: dict[int, float] = field(default_factory=dict)  # item -> when its copy lands
    draining: dict[int, float] = field(default_factory=dict)  # tube -> when its swap-out ends
    queue: deque[Arrival] = field(default_factory=deque)
    running: tuple[Arrival, float] | None = None  # request and its end time
    link_free_s: float = 0.0
    pinned_models: frozenset[int] = frozenset()  # static policy only


class Simulation:
    """One policy over one trace: events in time order, one step per GPU after each.

    Items are ints: model ``m`` is ``m``, the tube of arrival ``i`` is ``len(models) + i``;
    the policy sees them as ``"m"`` and ``"t<i>"``.
    """

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
        self.swapped_out = 0
        self.evicted = 0
        self.loads = 0
        self.tubes_to_host = 0
        self.now_s = 0.0
        self.item_bytes = [m.nbytes for m in models] + [a.tube_bytes for a in arrivals]
        self.index = {a.id: i for i, a in enumerate(arrivals)}
        self.on_host: set[int] = set()  # tubes with a host copy: evicting them is free
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

    def _tube(self, req: Arrival) -> int | None:
        return len(self.models) + self.index[req.id] if req.tube_bytes > 0 else None

    def _items(self, req: Arrival) -> tuple[int, ...]:
        """What ``req`` needs resident to run: its model, then its tube if it has one."""
        tube = self._tube(req)
        return (req.model,) if tube is None else (req.model, tube)

    def _pid(self, item: int) -> str:
        n = len(self.models)
        return str(item) if item < n else f"t{item - n}"

    def _item(self, pid: str) -> int:
        return len(self.models) + int(pid[1:]) if pid.startswith("t") else int(pid)

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
                self._produce_tube(gpu, self.arrivals[arg])
            elif kind == "landed":
                del gpu.loading[arg]
                gpu.resident[arg] = t_s
            else:  # "done"
                assert gpu.running is not None
                req, _ = gpu.running
                gpu.running = None
                gpu.resident[req.model] = t_s
                self._free_tube(gpu, req)
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
            bytes_swapped_out=self.swapped_out,
            bytes_evicted=self.evicted,
            loads=self.loads,
            makespan_s=self.now_s,
            tubes_to_host=self.tubes_to_host,
        )

    def _produce_tube(self, gpu: _Gpu, req: Arrival) -> None:
        """The previous step leaves the tube on the GPU if it fits there, else on the host.

        Room counts tubes still being copied out: their bytes leave the GPU only then.
        """
        tube = self._tube(req)
        if tube is None:
            return
        gpu.draining = {i: t for i, t in gpu.draining.items() if t > self.now_s}
        draining = sum(self.item_bytes[i] for i in gpu.draining)
        if self._used(gpu) + draining + self.item_bytes[tube] <= self.cfg.capacity_bytes:
            gpu.resident[tube] = self.now_s
        else:
            self.on_host.add(tube)
            self.tubes_to_host += 1

    def _free_tube(self, gpu: _Gpu, req: Arrival) -> None:
        """A finished or rejected request's tube is dropped: no copy, wherever it is."""
        tube = self._tube(req)
        if tube is not None:
            assert tube not in gpu.loading
            gpu.resident.pop(tube, None)
            self.on_host.discard(tube)

    def _load(self, gpu: _Gpu, item: int) -> None:
        start = max(self.now_s, gpu.link_free_s)
        gpu.link_free_s = start + self.item_bytes[item] / self.cfg.h2d_bps
        gpu.loading[item] = gpu.link_free_s
        self.swapped += self.item_bytes[item]
        self.loads += 1
        self._push(gpu.link_free_s, "landed", gpu.index, item)

    def _evict(self, gpu: _Gpu, item: int) -> None:
        """Weights, and tubes with a host copy, just go; other tubes are copied out first."""
        del gpu.resident[item]
        nbytes = self.item_bytes[item]
        self.evicted += nbytes
        if item >= len(self.models) and item not in self.on_host:
            start = max(self.now_s, gpu.link_free_s)
            gpu.link_free_s = start + nbytes / self.cfg.h2d_bps  # same link, one copy at a time
            gpu.draining[item] = gpu.link_free_s
            self.on_host.add(item)
            self.swapped_out += nbytes

    def _ready(self, gpu: _Gpu, req: Arrival) -> bool:
        return all(i in gpu.resident for i in self._items(req))

    def _step(self, gpu: _Gpu) -> None:
        if self.policy == "queue-aware":
            self._reconcile(gpu)
        elif gpu.running is None and gpu.queue:
            self._on_demand(gpu, gpu.queue[0])
        if gpu.running is None and gpu.queue and self._ready(gpu, gpu.queue[0]):
            req = gpu.queue.popleft()
            end = self.now_s + self.models[req.model].infer_s
            gpu.running = (req, end)
            for item in self._items(req):
                gpu.resident[item] = self.now_s
            self._push(end, "done", gpu.index, 0)

    def _on_demand(self, gpu: _Gpu, req: Arrival) -> None:
        """LRU and static: load what the head request lacks when the GPU is free for it."""
        keep = self._items(req)
        for item in keep:
            if item not in gpu.resident and item not in gpu.loading:
                self._make_room(gpu, item, keep)
                self._load(gpu, item)

    def _make_room(self, gpu: _Gpu, item: int, keep: tuple[int, ...]) -> None:
        """Evict until ``item`` fits, never an item in ``keep`` (the head request's).

        LRU: least recently used first, models and tubes alike. Static: a model outside the
        reservation empties the reload slot first; then other tubes go (least recently used),
        then the slot's model, and last a reserved model (only when a tube leaves no room).
        """
        n = len(self.models)
        victims = [o for o in gpu.resident if o not in keep]
        if self.policy == "static":
            pinned = gpu.pinned_models
            if item < n and item not in pinned:
                for other in [o for o in victims if o < n and o not in pinned]:
                    self._evict(gpu, other)  # the single reload slot
            victims = sorted(
                (o for o in gpu.resident if o not in keep),
                key=lambda o: (o < n, o in pinned, gpu.resident[o], o),
            )
        else:
            victims.sort(key=lambda o: (gpu.resident[o], o))
        need = self.item_bytes[item]
        for other in victims:
            if self._used(gpu) + need <= self.cfg.capacity_bytes:
                break
            self._evict(gpu, other)

    def _used(self, gpu: _Gpu) -> int:
        return sum(self.item_bytes[i] for i in (*gpu.resident, *gpu.loading))

    def _reconcile(self, gpu: _Gpu) -> None:
        actions = reconcile_once(self.now_s, self._snapshot(gpu), slack_s=self.cfg.slack_s)
        for e in actions.evict:
            self._evict(gpu, self._item(e.item))
        for p in actions.prefetch:
            self._load(gpu, self._item(p.item))
        for r in actions.rejected:
            for q in [q for q in gpu.queue if q.id == r.request]:
                self._free_tube(gpu, q)
            gpu.queue = deque(q for q in gpu.queue if q.id != r.request)
            self.rejected += 1

    def _swap_bytes(self, item: int) -> int:
        """What evicting ``item`` copies to the host: a tube's bytes until it has a host copy."""
        if item < len(self.models) or item in self.on_host:
            return 0
        return self.item_bytes[item]

    def _snapshot(self, gpu: _Gpu) -> MemoryState:
        """The policy's view of one GPU: in-flight copies pinned like running requests.

        Tubes being copied out are left out: the room they free is what the loads queued
        behind them on the same link will fill.
        """
        now = self.now_s
        nbytes = self.item_bytes
        resident = [
            Resident(self._pid(i), nbytes[i], t, self._swap_bytes(i))
            for i, t in gpu.resident.items()
        ]
        resident += [Resident(self._pid(i), nbytes[i], now) for i in gpu.loading]
        running = [RunningRequest(f"load:{self._pid(i)}", (self._pid(i),)) for i in gpu.loading]
        t = now
        if gpu.running is not None:
            req = gpu.running[0]
            running.append(RunningRequest(req.id, tuple(self._pid(i) for i in self._items(req))))
            t = gpu.running[1]
        queue = []
        for req in gpu.queue:
            model = self.models[req.model]
            items = self._items(req)
            start = max(t, now)
            refs = tuple(ItemRef(self._pid(i), nbytes[i]) for i in items)
            queue.append(QueuedRequest(req.id, model.name, refs, start))
            for i in items:  # copies queue on one link: each missing item adds its copy time
                if i in gpu.loading:
                    start = max(start, gpu.loading[i])
                elif i not in gpu.resident:
                    start += nbytes[i] / self.cfg.h2d_bps
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


def run_all(
    seed: int, requests: int, cfg: TraceConfig | None = None, tube_gb: float = 0.0
) -> list[Result]:
    """Every policy over the same trace (same seed), queue-aware first."""
    cfg = cfg or TraceConfig()
    models, arrivals = make_trace(seed, requests, cfg, tube_gb)
    return [Simulation(p, models, arrivals, cfg).run() for p in POLICIES]


def main(argv: list[str] | None = None) -> int:
    """Run the three policies on one trace and print (and optionally save) the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--rate", type=float, default=DEFAULT_RATE_PER_S)
    parser.add_argument(
        "--tube-gb",
        type=float,
        default=0.0,
        help="also run with one input tube per request, uniform 0.5x..1.5x this many GB",
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    cfg = TraceConfig(rate_per_s=args.rate)
    models, _ = make_trace(args.seed, args.requests, cfg)
    results = run_all(args.seed, args.requests, cfg)
    tube_results = run_all(args.seed, args.requests, cfg, args.tube_gb) if args.tube_gb > 0 else []
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
    print(f"\nmodels only: weights are the only items ({LABEL})")
    _table(results, tubes=False)
    if tube_results:
        print(
            f"\nwith input tubes: one per request, {0.5 * args.tube_gb:g}-{1.5 * args.tube_gb:g} GB "
            f"(mean {args.tube_gb:g} GB), same trace; evicting a tube without a host copy swaps "
            f"it out GPU->host on the link ({LABEL})"
        )
        _table(tube_results, tubes=True)
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
        if tube_results:
            doc["tube_gb"] = args.tube_gb
            doc["tube_results"] = [asdict(r) for r in tube_results]
        args.json.write_text(json.dumps(doc, indent=2))
        print(f"wrote {args.json}")
    return 0


def _table(results: list[Result], *, tubes: bool) -> None:
    """One row per policy; with tubes, GPU->host bytes and tubes sent to the host too."""
    base = results[0]
    out = f" {'GB out':>8}" if tubes else ""
    print(
        f"{'policy':<12} {'p50 s':>8} {'p99 s':>8} {'mean s':>8} {'GB loaded':>10}{out} "
        f"{'loads':>6} {'p50/(a)':>8} {'p99/(a)':>8} {'load/(a)':>9}  ({LABEL})"
    )
    for r in results:
        out = f" {r.bytes_swapped_out / GB:8.1f}" if tubes else ""
        note = f", {r.tubes_to_host} tubes to host at arrival" if tubes else ""
        print(
            f"{r.policy:<12} {r.p50_s:8.3f} {r.p99_s:8.3f} {r.mean_s:8.3f} "
            f"{r.bytes_swapped / GB:10.1f}{out} {r.loads:6d} {_ratio(r.p50_s, base.p50_s):>8} "
            f"{_ratio(r.p99_s, base.p99_s):>8} {_ratio(r.bytes_swapped, base.bytes_swapped):>9}"
            f"  ({LABEL}; {r.completed} done, {r.rejected} rejected, makespan {r.makespan_s:.0f} s"
            f"{note})"
        )


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base > 0 else "n/a"


if __name__ == "__main__":
    sys.exit(main())
