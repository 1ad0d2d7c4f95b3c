"""Where a function's next instance goes: the facts ``placement.choose`` decides over.

Gathered per GPU of each candidate node: a warm instance, θ from the node's tensor store,
the model on that GPU (the memory managers' model caches), functions already there, its
free memory and its links to the GPU holding the request's inputs (the heartbeats).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import nats.js.errors
import structlog

from gpufaas.scheduler.host import Host
from gpufaas.scheduler.placement import NodeView, choose, nearness
from gpufaas.shared import constants as c
from gpufaas.shared import subjects
from gpufaas.shared.catalog import model_file
from gpufaas.shared.errors import PlatformError
from gpufaas.shared.identity import gpu_number
from gpufaas.shared.kv import Codec
from gpufaas.shared.messages import (
    FunctionRecord,
    FunctionSpec,
    Heartbeat,
    LocalityReply,
    LocalityRequest,
    ModelCache,
    Tube,
)
from gpufaas.shared.registry import alive, instance_devices, records
from gpufaas.shared.rpc import request

log = structlog.get_logger()


Where = tuple[str, str]  # (node, tier) of a request's input tubes: "gpu:N" or "host"


def inputs_at(tubes: Sequence[Tube], node: str | None = None) -> Where | None:
    """Where a request's input tubes are, for placement: the (node, tier) holding the most
    of their bytes, a GPU's copy counted before the host's (``node`` only, when given);
    None when no copy is on a node (the object tier's are equally far from all)."""
    held: Counter[Where] = Counter()
    for tube in tubes:
        for pl in tube.placements:
            if pl.node != c.OBJECT_NODE and (node is None or pl.node == node):
                held[(pl.node, pl.tier)] += tube.nbytes
    if not held:
        return None
    return max(held, key=lambda w: (held[w], w[1] != "host"))


@dataclass(frozen=True, slots=True)
class NodeGpus:
    """A live node's GPUs as its heartbeats report them: free bytes each (as its busiest
    reporter sees it), and the links between them (GB/s, both orders)."""

    free: dict[str, int]
    links: dict[tuple[str, str], float]

    @property
    def names(self) -> list[str]:
        return sorted(self.free, key=gpu_number)


def node_gpus(beats: list[Heartbeat]) -> NodeGpus:
    """What ``beats`` (one node's services') say of its GPUs."""
    free: dict[str, int] = {}
    links: dict[tuple[str, str], float] = {}
    for beat in beats:
        for d in beat.devices:
            if d.kind != "host":
                free[d.name] = min(free.get(d.name, d.memory_bytes), d.memory_bytes - d.used_bytes)
        for ln in beat.links:
            links[(ln.a, ln.b)] = links[(ln.b, ln.a)] = ln.gbps
    return NodeGpus(free, links)


def gpus_of(record: FunctionRecord, node: str, gpus: NodeGpus | None) -> list[str | None]:
    """The GPUs ``record``'s instances on ``node`` compute on ([None] on a node without)."""
    devices = instance_devices(record, node, gpus.names if gpus is not None else [])
    return [None if d == "host" else d for d in devices]


@dataclass(frozen=True, slots=True)
class Facts:
    """What placement knows across nodes: where the function is warm, instances per (node,
    GPU) and per node, the (node, GPU)s whose model cache holds its model, and where the
    request's inputs are."""

    warm: set[tuple[str, str | None]]
    load: Counter[tuple[str, str | None]]
    node_load: Counter[str]
    on_gpu: set[tuple[str, str]]
    near: Where | None = None


def facts_of(
    spec: FunctionSpec,
    deployed: Iterable[FunctionRecord],
    by_node: dict[str, NodeGpus],
    on_gpu: set[tuple[str, str]],
    near: Where | None,
) -> Facts:
    """The cross-node facts for placing ``spec``, from the deployed functions' records."""
    load: Counter[tuple[str, str | None]] = Counter()
    node_load: Counter[str] = Counter()
    warm: set[tuple[str, str | None]] = set()
    for r in deployed:
        for n in r.nodes:
            for gpu in gpus_of(r, n, by_node.get(n)):
                load[(n, gpu)] += 1
                node_load[n] += 1
                if r.spec == spec:
                    warm.add((n, gpu))
    return Facts(warm, load, node_load, on_gpu, near)


def gpu_views(node: str, gpus: NodeGpus, loc: LocalityReply | None, facts: Facts) -> list[NodeView]:
    """A candidate per GPU of ``node`` (one for the node when it has none), as
    ``placement.choose`` orders them; ``loc``: the model's θ there (None: unknown)."""
    names: list[str | None] = [*gpus.names] or [None]
    views = []
    for gpu in names:
        close, gbps = nearness(node, gpu, facts.near, gpus.links)
        cached = gpu is not None and (node, gpu) in facts.on_gpu
        # What the GPU must take: the whole model unless its cache holds it (θ counts the
        # node's host copies, which still have to be copied up).
        need = loc.bytes_to_load if loc else 0
        if gpu is not None and loc is not None:
            need = 0 if cached else max(loc.model_bytes, need)
        views.append(
            NodeView(
                node,
                (node, gpu) in facts.warm,
                loc.theta if loc else 0.0,
                need,
                facts.load[(node, gpu)],
                gpus.free.get(gpu) if gpu is not None else None,
                near=close,
                on_gpu=cached,
                gpu=gpu,
                link_gbps=gbps,
                node_functions=facts.node_load[node],
            )
        )
    return views


class Placer:
    """Locality-aware placement over the live nodes' GPUs (``placement.py`` decides)."""

    def __init__(self, host: Host) -> None:
        self.host = host

    async def place(
        self,
        spec: FunctionSpec,
        new: bool = False,
        near: Where | None = None,
        on: str | None = None,
    ) -> NodeView:
        """A GPU of a node for an instance of ``spec``; with ``new`` (a scale-out), one
        that holds none of it yet, unless every GPU does (then a warm one comes back);
        ``near`` (where the request's input tubes are) counts as placement says; ``on``: a
        GPU of that node only (when it is live)."""
        candidates = await self.host.live_workers()
        if on is not None and on in candidates:
            candidates = [on]
        views = await self._views(spec, candidates, near)
        spare = [v for v in views if not v.warm] if new else []
        chosen = choose(spare or views)
        log.info(
            "placement.chosen",
            function=spec.name,
            node=chosen.node,
            gpu=chosen.gpu,
            views=[
                (v.node, v.gpu, v.warm, v.on_gpu, round(v.theta, 3), v.near, v.functions)
                for v in views
            ],
        )
        return chosen

    async def gpus(self) -> dict[str, NodeGpus]:
        """Every live node's GPUs, from the heartbeats."""
        beats = await alive(self.host.kv.nodes, self.host.config.node_ttl_s)
        return {node: node_gpus(b) for node, b in beats.items()}

    async def _views(
        self, spec: FunctionSpec, candidates: list[str], near: Where | None
    ) -> list[NodeView]:
        deployed = await records(self.host.kv.functions)
        by_node = await self.gpus()
        facts = facts_of(spec, deployed, by_node, await self.gpu_cached(spec), near)
        localities = await asyncio.gather(*(self.locality(n, spec) for n in candidates))
        views = []
        for node, loc in zip(candidates, localities, strict=True):
            views += gpu_views(node, by_node.get(node, NodeGpus({}, {})), loc, facts)
        return views

    async def gpu_cached(self, spec: FunctionSpec) -> set[tuple[str, str]]:
        """The (node, GPU)s with the function's whole model, from the model caches the
        memory managers publish (KV ``<node>.<gpuN>.m``). Copies are per scope: a private
        model matches only its tenant's copies, a public one only public copies (a
        tenant's private registration of the same file shares nothing with them)."""
        try:
            data_dir = self.host.config.data_dir  # where nodes unpack uploads (same machine)
            file = str(model_file(spec.model, tenant=spec.tenant, data_dir=data_dir))
        except PlatformError:  # a path this process cannot resolve: no cache to match
            return set()
        scope = spec.tenant if spec.model.private else None
        caches = self.host.kv.view(self.host.kv.memory, Codec.json(ModelCache))
        found: set[tuple[str, str]] = set()
        with contextlib.suppress(nats.js.errors.Error):
            for key in await caches.keys():
                if not key.endswith(".m"):
                    continue
                cache = await caches.value(key)
                if cache and any(m.file == file and m.tenant == scope for m in cache.models):
                    found.add((key.split(".", 1)[0], cache.device))
        return found

    async def locality(self, node: str, spec: FunctionSpec) -> LocalityReply | None:
        """θ of the model on ``node`` (None if its tensor store does not answer at once)."""
        try:
            return await request(
                self.host.nc,
                subjects.node(node, "tensorstore", subjects.TENSORSTORE_LOCALITY),
                LocalityRequest(source=spec.model, tenant=spec.tenant),
                LocalityReply,
                timeout=1,
            )
        except PlatformError:
            return None
