"""Where a function's next instance goes: the facts ``placement.choose`` decides over.

Gathered per candidate node: a warm instance, θ from the node's tensor store, the model
on a GPU (the memory managers' model caches), functions already there, free GPU memory.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter

import nats.js.errors
import structlog

from gpufaas.scheduler.host import Host
from gpufaas.scheduler.placement import NodeView, choose
from gpufaas.shared import subjects
from gpufaas.shared.catalog import model_file
from gpufaas.shared.errors import PlatformError
from gpufaas.shared.kv import Codec
from gpufaas.shared.messages import (
    FunctionSpec,
    Heartbeat,
    LocalityReply,
    LocalityRequest,
    ModelCache,
)
from gpufaas.shared.registry import alive, records
from gpufaas.shared.rpc import request

log = structlog.get_logger()


def free_gpu_bytes(beats: list[Heartbeat]) -> int | None:
    """Free memory of the GPU instances go on (the first), as its busiest reporter sees
    it; ``None`` for a node without GPUs."""
    gpus = [d for b in beats for d in b.devices if d.kind != "host"]
    if not gpus:
        return None
    first = min(gpus, key=lambda d: (d.name, -d.used_bytes))
    return first.memory_bytes - first.used_bytes


class Placer:
    """Locality-aware placement over the live nodes (``placement.py`` decides)."""

    def __init__(self, host: Host) -> None:
        self.host = host

    async def place(
        self, spec: FunctionSpec, exclude: set[str] | None = None, near: str | None = None
    ) -> str:
        """A node for an instance of ``spec``; nodes in ``exclude`` (that already hold one)
        only when there is no other; ``near`` wins a tie (where the inputs are)."""
        candidates = await self.host.live_workers()
        candidates = [n for n in candidates if n not in (exclude or set())] or candidates
        views = await self._views(spec, candidates, near)
        node = choose(views)
        log.info(
            "placement.chosen",
            function=spec.name,
            node=node,
            views=[(v.node, v.warm, v.on_gpu, round(v.theta, 3), v.functions) for v in views],
        )
        return node

    async def _views(
        self, spec: FunctionSpec, candidates: list[str], near: str | None
    ) -> list[NodeView]:
        host = self.host
        deployed = await records(host.kv.functions)
        load = Counter(n for r in deployed for n in r.nodes)
        warm = {n for r in deployed if r.spec == spec for n in r.nodes}
        beats = await alive(host.kv.nodes, host.config.node_ttl_s)
        localities = await asyncio.gather(*(self.locality(n, spec) for n in candidates))
        on_gpu = await self.gpu_cached(spec)
        return [
            NodeView(
                node,
                node in warm,
                loc.theta if loc else 0.0,
                loc.bytes_to_load if loc else 0,
                load[node],
                free_gpu_bytes(beats.get(node, [])),
                near=node == near,
                on_gpu=node in on_gpu,
            )
            for node, loc in zip(candidates, localities, strict=True)
        ]

    async def gpu_cached(self, spec: FunctionSpec) -> set[str]:
        """The nodes with the function's whole model on a GPU, from the model caches the
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
        nodes: set[str] = set()
        with contextlib.suppress(nats.js.errors.Error):
            for key in await caches.keys():
                node = key.split(".", 1)[0]
                if not key.endswith(".m") or node in nodes:
                    continue
                cache = await caches.value(key)
                if cache and any(m.file == file and m.tenant == scope for m in cache.models):
                    nodes.add(node)
        return nodes

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
