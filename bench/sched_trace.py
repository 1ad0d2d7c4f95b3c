"""Locality-aware scheduling vs load balancing only: a trace-driven simulation over GPUs.

A cluster of simulated 8-GPU nodes (2 nodes of the ``dgx1-v100`` topology by default:
8 x 32 GiB V100s, 12.5 GB/s PCIe 3.0 host links, capacities and links read with
``gpufaas.shared.devices``) serves 12 models of 0.4-6 GiB; a GPU holds about all of
them, so models compete for a GPU's room only with several instances. The trace has the shape of the Azure Functions trace (Shahrad et al., "Serverless
in the Wild", USENIX ATC 2020; see reference/workloads.md): Zipf popularity over models,
bursty arrivals per model (a two-state MMPP) and a diurnal rate curve compressed into the
run (one "day" = the simulated duration).

Every GPU works the same way under every policy: per-model queues, dynamic batching up
to the model's batch size chosen by Decreased Throughput Selection
(``gpufaas.scheduler.profiles.choose_config``) from its latency profile, one batch at a
time, the ready batch with the least deadline slack first; models stay resident, the
least recently used is evicted when a new one needs room, and an idle model is unloaded
after the keep-alive. A load (cold start) costs a fixed runtime init plus weights over the
GPU's host->GPU link, one load at a time per GPU ("bytes loaded" counts those weights;
a batch's working memory is allocated, not copied). Only routing and placement differ:

  (a) gpufaas: a GPU with a warm instance of the model and room in its queue, else the
      (node, GPU) ``gpufaas.scheduler.placement.choose`` picks over views built as the
      scheduler's placer builds them (one per GPU of each node: warm, the model in that
      GPU's cache, θ of the node, instances on the GPU and on the node, the free bytes the
      node's heartbeat reports, ``placer.node_gpus``);
      ``gpufaas.scheduler.autoscale.Autoscaler`` adds instances when it wants more than
      the model has and retires the newest when it wants fewer,
  (b) round-robin: requests go to the GPUs in turn,
  (c) least-loaded: to the GPU with the fewest outstanding requests, ties in turn.

Anchors (GPU-enabled FaaS: Zhao, Jha, Hong, IPDPS 2023): locality-aware scheduling with
a GPU model cache is reported up to 48x better than load-balancing-only scheduling on
real-world traces, and locality-aware load balancing cut latency by 79%. Every time and
byte count here is **SIMULATED**, not measured.

Run:  .venv/bin/python bench/sched_trace.py [--quick] [--seed 1] [--markdown [PATH]]
"""

from __future__ import annotations

import argparse
import heapq
import math
import os
import platform
import random
import sys
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

import msgspec

from gpufaas.scheduler.autoscale import Autoscaler, FunctionLoad
from gpufaas.scheduler.placement import NodeView, choose
from gpufaas.scheduler.placer import NodeGpus, node_gpus
from gpufaas.scheduler.profiles import Choice, ProfilePoint, batch_sizes, choose_config
from gpufaas.shared.devices import DEFAULT_TOPOLOGY, NodeDevices, links_between_gpus, parse_devices
from gpufaas.shared.errors import InvalidArgument
from gpufaas.shared.identity import gpu_number
from gpufaas.shared.messages import Heartbeat

GIB: Final = 2**30
MIB: Final = 2**20
GB: Final = 1e9
LABEL: Final = "SIMULATED"
PolicyName = Literal["gpufaas", "round-robin", "least-loaded"]
POLICIES: Final[tuple[PolicyName, ...]] = ("gpufaas", "round-robin", "least-loaded")

# name (backbone/task), weights in GiB, latency profile l(b) = a + c*b in ms. Sizes are the
# usual checkpoints' (fp32 for the encoders, fp16 for the decoders); several share a
# backbone (variant sharing of their tensors is ignored here: each is loaded whole).
CATALOG: Final[tuple[tuple[str, float, float, float], ...]] = (
    ("bert-base/sst2", 0.41, 3.0, 0.5),
    ("bert-base/ner", 0.41, 3.0, 0.5),
    ("vit-large/in1k", 1.13, 7.0, 1.6),
    ("bert-large/squad", 1.25, 6.0, 1.2),
    ("bert-large/mnli", 1.25, 6.0, 1.2),
    ("clip-vit-l14/embed", 1.59, 8.0, 1.8),
    ("llama-3.2-1b/score", 2.30, 12.0, 2.5),
    ("whisper-large-v3/en", 2.88, 30.0, 8.0),
    ("opt-2.7b/score", 5.00, 20.0, 4.0),
    ("phi-2/score", 5.18, 22.0, 4.5),
    ("qwen2.5-3b/score", 5.75, 24.0, 5.0),
    ("llama-3.2-3b/score", 5.98, 25.0, 5.0),
)

# Event kinds, in the order they are handled at equal times.
LANDED: Final = 0
DONE: Final = 1
TICK: Final = 2


@dataclass(frozen=True, slots=True)
class SimConfig:
    """The simulated cluster and trace; every field is a command-line flag."""

    nodes: int = 2
    topology: str = DEFAULT_TOPOLOGY  # each node is ``sim:gpus_per_node`` of it
    gpus_per_node: int = 8
    # The topology's (``parse_args`` reads them from it): dgx1-v100 has 32 GiB V100s and
    # 12.5 GB/s PCIe 3.0 host links (reference/hardware.md: ~12-13 GB/s measured pinned).
    gpu_gib: float = 32.0
    h2d_gbps: float = 12.5
    init_s: float = 0.25  # runtime and model object set-up, before the weights' copy
    keep_alive_s: float = 60.0
    max_batch: int = 32  # the functions' options.max_batch_size, DTS chooses below it
    slo_factor: float = 5.0  # SLO = slo_factor x l(1) + slo_extra_ms
    slo_extra_ms: float = 200.0
    duration_s: float = 3600.0  # one compressed "day"
    rate_rps: float = 40.0  # mean arrivals over the whole cluster
    zipf_s: float = 1.6
    burst_factor: float = 16.0  # MMPP: rate in a burst / rate when calm
    burst_dwell_s: float = 15.0
    calm_dwell_s: float = 45.0
    diurnal_low: float = 0.2  # the night's rate as a share of the mean (the peak is 2 - it)
    tick_s: float = 1.0  # how often keep-alive and the autoscaler run
    room_batches: int = 2  # gpufaas: an instance has room while its queue < this x batch
    seed: int = 1

    @property
    def gpus(self) -> int:
        """GPUs in the cluster."""
        return self.nodes * self.gpus_per_node

    @property
    def gpu_bytes(self) -> int:
        """Memory of one GPU."""
        return int(self.gpu_gib * GIB)


@dataclass(frozen=True, slots=True)
class SimNode:
    """One simulated node: its name and devices (``sim:N`` of the topology), which it
    reports in its worker pool's heartbeat."""

    name: str
    devices: NodeDevices

    @property
    def gpu_names(self) -> list[str]:
        """Its GPUs, ``gpu:0`` first."""
        return sorted((d.name for d in self.devices.devices if d.kind != "host"), key=gpu_number)

    def gpus(self, used: Mapping[str, int]) -> NodeGpus:
        """Its GPUs as the scheduler's placer reads them from the heartbeats
        (``placer.node_gpus``: free bytes each, NVLinks between them), ``used`` bytes on each."""
        beat = Heartbeat(
            node=self.name,
            service="worker",
            pid=0,
            started_at=0.0,
            updated_at=0.0,
            devices=[
                msgspec.structs.replace(d, used_bytes=used.get(d.name, 0))
                for d in self.devices.devices
            ],
            links=links_between_gpus(self.devices),
        )
        return node_gpus([beat])


def sim_nodes(nodes: int, gpus_per_node: int, topology: str, gpu_bytes: int) -> list[SimNode]:
    """``node-0`` .. of ``sim:gpus_per_node`` of ``topology``, each GPU of ``gpu_bytes``."""
    out = []
    for k in range(nodes):
        devs = parse_devices(f"sim:{gpus_per_node}", topology)
        gpus = [
            msgspec.structs.replace(d, memory_bytes=gpu_bytes) if d.kind != "host" else d
            for d in devs.devices
        ]
        out.append(SimNode(f"node-{k}", NodeDevices(devs.backend, gpus, devs.topology)))
    return out


def topology_defaults(topology: str) -> tuple[float, float]:
    """GiB of the topology's first GPU and GB/s of its host link."""
    devs = parse_devices("sim:1", topology)
    gpu = next(d for d in devs.devices if d.kind != "host")
    link = devs.topology.link("host", gpu.name) if devs.topology else None
    return gpu.memory_bytes / GIB, link.gbps if link else SimConfig().h2d_gbps


@dataclass(frozen=True, slots=True)
class Model:
    """One model: its weights, latency profile, SLO, DTS choice and share of the trace."""

    index: int
    name: str
    weight_bytes: int
    a_ms: float
    c_ms: float
    slo_s: float
    choice: Choice
    share: float

    def latency_s(self, batch: int) -> float:
        """Time to run one batch of ``batch`` requests."""
        return (self.a_ms + self.c_ms * batch) / 1e3

    @property
    def footprint(self) -> int:
        """GPU bytes an instance holds: weights and the chosen batch's working memory."""
        return self.weight_bytes + self.choice.memory_bytes


@dataclass(frozen=True, slots=True)
class Result:
    """One policy's figures over the trace (all simulated)."""

    policy: str
    completed: int
    loads: int
    bytes_loaded: int
    p50_s: float
    p99_s: float
    mean_s: float
    slo_met: float  # share of requests within their model's SLO
    cold_requests: int  # requests that found their model not ready on their GPU
    batches: int
    instances_added: int  # gpufaas: scale-outs the autoscaler asked for
    spread: dict[str, list[int]]  # node -> instances placed (loads) on each of its GPUs


def profile(weight_gib: float, a_ms: float, c_ms: float, max_batch: int) -> list[ProfilePoint]:
    """A synthetic profile: l(b) = a + c*b; working memory = workspace + activations per item.

    The simulated GPU runs one batch at a time, so the sweep is over batch sizes at
    concurrency 1.
    """
    workspace = 64 * MIB + int(0.02 * weight_gib * GIB)
    per_item = int((1 + 2 * weight_gib) * MIB)
    return [
        ProfilePoint(b, 1, (a_ms + c_ms * b) / 1e3, workspace + b * per_item)
        for b in batch_sizes(max_batch)
    ]


def make_models(cfg: SimConfig, rng: random.Random) -> list[Model]:
    """The catalogue with DTS choices, SLOs and Zipf shares (popularity independent of size)."""
    ranks = list(range(len(CATALOG)))
    rng.shuffle(ranks)
    weights = [1.0 / (r + 1) ** cfg.zipf_s for r in ranks]
    total = sum(weights)
    models = []
    for i, (name, gib, a_ms, c_ms) in enumerate(CATALOG):
        slo_s = (cfg.slo_factor * (a_ms + c_ms) + cfg.slo_extra_ms) / 1e3
        choice = choose_config(
            profile(gib, a_ms, c_ms, cfg.max_batch),
            slo_s,
            max_batch=cfg.max_batch,
            weights_bytes=int(gib * GIB),
        )
        models.append(Model(i, name, int(gib * GIB), a_ms, c_ms, slo_s, choice, weights[i] / total))
    return models


def diurnal(cfg: SimConfig, t: float) -> float:
    """The day's rate multiplier at ``t``: mean 1, lowest at the start ("night")."""
    return 1.0 - (1.0 - cfg.diurnal_low) * math.cos(2 * math.pi * t / cfg.duration_s)


def make_trace(
    cfg: SimConfig, models: Sequence[Model], rng: random.Random
) -> list[tuple[float, int]]:
    """(time, model) arrivals: per model an MMPP modulated by the diurnal curve, by thinning."""
    on_share = cfg.burst_dwell_s / (cfg.burst_dwell_s + cfg.calm_dwell_s)
    calm = 1.0 / (on_share * cfg.burst_factor + (1 - on_share))  # so the MMPP's mean is 1
    peak = 2.0 - cfg.diurnal_low
    arrivals: list[tuple[float, int]] = []
    for m in models:
        base = cfg.rate_rps * m.share
        t = 0.0
        bursting = rng.random() < on_share
        while t < cfg.duration_s:
            dwell = cfg.burst_dwell_s if bursting else cfg.calm_dwell_s
            end = min(cfg.duration_s, t + rng.expovariate(1.0 / dwell))
            top = base * calm * (cfg.burst_factor if bursting else 1.0) * peak
            while True:
                t += rng.expovariate(top)
                if t >= end:
                    break
                if rng.random() * peak < diurnal(cfg, t):
                    arrivals.append((t, m.index))
            t = end
            bursting = not bursting
    arrivals.sort()
    return arrivals


@dataclass(slots=True)
class _Slot:
    """A model resident (or landing) on a GPU."""

    loading: bool
    last_used: float
    fresh: bool = True  # landing or landed and no batch run yet: never a victim


@dataclass(slots=True)
class _Gpu:
    index: int
    node: str
    name: str  # "gpu:N" of its node
    capacity: int
    slots: dict[int, _Slot] = field(default_factory=dict)
    queues: dict[int, deque[int]] = field(default_factory=dict)  # model -> request ids
    used: int = 0
    outstanding: int = 0  # requests queued or running here
    running: int = -1  # the model whose batch runs, -1 when idle
    batch: list[int] = field(default_factory=list)
    link_free_s: float = 0.0
    draining: set[int] = field(default_factory=set)  # gpufaas: retire when idle
    loads: int = 0


class Simulation:
    """One policy over one trace: a heap of events, arrivals merged in from a sorted list."""

    def __init__(
        self,
        policy: PolicyName,
        cfg: SimConfig,
        models: Sequence[Model],
        arrivals: Sequence[tuple[float, int]],
    ) -> None:
        self.policy = policy
        self.cfg = cfg
        self.models = models
        self.arrivals = arrivals
        self.nodes = sim_nodes(cfg.nodes, cfg.gpus_per_node, cfg.topology, cfg.gpu_bytes)
        where = [(node.name, name) for node in self.nodes for name in node.gpu_names]
        self.gpus = [_Gpu(g, n, name, cfg.gpu_bytes) for g, (n, name) in enumerate(where)]
        self.at = {(gpu.node, gpu.name): gpu.index for gpu in self.gpus}
        for gpu in self.gpus:
            gpu.queues = {m.index: deque() for m in models}
        self.holders: list[list[int]] = [[] for _ in models]  # model -> GPUs, oldest first
        self.events: list[tuple[float, int, int, int, int]] = []  # t, kind, seq, gpu, model
        self.seq = 0
        self.now = 0.0
        self.latency = [0.0] * len(arrivals)
        self.done = 0
        self.loads = 0
        self.bytes_loaded = 0
        self.batches = 0
        self.cold_requests = 0
        self.instances_added = 0
        self.turn = 0
        self.scaler = Autoscaler(keep_alive_s=cfg.keep_alive_s, max_instances=cfg.gpus)
        self.bw = cfg.h2d_gbps * GB

    # --- the event loop -------------------------------------------------------------

    def run(self) -> Result:
        """Play the trace to the end, drain every queue, and summarise."""
        self._push(self.cfg.tick_s, TICK, -1, -1)
        i, n = 0, len(self.arrivals)
        while i < n or self.events:
            if i < n and (not self.events or self.arrivals[i][0] <= self.events[0][0]):
                self.now, model = self.arrivals[i]
                self._arrive(i, model)
                i += 1
                continue
            t, kind, _, g, m = heapq.heappop(self.events)
            self.now = t
            if kind == TICK:
                self._tick()
                if i < n or any(gpu.outstanding for gpu in self.gpus):
                    if t > self.cfg.duration_s + 3600.0:
                        raise RuntimeError(
                            f"{self.policy}: queues did not drain an hour after the trace"
                        )
                    self._push(t + self.cfg.tick_s, TICK, -1, -1)
                continue
            gpu = self.gpus[g]
            if kind == LANDED:
                gpu.slots[m].loading = False
                gpu.slots[m].last_used = t
                if not gpu.queues[m]:
                    gpu.slots[m].fresh = False  # a prefetch: evictable like any idle model
            else:
                self._finish(gpu)
            self._step(gpu)
        lat = sorted(self.latency)
        met = sum(
            1 for k, (_, m) in enumerate(self.arrivals) if self.latency[k] <= self.models[m].slo_s
        )
        return Result(
            policy=self.policy,
            completed=self.done,
            loads=self.loads,
            bytes_loaded=self.bytes_loaded,
            p50_s=percentile(lat, 50),
            p99_s=percentile(lat, 99),
            mean_s=sum(lat) / len(lat) if lat else 0.0,
            slo_met=met / len(lat) if lat else 0.0,
            cold_requests=self.cold_requests,
            batches=self.batches,
            instances_added=self.instances_added,
            spread={
                node.name: [gpu.loads for gpu in self.gpus if gpu.node == node.name]
                for node in self.nodes
            },
        )

    def _push(self, t: float, kind: int, gpu: int, model: int) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, kind, self.seq, gpu, model))

    def _arrive(self, req: int, m: int) -> None:
        if self.policy == "gpufaas":
            self.scaler.observe(self.models[m].name, self.now)
            g = self._route_local(m)
        elif self.policy == "round-robin":
            g = self.turn
            self.turn = (self.turn + 1) % len(self.gpus)
        else:
            g = self._least_loaded()
        gpu = self.gpus[g]
        slot = gpu.slots.get(m)
        if slot is None or slot.loading:
            self.cold_requests += 1
        gpu.queues[m].append(req)
        gpu.outstanding += 1
        self._step(gpu)

    def _finish(self, gpu: _Gpu) -> None:
        m = gpu.running
        for req in gpu.batch:
            self.latency[req] = self.now - self.arrivals[req][0]
        self.done += len(gpu.batch)
        gpu.outstanding -= len(gpu.batch)
        gpu.batch = []
        gpu.running = -1
        gpu.slots[m].last_used = self.now
        if m in gpu.draining and not gpu.queues[m]:
            self._unload(gpu, m)

    def _tick(self) -> None:
        for gpu in self.gpus:
            for m, slot in list(gpu.slots.items()):
                idle = not slot.loading and m != gpu.running and not gpu.queues[m]
                if idle and self.now - slot.last_used > self.cfg.keep_alive_s:
                    self._unload(gpu, m)
        if self.policy == "gpufaas":
            self._autoscale()
        for gpu in self.gpus:
            self._step(gpu)

    # --- one GPU: loads, eviction, batching (the same for every policy) ---------------

    def _step(self, gpu: _Gpu) -> None:
        if gpu.running < 0:
            self._run_batch(gpu)
        waiting = [m for m, q in gpu.queues.items() if q and m not in gpu.slots]
        if waiting:
            waiting.sort(key=lambda m: self.arrivals[gpu.queues[m][0]][0] + self.models[m].slo_s)
            for m in waiting:
                self._load(gpu, m)

    def _run_batch(self, gpu: _Gpu) -> None:
        best, best_slack, best_b = -1, math.inf, 0
        for m, q in gpu.queues.items():
            slot = gpu.slots.get(m)
            if not q or slot is None or slot.loading:
                continue
            model = self.models[m]
            b = min(len(q), model.choice.batch)
            slack = self.arrivals[q[0]][0] + model.slo_s - self.now - model.latency_s(b)
            if slack < best_slack:
                best, best_slack, best_b = m, slack, b
        if best < 0:
            return
        q = gpu.queues[best]
        gpu.batch = [q.popleft() for _ in range(best_b)]
        gpu.running = best
        gpu.slots[best].last_used = self.now
        gpu.slots[best].fresh = False
        self.batches += 1
        self._push(self.now + self.models[best].latency_s(best_b), DONE, gpu.index, best)

    def _load(self, gpu: _Gpu, m: int) -> bool:
        """Start loading ``m`` on ``gpu``, evicting least recently used models if need be."""
        need = self.models[m].footprint
        if gpu.capacity - gpu.used < need:
            victims = [k for k, s in gpu.slots.items() if not s.fresh and k != gpu.running]
            evictable = sum(self.models[k].footprint for k in victims)
            if gpu.capacity - gpu.used + evictable < need:
                return False  # wait for a running batch or a landing load to free room
            # Idle models first, then those with queued requests (they reload later).
            victims.sort(key=lambda k: (bool(gpu.queues[k]), gpu.slots[k].last_used))
            for k in victims:
                if gpu.capacity - gpu.used >= need:
                    break
                self._unload(gpu, k)
        start = max(self.now, gpu.link_free_s)
        ready = start + self.cfg.init_s + self.models[m].weight_bytes / self.bw
        gpu.link_free_s = ready
        gpu.slots[m] = _Slot(loading=True, last_used=self.now)
        gpu.used += need
        self.loads += 1
        gpu.loads += 1
        self.bytes_loaded += self.models[m].weight_bytes
        self.holders[m].append(gpu.index)
        self._push(ready, LANDED, gpu.index, m)
        return True

    def _unload(self, gpu: _Gpu, m: int) -> None:
        del gpu.slots[m]
        gpu.used -= self.models[m].footprint
        gpu.draining.discard(m)
        self.holders[m].remove(gpu.index)

    # --- routing ------------------------------------------------------------------------

    def _least_loaded(self) -> int:
        n = len(self.gpus)
        best = self.turn
        for k in range(1, n):
            g = (self.turn + k) % n
            if self.gpus[g].outstanding < self.gpus[best].outstanding:
                best = g
        self.turn = (self.turn + 1) % n
        return best

    def _instances(self, m: int) -> list[int]:
        return [g for g in self.holders[m] if m not in self.gpus[g].draining]

    def _route_local(self, m: int) -> int:
        """gpufaas: a warm instance with room, else a new one where placement says."""
        model = self.models[m]
        room = self.cfg.room_batches * model.choice.batch
        instances = self._instances(m)
        for g in instances:
            if len(self.gpus[g].queues[m]) < room:
                return g
        if not instances:
            return self._add_instance(m, (), scale_out=False)
        loads = [self._function_load(k) for k in range(len(self.models))]
        decision = self.scaler.decide(self.now, loads)[model.name]
        if decision.desired > len(instances) and len(instances) < len(self.gpus):
            return self._add_instance(m, instances, scale_out=True)
        return min(instances, key=lambda g: (len(self.gpus[g].queues[m]), g))

    def _place(self, m: int, exclude: Sequence[int]) -> int:
        """The (node, GPU) ``placement.choose`` picks for ``m`` among the GPUs not in
        ``exclude``, over views built as the placer builds them (``Placer._views``)."""
        views = []
        for node in self.nodes:
            gpus = [self.gpus[self.at[node.name, name]] for name in node.gpu_names]
            facts = node.gpus({gpu.name: gpu.used for gpu in gpus})
            # θ is the node's (its tensor store holds the model's tensors while one of its
            # GPUs has an instance); variant sharing ignored: all or none.
            resident = any(m in gpu.slots for gpu in gpus)
            node_functions = sum(len(gpu.slots) for gpu in gpus)
            views += [
                NodeView(
                    node=node.name,
                    warm=m in gpu.slots,
                    theta=1.0 if resident else 0.0,
                    bytes_to_load=0 if resident else self.models[m].weight_bytes,
                    functions=len(gpu.slots),  # instances on the GPU
                    free_bytes=facts.free.get(gpu.name),
                    on_gpu=m in gpu.slots,
                    gpu=gpu.name,
                    node_functions=node_functions,
                )
                for gpu in gpus
                if gpu.index not in exclude
            ]
        chosen = choose(views)
        return self.at[chosen.node, chosen.gpu or ""]

    def _add_instance(self, m: int, instances: Sequence[int], *, scale_out: bool) -> int:
        """A new instance of ``m`` where placement says (a first one, or a scale-out)."""
        g = self._place(m, instances)
        gpu = self.gpus[g]
        if m in gpu.draining:
            gpu.draining.discard(m)  # a retiring instance there: keep it instead
        elif m not in gpu.slots:
            self._load(gpu, m)  # may wait for room: then the queued request triggers it
        self.instances_added += scale_out
        return g

    def _function_load(self, m: int) -> FunctionLoad:
        model = self.models[m]
        queued = sum(len(gpu.queues[m]) for gpu in self.gpus)
        in_flight = sum(len(gpu.batch) for gpu in self.gpus if gpu.running == m)
        return FunctionLoad(
            function=model.name,
            instances=len(self._instances(m)),
            queued=queued,
            in_flight=in_flight,
            capacity=model.choice.batch,
            service_rps=model.choice.throughput_rps,
        )

    def _autoscale(self) -> None:
        loads = [self._function_load(m.index) for m in self.models]
        decisions = self.scaler.decide(self.now, loads)
        for m in self.models:
            d = decisions[m.name]
            instances = self._instances(m.index)
            if d.desired > d.current and len(instances) < len(self.gpus):
                self._add_instance(m.index, instances, scale_out=True)
            elif d.desired < d.current:
                retire = instances[d.desired :] if d.desired == 0 else instances[-1:]
                for g in retire:
                    gpu = self.gpus[g]
                    gpu.draining.add(m.index)
                    idle = not gpu.queues[m.index] and gpu.running != m.index
                    if idle and not gpu.slots[m.index].loading:
                        self._unload(gpu, m.index)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of already sorted values."""
    if not sorted_values:
        return float("nan")
    pos = (len(sorted_values) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


# --- the report ------------------------------------------------------------------------


def machine() -> str:
    """The CPU and Python running the simulation."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    u = platform.uname()
    return (
        f"{cpu}, {os.cpu_count()} cores, {u.system} {u.release}; "
        f"Python {platform.python_version()} ({platform.python_implementation()})"
    )


def _x(base: float, ours: float) -> str:
    """How many times ``base`` is ``ours`` (larger is better for gpufaas)."""
    if ours <= 0:
        return "inf" if base > 0 else "n/a"
    return f"{base / ours:.2f}x"


def report(
    cfg: SimConfig,
    models: Sequence[Model],
    n_requests: int,
    results: Sequence[Result],
    wall_s: float,
) -> list[str]:
    """The plain-text report, one string per line."""
    weights = sum(m.weight_bytes for m in models)
    node_mem = cfg.gpus_per_node * cfg.gpu_bytes
    lines = [
        f"ALL FIGURES ARE {LABEL} (discrete-event model of GPUs; nothing ran on a GPU)",
        f"machine : {machine()}",
        f"cluster : {cfg.nodes} nodes x {cfg.gpus_per_node} GPUs x {cfg.gpu_gib:g} GiB "
        f"({cfg.topology}, {LABEL}); host->GPU {cfg.h2d_gbps:g} GB/s per GPU, one load at a time; "
        f"cold start = {cfg.init_s:g} s init + weights / bandwidth; keep-alive {cfg.keep_alive_s:g} s",
        f"models  : {len(models)}, {weights / GIB:.1f} GiB of weights "
        f"(one node has {node_mem / GIB:.0f} GiB of GPU memory"
        f"{'' if weights > node_mem else '; WARNING: all fit on one node'}); "
        f"SLO = {cfg.slo_factor:g} x l(1) + {cfg.slo_extra_ms:g} ms; batch by DTS up to {cfg.max_batch}",
        f"trace   : {n_requests} requests over {cfg.duration_s:g} s (one compressed day, "
        f"rate x{cfg.diurnal_low:g}..x{2 - cfg.diurnal_low:g} of the mean {cfg.rate_rps:g} req/s), "
        f"Zipf s={cfg.zipf_s:g}, MMPP bursts x{cfg.burst_factor:g} "
        f"({cfg.burst_dwell_s:g} s bursts / {cfg.calm_dwell_s:g} s calm), seed {cfg.seed}",
        "",
        f"{'model':<20} {'GiB':>5} {'share':>6} {'l(b) ms':>12} {'batch':>5} "
        f"{'l(batch) ms':>11} {'req/s':>7} {'work MiB':>8} {'SLO ms':>7} {'cold s':>6}",
    ]
    for m in sorted(models, key=lambda m: -m.share):
        c = m.choice
        cold = cfg.init_s + m.weight_bytes / (cfg.h2d_gbps * GB)
        lines.append(
            f"{m.name:<20} {m.weight_bytes / GIB:5.2f} {m.share:6.1%} "
            f"{f'{m.a_ms:g}+{m.c_ms:g}b':>12} {c.batch:5d} {c.latency_s * 1e3:11.1f} "
            f"{c.throughput_rps:7.0f} {c.memory_bytes / MIB:8.0f} {m.slo_s * 1e3:7.0f} {cold:6.2f}"
        )
    lines += [
        "",
        f"{'policy':<13} {'cold starts':>11} {'cold reqs':>9} {'GiB loaded':>10} {'p50 ms':>8} "
        f"{'p99 ms':>8} {'mean ms':>8} {'SLO met':>8} {'batches':>8} {'scale-outs':>10}  ({LABEL})",
    ]
    for r in results:
        lines.append(
            f"{r.policy:<13} {r.loads:11d} {r.cold_requests:9d} {r.bytes_loaded / GIB:10.1f} "
            f"{r.p50_s * 1e3:8.1f} {r.p99_s * 1e3:8.1f} {r.mean_s * 1e3:8.1f} {r.slo_met:8.2%} "
            f"{r.batches:8d} {r.instances_added:10d}"
        )
    ours = results[0]
    lines += ["", f"gpufaas vs each baseline (baseline / gpufaas; {LABEL}):"]
    for base in results[1:]:
        lines.append(
            f"  vs {base.policy:<13} p99 {_x(base.p99_s, ours.p99_s):>8}  "
            f"p50 {_x(base.p50_s, ours.p50_s):>8}  cold starts {_x(base.loads, ours.loads):>8}  "
            f"SLO met {ours.slo_met:.2%} vs {base.slo_met:.2%} "
            f"({(ours.slo_met - base.slo_met) * 100:+.1f} points)"
        )
    lines += ["", f"instances placed (cold starts) per GPU, gpu:0 first, by node ({LABEL}):"]
    lines += [f"  {r.policy:<13} {spread(r)}" for r in results]
    lines.append(f"(simulation took {wall_s:.1f} s of wall time for all three policies)")
    return lines


def spread(r: Result) -> str:
    """``node-0 [5 3 ...] (8)  node-1 [...]``: loads per GPU and the node's total."""
    return "  ".join(f"{n} [{' '.join(map(str, c))}] ({sum(c)})" for n, c in r.spread.items())


def markdown(cfg: SimConfig, n_requests: int, results: Sequence[Result]) -> str:
    """The figures as markdown tables, labelled simulated."""
    ours = results[0]
    out = [
        f"**{LABEL}** ({machine()}): {cfg.nodes} nodes x {cfg.gpus_per_node} GPUs x "
        f"{cfg.gpu_gib:g} GiB ({cfg.topology}), host->GPU {cfg.h2d_gbps:g} GB/s, {n_requests} requests over "
        f"{cfg.duration_s:g} s, mean {cfg.rate_rps:g} req/s, Zipf s={cfg.zipf_s:g}, "
        f"MMPP x{cfg.burst_factor:g}, keep-alive {cfg.keep_alive_s:g} s, seed {cfg.seed}.",
        "",
        "| policy | cold starts | cold requests | GiB loaded | p50 ms | p99 ms | mean ms | SLO met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    out += [
        f"| {r.policy} | {r.loads} | {r.cold_requests} | {r.bytes_loaded / GIB:.1f} | "
        f"{r.p50_s * 1e3:.1f} | {r.p99_s * 1e3:.1f} | {r.mean_s * 1e3:.1f} | {r.slo_met:.2%} |"
        for r in results
    ]
    out += [
        "",
        "| gpufaas vs | p99 (base/ours) | p50 (base/ours) | cold starts (base/ours) | SLO met (ours vs base) |",
        "|---|---|---|---|---|",
    ]
    out += [
        f"| {b.policy} | {_x(b.p99_s, ours.p99_s)} | {_x(b.p50_s, ours.p50_s)} | "
        f"{_x(b.loads, ours.loads)} | {ours.slo_met:.2%} vs {b.slo_met:.2%} |"
        for b in results[1:]
    ]
    out += ["", "| policy | instances placed per GPU (gpu:0 first), by node |", "|---|---|"]
    out += [f"| {r.policy} | {spread(r)} |" for r in results]
    return "\n".join(out) + "\n"


def parse_args(argv: list[str] | None) -> tuple[SimConfig, str | None]:
    """The configuration from the command line (``--quick`` shrinks the trace)."""
    d = SimConfig()
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="a short trace: 600 s at 20 req/s")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--nodes", type=int, default=d.nodes)
    ap.add_argument("--topology", default=d.topology, help="each node's (a packaged name or file)")
    ap.add_argument("--gpus-per-node", type=int, default=d.gpus_per_node)
    ap.add_argument("--gpu-gib", type=float, default=None, help="default: the topology's")
    ap.add_argument("--h2d-gbps", type=float, default=None, help="default: the topology's")
    ap.add_argument("--init-s", type=float, default=d.init_s)
    ap.add_argument("--keep-alive-s", type=float, default=d.keep_alive_s)
    ap.add_argument("--max-batch", type=int, default=d.max_batch)
    ap.add_argument("--duration-s", type=float, default=None, help=f"default {d.duration_s:g}")
    ap.add_argument("--rate", type=float, default=None, help=f"req/s, default {d.rate_rps:g}")
    ap.add_argument("--zipf", type=float, default=d.zipf_s)
    ap.add_argument("--burst-factor", type=float, default=d.burst_factor)
    ap.add_argument(
        "--markdown",
        nargs="?",
        const="-",
        default=None,
        metavar="PATH",
        help="also write the figures as markdown (to PATH, or stdout without one)",
    )
    a = ap.parse_args(argv)
    duration = a.duration_s if a.duration_s is not None else (600.0 if a.quick else d.duration_s)
    rate = a.rate if a.rate is not None else (20.0 if a.quick else d.rate_rps)
    try:
        gib, gbps = topology_defaults(a.topology)
        parse_devices(f"sim:{a.gpus_per_node}", a.topology)
    except InvalidArgument as exc:
        ap.error(exc.message)
    cfg = SimConfig(
        nodes=a.nodes,
        topology=a.topology,
        gpus_per_node=a.gpus_per_node,
        gpu_gib=a.gpu_gib if a.gpu_gib is not None else gib,
        h2d_gbps=a.h2d_gbps if a.h2d_gbps is not None else gbps,
        init_s=a.init_s,
        keep_alive_s=a.keep_alive_s,
        max_batch=a.max_batch,
        duration_s=duration,
        rate_rps=rate,
        zipf_s=a.zipf,
        burst_factor=a.burst_factor,
        seed=a.seed,
    )
    return cfg, a.markdown


def main(argv: list[str] | None = None) -> int:
    """Build the models and the trace, run the three policies on it, print the figures."""
    cfg, md_path = parse_args(argv)
    rng = random.Random(cfg.seed)
    models = make_models(cfg, rng)
    arrivals = make_trace(cfg, models, rng)
    t0 = time.perf_counter()
    results = [Simulation(p, cfg, models, arrivals).run() for p in POLICIES]
    wall_s = time.perf_counter() - t0
    print("\n".join(report(cfg, models, len(arrivals), results, wall_s)))
    if md_path is not None:
        text = markdown(cfg, len(arrivals), results)
        if md_path == "-":
            print()
            print(text, end="")
        else:
            Path(md_path).write_text(text)
            print(f"wrote {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
