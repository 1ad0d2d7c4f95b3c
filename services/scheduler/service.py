"""The scheduler: function registry, placement and dispatch (replicas share a queue group).

A function is placed by locality (``placement.py``): on a node with a warm instance,
else where most of its model's tensors are already resident (θ from each node's tensor
store), else on the least loaded node with room on its GPU. Invocations go to a node
that has it loaded (or to any live node, which then cold-starts it). Queues, batching
and autoscaling come with the rest of the scheduler issue.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import nats.js.errors
import structlog

from gpufaas.scheduler.placement import NodeView, choose
from gpufaas.shared import constants as c
from gpufaas.shared import subjects
from gpufaas.shared.catalog import validate_source
from gpufaas.shared.config import Config
from gpufaas.shared.errors import AlreadyExists, NotFound, PlatformError, Unavailable
from gpufaas.shared.messages import (
    DeleteReply,
    DeleteRequest,
    DeployReply,
    DeployRequest,
    FunctionRecord,
    FunctionSpec,
    InvokeReply,
    InvokeRequest,
    LocalityReply,
    LocalityRequest,
    WorkerLoadReply,
    WorkerLoadRequest,
    WorkerRunRequest,
    WorkerUnloadReply,
    WorkerUnloadRequest,
    encode_json,
    to_builtins,
)
from gpufaas.shared.registry import (
    FunctionCache,
    function_key,
    get_function,
    list_functions,
    live_nodes,
)
from gpufaas.shared.rpc import request
from gpufaas.shared.service import Service

log = structlog.get_logger()


class SchedulerService(Service):
    """Deploys, deletes and dispatches invocations; watches node membership."""

    name = "scheduler"
    node_scoped = False

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.workers: dict[str, float] = {}  # live node -> its worker's start time
        self._functions: FunctionCache | None = None

    async def on_start(self) -> None:
        q = c.SCHEDULER_QUEUE
        self._functions = FunctionCache(self.buckets.functions)
        self.spawn(self._functions.run(), "functions-watch")
        await self.serve(subjects.SCHED_DEPLOY, DeployRequest, self.deploy, queue=q)
        await self.serve(subjects.SCHED_DELETE, DeleteRequest, self.delete, queue=q)
        await self.serve(subjects.SCHED_INVOKE, InvokeRequest, self.invoke, queue=q)
        await self.reconcile_once(time.time(), announce=False)
        self.spawn(self._membership_loop(), "membership")

    # --- membership --------------------------------------------------------------------

    async def _membership_loop(self) -> None:
        while self.looping:
            await asyncio.sleep(self.config.heartbeat_s)
            await self.reconcile_once(time.time())

    async def reconcile_once(self, now: float, *, announce: bool = True) -> None:
        """Refresh the live worker set; announce nodes whose worker vanished without leaving."""
        nodes = await live_nodes(self.js, self.buckets.nodes, self.config.node_ttl_s, now)
        current = {
            node: beat.started_at
            for node, beats in nodes.items()
            for beat in beats
            if beat.service == "worker"
        }
        if announce:
            for node, started in self.workers.items():
                if current.get(node) != started:
                    # Same de-duplication id as the worker's own event on a clean stop.
                    await self.publish_event(
                        "node.left",
                        {"node": node, "reason": "heartbeat expired"},
                        dedupe_id=f"node.left.{node}.{started}",
                    )
        self.workers = current

    async def _pick_nodes(self) -> list[str]:
        if not self.workers:
            await self.reconcile_once(time.time(), announce=False)
        if not self.workers:
            raise Unavailable("no node with a worker is up")
        return sorted(self.workers)

    # --- deploy / delete ---------------------------------------------------------------

    async def deploy(self, req: DeployRequest) -> DeployReply:
        spec = req.spec
        validate_source(spec.model)
        kv = self.buckets.functions
        existing = await get_function(kv, spec.tenant, spec.name)
        if existing is not None:
            if existing.spec == spec:
                return DeployReply(function=existing, created=False)
            raise AlreadyExists(
                f"function {spec.name!r} exists with another spec; delete it first", field="name"
            )
        node = await self._place(spec)
        loaded = await request(
            self.nc,
            subjects.node(node, "worker", subjects.WORKER_LOAD),
            WorkerLoadRequest(spec=spec),
            WorkerLoadReply,
            timeout=self.config.deploy_timeout_s,
            what=f"worker of node {node}",
        )
        record = FunctionRecord(
            spec=spec,
            inputs=loaded.inputs,
            outputs=loaded.outputs,
            model_bytes=loaded.model_bytes,
            tensor_count=loaded.tensor_count,
            nodes=[node],
            created_at=time.time(),
        )
        try:
            await kv.create(function_key(spec.tenant, spec.name), encode_json(record))
        except nats.js.errors.KeyWrongLastSequenceError:
            # A concurrent deploy of the same name won; answer as if we had been second.
            winner = await get_function(kv, spec.tenant, spec.name)
            if winner is not None and winner.spec == spec:
                return DeployReply(function=winner, created=False)
            await self._unload(node, spec.tenant, spec.name)
            raise AlreadyExists(
                f"function {spec.name!r} was deployed concurrently", field="name"
            ) from None
        except BaseException:
            await self._unload(node, spec.tenant, spec.name)
            raise
        await self.publish_event(
            "function.deployed",
            {
                "function": spec.name,
                "tenant": spec.tenant,
                "node": node,
                "device": loaded.device,
                "model_bytes": loaded.model_bytes,
                "bytes_stored": loaded.bytes_stored,
                "bytes_deduplicated": loaded.bytes_deduplicated,
                "load_us": loaded.load_us,
            },
        )
        return DeployReply(function=record, created=True)

    async def _place(self, spec: FunctionSpec) -> str:
        """Locality-aware placement (``placement.py``) over the live nodes' facts."""
        candidates = await self._pick_nodes()
        records = await list_functions(self.js, self.buckets.functions)
        load = Counter(n for r in records for n in r.nodes)
        warm = {n for r in records if r.spec == spec for n in r.nodes}
        beats = await live_nodes(self.js, self.buckets.nodes, self.config.node_ttl_s)
        localities = await asyncio.gather(*(self._locality(n, spec) for n in candidates))
        views = []
        for node, loc in zip(candidates, localities, strict=True):
            gpus = [d for b in beats.get(node, []) for d in b.devices if d.kind != "host"]
            free = None
            if gpus:  # the GPU instances go on (the first), as its busiest reporter sees it
                first = min(gpus, key=lambda d: (d.name, -d.used_bytes))
                free = first.memory_bytes - first.used_bytes
            views.append(NodeView(node, node in warm, loc.theta if loc else 0.0,
                                  loc.bytes_to_load if loc else 0, load[node], free))  # fmt: skip
        node = choose(views)
        log.info("placement.chosen", function=spec.name, node=node,
                 views=[(v.node, v.warm, round(v.theta, 3), v.functions) for v in views])  # fmt: skip
        return node

    async def _locality(self, node: str, spec: FunctionSpec) -> LocalityReply | None:
        """θ of the model on ``node`` (None if its tensor store does not answer at once)."""
        try:
            return await request(
                self.nc, subjects.node(node, "tensorstore", subjects.TENSORSTORE_LOCALITY),
                LocalityRequest(source=spec.model, tenant=spec.tenant), LocalityReply, timeout=1,
            )  # fmt: skip
        except PlatformError:
            return None

    async def delete(self, req: DeleteRequest) -> DeleteReply:
        kv = self.buckets.functions
        record = await get_function(kv, req.tenant, req.name)
        if record is None:
            raise NotFound(f"function {req.name!r} not found", field="name")
        await kv.delete(function_key(req.tenant, req.name))
        if self._functions is not None:
            self._functions.forget(req.tenant, req.name)
        for node in set(record.nodes) | set(self.workers):
            await self._unload(node, req.tenant, req.name)
        await self.publish_event("function.deleted", {"function": req.name, "tenant": req.tenant})
        return DeleteReply(name=req.name)

    async def _unload(self, node: str, tenant: str, name: str) -> None:
        try:
            await request(
                self.nc,
                subjects.node(node, "worker", subjects.WORKER_UNLOAD),
                WorkerUnloadRequest(function=name, tenant=tenant),
                WorkerUnloadReply,
                timeout=5,
                what=f"worker of node {node}",
            )
        except PlatformError as exc:
            log.warning("unload.failed", node=node, function=name, error=exc.message)

    # --- invoke ------------------------------------------------------------------------

    async def invoke(self, req: InvokeRequest) -> InvokeReply:
        t0 = time.perf_counter()
        assert self._functions is not None
        record = await self._functions.get(req.tenant, req.function)
        if record is None:
            raise NotFound(f"function {req.function!r} not found", field="model")
        candidates = await self._pick_nodes()
        node = next((n for n in record.nodes if n in self.workers), candidates[0])
        deadline = req.deadline or (time.time() + self.config.request_timeout_s)
        timeout = max(deadline - time.time(), 0.001)
        run = WorkerRunRequest(
            spec=record.spec,
            request_id=req.request_id,
            inputs=req.inputs,
            queue_us=int((time.perf_counter() - t0) * 1e6),
            deadline=deadline,
        )
        reply = await request(
            self.nc,
            subjects.node(node, "worker", subjects.WORKER_RUN),
            run,
            InvokeReply,
            timeout=timeout,
            request_id=req.request_id,
            what=f"worker of node {node}",
        )
        await self.publish_event(
            "invocation.completed",
            {
                "function": req.function,
                "tenant": req.tenant,
                "node": reply.node,
                "device": reply.device,
                "breakdown": to_builtins(reply.breakdown),
            },
            request_id=req.request_id,
            ack=False,
        )
        return reply
