"""The scheduler: function registry, placement, queues, profiles and autoscaling.

Replicas share the cluster-wide verbs through a NATS queue group; what they must agree on
lives in KV (functions and where their instances are, profiles, the autoscaling leader).

* **Placement** (``placement.py``): a node with a warm instance, else where most of the
  model's tensors are resident (θ from each node's tensor store), else the least loaded
  node with room on its GPU.
* **Queues** (``queues.py``): every invocation waits in its function's queue, earliest
  deadline first, until one of the function's instances has room (its batch size times
  its concurrency, twice over); the worker forms the batches. A function with no instance
  left (scaled to zero, or its node gone) is cold-started by the replica that queued it.
* **Profiles** (``profiles.py``): on deploy the worker measures batch 1 (a deploy whose SLO
  that cannot meet fails), then the batch sizes and concurrencies in the background; the
  configuration is chosen by Decreased Throughput Selection and kept in KV.
* **Autoscaling** (``autoscale.py``): every replica publishes its load each tick; the
  leader (a KV lease) sums them and scales each function out, in, or to zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

import nats.errors
import nats.js.errors
import structlog
from msgspec.structs import replace as msgspec_replace
from nats.aio.msg import Msg as NatsMsg
from nats.js.kv import KeyValue

from gpufaas.scheduler.autoscale import Autoscaler, FunctionLoad
from gpufaas.scheduler.placement import NodeView, choose
from gpufaas.scheduler.profiles import ProfilePoint, batch_sizes, choose_config
from gpufaas.scheduler.queues import FunctionQueue, Pending
from gpufaas.scheduler.workflow_run import WorkflowRun
from gpufaas.shared import constants as c
from gpufaas.shared import subjects
from gpufaas.shared.catalog import model_file, validate_source
from gpufaas.shared.config import Config
from gpufaas.shared.errors import (
    AlreadyExists,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    PlatformError,
    ResourceExhausted,
    Unavailable,
)
from gpufaas.shared.jetstream import bucket_keys
from gpufaas.shared.messages import (
    DeleteReply,
    DeleteRequest,
    DeployReply,
    DeployRequest,
    Event,
    FunctionLoadReport,
    FunctionRecord,
    FunctionSpec,
    InflightRecord,
    InvokeReply,
    InvokeRequest,
    LocalityReply,
    LocalityRequest,
    M,
    ModelCache,
    Msg,
    ProfilePointMsg,
    ProfileRecord,
    QueueEntry,
    QueueView,
    SchedulerLoad,
    TensorPayload,
    Tube,
    WorkerBindReply,
    WorkerBindRequest,
    WorkerLoadReply,
    WorkerLoadRequest,
    WorkerProfileReply,
    WorkerProfileRequest,
    WorkerRunRequest,
    WorkerUnloadReply,
    WorkerUnloadRequest,
    decode,
    decode_json,
    encode,
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
from gpufaas.shared.rpc import error_reply, request
from gpufaas.shared.service import REPLY_TO, Service
from gpufaas.shared.workflows import (
    WorkflowDeleteReply,
    WorkflowDeleteRequest,
    WorkflowDeployReply,
    WorkflowDeployRequest,
    WorkflowInflightRecord,
    WorkflowInvokeReply,
    WorkflowInvokeRequest,
    WorkflowRecord,
    WorkflowSpec,
    producers,
    validate_workflow,
)

log = structlog.get_logger()
R = TypeVar("R")
# Input tubes per function and node in a queue view: the first queued requests' (what the
# memory manager can bring to a GPU before they run), not the whole queue's.
VIEW_TUBES = 64


class SchedulerService(Service):
    """Deploys, deletes and dispatches invocations; watches node membership."""

    name = "scheduler"
    node_scoped = False

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.workers: dict[str, float] = {}  # live node -> its worker's start time
        self._functions: FunctionCache | None = None
        self.replica = f"{config.node_id}/{os.getpid()}/{self.started_at:.6f}"
        self.queues: dict[str, FunctionQueue] = {}  # tenant/name -> its queue here
        self.autoscaler = Autoscaler(
            keep_alive_s=config.instance_keep_alive_s, max_instances=config.max_instances
        )
        self.leader = False
        self._adopted: set[str] = set()  # inflight keys taken over from dead replicas
        self._member = False  # listed in the replicas bucket
        self._leader_rev = 0
        self._reports: dict[str, SchedulerLoad] = {}  # replica -> its latest load report
        self._profiles: dict[str, tuple[float, ProfileRecord | None]] = {}  # key -> (read at, …)
        self._cold: dict[str, asyncio.Task[None]] = {}  # key -> cold start from zero here
        self._draining: dict[tuple[str, str], float] = {}  # (key, node) -> left the record at
        # Called after each workflow step (a test seam: stop a node between two steps).
        self.step_done: Callable[[str], Awaitable[None]] | None = None

    async def on_start(self) -> None:
        q = c.SCHEDULER_QUEUE
        # Alive and a member before the first request is accepted: a replica that dies
        # before its first tick must still be found, or its callers would wait in vain.
        await self._renew_membership()
        self._functions = FunctionCache(self.buckets.functions)
        self.spawn(self._functions.run(), "functions-watch")
        await self.serve(subjects.SCHED_DEPLOY, DeployRequest, self.deploy, queue=q)
        await self.serve(subjects.SCHED_DELETE, DeleteRequest, self.delete, queue=q)
        await self.serve(subjects.SCHED_INVOKE, InvokeRequest, self.invoke, queue=q)
        await self.serve(
            subjects.SCHED_WORKFLOW_DEPLOY, WorkflowDeployRequest, self.workflow_deploy, queue=q
        )
        await self.serve(
            subjects.SCHED_WORKFLOW_DELETE, WorkflowDeleteRequest, self.workflow_delete, queue=q
        )
        await self.serve(
            subjects.SCHED_WORKFLOW_INVOKE, WorkflowInvokeRequest, self.workflow_invoke, queue=q
        )
        await self.serve(subjects.SCHED_LOAD, SchedulerLoad, self._on_load)  # every replica
        self._subs.append(
            await self.nc.subscribe(subjects.event("memory.rejected"), cb=self._on_rejected)
        )
        await self.reconcile_once(time.time(), announce=False)
        self.spawn(self._membership_loop(), "membership")
        self.spawn(self._autoscale_loop(), "autoscale")

    async def on_stop(self) -> None:
        """Leave cleanly: every request was answered (or told we stopped), so this
        replica's records and its name go, and no survivor answers them again."""
        me = _token(self.replica)
        with contextlib.suppress(nats.errors.Error, nats.js.errors.Error, PlatformError):
            for bucket, subject in (
                (c.KV_INFLIGHT, f"{me}.>"),
                (c.KV_REPLICAS, me),
                (c.KV_LEASES, f"replica.{me}"),
            ):
                await self.js.purge_stream(f"KV_{bucket}", subject=subjects.kv_key(bucket, subject))

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
        loaded, _ = await self._worker(
            node,
            spec.tenant,
            subjects.WORKER_LOAD,
            WorkerLoadRequest(spec=spec),
            WorkerLoadReply,
            timeout=self.config.deploy_timeout_s,
        )
        try:
            first = await self._profile(node, spec, [1], repeats=3, deadline_s=30)
            choice = self._check_slo(spec, first.points)
        except BaseException:
            await self._unload(node, spec.tenant, spec.name)
            raise
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
        await self._put_profile(spec, first, complete=False, reason=choice)
        if self.config.profile_s > 0:
            self.after_reply(self._profile_sweep(node, spec))
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

    async def _place(
        self, spec: FunctionSpec, exclude: set[str] | None = None, near: str | None = None
    ) -> str:
        """Locality-aware placement (``placement.py``) over the live nodes' facts; nodes in
        ``exclude`` (that already hold an instance) only when there is no other."""
        candidates = await self._pick_nodes()
        candidates = [n for n in candidates if n not in (exclude or set())] or candidates
        records = await list_functions(self.js, self.buckets.functions)
        load = Counter(n for r in records for n in r.nodes)
        warm = {n for r in records if r.spec == spec for n in r.nodes}
        beats = await live_nodes(self.js, self.buckets.nodes, self.config.node_ttl_s)
        localities = await asyncio.gather(*(self._locality(n, spec) for n in candidates))
        on_gpu = await self._gpu_cached(spec)
        views = []
        for node, loc in zip(candidates, localities, strict=True):
            gpus = [d for b in beats.get(node, []) for d in b.devices if d.kind != "host"]
            free = None
            if gpus:  # the GPU instances go on (the first), as its busiest reporter sees it
                first = min(gpus, key=lambda d: (d.name, -d.used_bytes))
                free = first.memory_bytes - first.used_bytes
            views.append(
                NodeView(
                    node,
                    node in warm,
                    loc.theta if loc else 0.0,
                    loc.bytes_to_load if loc else 0,
                    load[node],
                    free,
                    near=node == near,
                    on_gpu=node in on_gpu,
                )
            )
        node = choose(views)
        log.info(
            "placement.chosen",
            function=spec.name,
            node=node,
            views=[(v.node, v.warm, v.on_gpu, round(v.theta, 3), v.functions) for v in views],
        )
        return node

    async def _gpu_cached(self, spec: FunctionSpec) -> set[str]:
        """The nodes with the function's whole model on a GPU, from the model caches the
        memory managers publish (KV ``<node>.<gpuN>.m``). Copies are per scope: a private
        model matches only its tenant's copies, a public one only public copies (a
        tenant's private registration of the same file shares nothing with them)."""
        try:
            file = str(model_file(spec.model))
        except PlatformError:  # a path this process cannot resolve: no cache to match
            return set()
        scope = spec.tenant if spec.model.private else None
        nodes: set[str] = set()
        with contextlib.suppress(nats.js.errors.Error):
            for key in await bucket_keys(self.js, c.KV_MEMORY):
                node = key.split(".", 1)[0]
                if not key.endswith(".m") or node in nodes:
                    continue
                try:
                    entry = await self.buckets.memory.get(key)
                except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                    continue
                if not entry.value:
                    continue
                cache = decode_json(entry.value, ModelCache)
                if any(m.file == file and m.tenant == scope for m in cache.models):
                    nodes.add(node)
        return nodes

    async def _locality(self, node: str, spec: FunctionSpec) -> LocalityReply | None:
        """θ of the model on ``node`` (None if its tensor store does not answer at once)."""
        try:
            return await request(
                self.nc,
                subjects.node(node, "tensorstore", subjects.TENSORSTORE_LOCALITY),
                LocalityRequest(source=spec.model, tenant=spec.tenant),
                LocalityReply,
                timeout=1,
            )
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

    async def _worker(
        self,
        node: str,
        tenant: str,
        verb: str,
        msg: Msg,
        reply_type: type[M],
        *,
        timeout: float,
        request_id: str | None = None,
        bind: bool = True,
    ) -> tuple[M, WorkerBindReply | None]:
        """A worker verb for ``tenant`` on ``node``. When no process of the tenant answers
        there (its first function on the node, or its process went idle and exited), the
        node's pool binds one (a warm spare, else a new process) and the request is sent
        again; the bind's reply says how long that took. The pool never returns a process
        that is retiring (see ``gpufaas.worker.pool``); should the bound one still not
        answer (it crashed meanwhile), the pool is asked once more."""
        subject = subjects.worker(node, tenant, verb)
        what = f"worker of node {node}"

        async def send() -> M:
            return await request(
                self.nc, subject, msg, reply_type, timeout=timeout, request_id=request_id, what=what
            )

        async def bind_one() -> WorkerBindReply:
            bound = await request(
                self.nc,
                subjects.node(node, "worker", subjects.WORKER_BIND),
                WorkerBindRequest(tenant=tenant),
                WorkerBindReply,
                timeout=self.config.deploy_timeout_s,
                request_id=request_id,
                what=what,
            )
            log.info(
                "worker.bound",
                node=node,
                tenant=tenant,
                worker=bound.worker,
                waited_us=bound.waited_us,
                new_process=bound.new_process,
            )
            return bound

        try:
            return await send(), None
        except Unavailable as exc:
            if not bind:
                raise
            try:
                bound = await bind_one()
            except Unavailable:
                raise exc from None  # no pool on that node: the first error stands
        try:
            return await send(), bound
        except Unavailable:
            log.warning("worker.bound_not_answering", node=node, tenant=tenant, worker=bound.worker)
        again = await bind_one()
        bound = WorkerBindReply(
            worker=again.worker,
            waited_us=bound.waited_us + again.waited_us,
            new_process=bound.new_process or again.new_process,
        )
        return await send(), bound

    async def _unload(self, node: str, tenant: str, name: str) -> None:
        try:
            await self._worker(
                node,
                tenant,
                subjects.WORKER_UNLOAD,
                WorkerUnloadRequest(function=name, tenant=tenant),
                WorkerUnloadReply,
                timeout=5,
                bind=False,
            )
        except Unavailable:
            pass  # no process of the tenant there: nothing loaded
        except PlatformError as exc:
            log.warning("unload.failed", node=node, function=name, error=exc.message)

    # --- profiles ------------------------------------------------------------------------

    async def _profile(
        self,
        node: str,
        spec: FunctionSpec,
        batches: list[int],
        *,
        repeats: int,
        deadline_s: float,
    ) -> WorkerProfileReply:
        reply, _ = await self._worker(
            node,
            spec.tenant,
            subjects.WORKER_PROFILE,
            WorkerProfileRequest(
                spec=spec,
                batches=batches,
                repeats=repeats,
                concurrencies=self._concurrencies(),
                deadline_s=deadline_s,
            ),
            WorkerProfileReply,
            timeout=deadline_s + self.config.deploy_timeout_s,
        )
        return reply

    def _concurrencies(self) -> list[int]:
        """Concurrencies to profile; each worker measures those its device can run."""
        return list(range(1, max(self.config.device_streams, c.CUDA_DEVICE_STREAMS) + 1))

    @staticmethod
    def _points(points: list[ProfilePointMsg]) -> list[ProfilePoint]:
        return [ProfilePoint(p.batch, p.concurrency, p.latency_s, p.memory_bytes) for p in points]

    def _check_slo(self, spec: FunctionSpec, points: list[ProfilePointMsg]) -> str:
        """Refuse a deploy whose SLO not even batch 1 meets (raises naming options.slo_ms)."""
        slo = spec.options.slo_ms / 1e3 if spec.options.slo_ms else None
        choice = choose_config(self._points(points), slo, max_batch=1)
        return f"batch 1 measured ({choice.latency_s * 1e3:.1f} ms); the full profile follows"

    async def _put_profile(
        self,
        spec: FunctionSpec,
        reply: WorkerProfileReply,
        *,
        complete: bool,
        reason: str,
        batch: int | None = None,
        concurrency: int = 1,
    ) -> ProfileRecord:
        record = ProfileRecord(
            spec=spec,
            device=reply.device,
            points=reply.points,
            batch=batch or spec.options.max_batch_size,
            concurrency=concurrency,
            reason=reason,
            complete=complete,
            measured_at=time.time(),
        )
        key = function_key(spec.tenant, spec.name)
        await self.buckets.profiles.put(key, encode_json(record))
        self._profiles[key] = (time.monotonic(), record)
        return record

    async def _profile_sweep(self, node: str, spec: FunctionSpec) -> None:
        """The full profile, one batch size per request so that requests interleave; then
        the DTS choice into KV (``profile.completed``). Failures are logged, not raised:
        the function keeps its default configuration."""
        budget = self.config.profile_s
        start = time.monotonic()
        points: list[ProfilePointMsg] = []
        device = ""
        try:
            for b in batch_sizes(spec.options.max_batch_size):
                left = budget - (time.monotonic() - start)
                current = await get_function(self.buckets.functions, spec.tenant, spec.name)
                if (
                    left <= 0
                    or current is None
                    or current.spec != spec
                    or node not in current.nodes
                ):
                    break  # out of time, or the function is gone or moved
                reply = await self._profile(node, spec, [b], repeats=3, deadline_s=left)
                device = reply.device
                points += [p for p in reply.points if p.batch == b]
            if not points:
                return
            slo = spec.options.slo_ms / 1e3 if spec.options.slo_ms else None
            record = await get_function(self.buckets.functions, spec.tenant, spec.name)
            choice = choose_config(
                self._points(points),
                slo,
                max_batch=spec.options.max_batch_size,
                weights_bytes=record.model_bytes if record else 0,
            )
        except PlatformError as exc:
            log.warning("profile.failed", function=spec.name, error=exc.message)
            return
        current = await get_function(self.buckets.functions, spec.tenant, spec.name)
        if current is None or current.spec != spec:
            return  # deleted or redeployed meanwhile
        await self._put_profile(
            spec,
            WorkerProfileReply(device=device, points=points),
            complete=True,
            reason=choice.reason,
            batch=choice.batch,
            concurrency=choice.concurrency,
        )
        await self.publish_event(
            "profile.completed",
            {
                "function": spec.name,
                "tenant": spec.tenant,
                "device": device,
                "batch": choice.batch,
                "concurrency": choice.concurrency,
                "latency_ms": round(choice.latency_s * 1e3, 3),
                "throughput_rps": round(choice.throughput_rps, 1),
                "reason": choice.reason,
                "points": len(points),
            },
        )

    async def profile_of(self, tenant: str, name: str) -> ProfileRecord | None:
        """A function's profile record, cached for a few seconds (it changes once or twice)."""
        key = function_key(tenant, name)
        cached = self._profiles.get(key)
        if cached is not None and time.monotonic() - cached[0] < 5.0:
            return cached[1]
        try:
            entry = await self.buckets.profiles.get(key)
            record = None if entry.value is None else decode_json(entry.value, ProfileRecord)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            record = None
        self._profiles[key] = (time.monotonic(), record)
        return record

    # --- invoke ------------------------------------------------------------------------

    async def invoke(self, req: InvokeRequest) -> InvokeReply:
        """Accept an invocation: recorded in KV (with the caller's reply subject) before it
        is queued, forgotten once answered; a replica that outlives us answers it if we die."""

        def run(dispatch_id: str, deadline: float) -> Awaitable[InvokeReply]:
            return self._invoke(
                req.tenant,
                req.function,
                req.request_id,
                req.inputs,
                deadline,
                dispatch_id=dispatch_id,
            )

        return await self._accepted(InflightRecord, req, run)

    async def _accepted(
        self,
        record_type: type[InflightRecord] | type[WorkflowInflightRecord],
        req: InvokeRequest | WorkflowInvokeRequest,
        run: Callable[[str, float], Awaitable[R]],
    ) -> R:
        """Run an accepted request under a new dispatch id, recorded meanwhile (with the
        caller's reply subject) under this replica's prefix of the inflight bucket, so a
        replica that outlives this one answers it; forgotten once answered.

        The record is a plain publish to the bucket's subject, not an acknowledged put: it
        leaves on this connection before the request does, so it is stored unless this
        process dies within that instant; an ack round trip per request cost 10-20% of the
        throughput of small batched requests (bench/batching.py)."""
        deadline = req.deadline or (time.time() + self.config.request_timeout_s)
        dispatch_id = uuid.uuid4().hex
        key = self._inflight_key(dispatch_id)
        reply_to = REPLY_TO.get()
        if reply_to:
            record = record_type(
                replica=self.replica,
                reply_to=reply_to,
                request=req,  # type: ignore[arg-type]
                dispatch_id=dispatch_id,
                accepted_at=time.time(),
            )
            await self.nc.publish(subjects.kv_key(c.KV_INFLIGHT, key), encode(record))
        try:
            return await run(dispatch_id, deadline)
        finally:
            if reply_to:  # once the reply is out (this runs after it is queued)
                self.after_reply(self._forget_inflight(key))

    async def _forget_inflight(self, key: str) -> None:
        """Delete an answered request's record (a delete marker, published like the put;
        markers lapse with the bucket's age limit, or with the replica's prefix)."""
        with contextlib.suppress(nats.errors.Error):
            await self.nc.publish(
                subjects.kv_key(c.KV_INFLIGHT, key), b"", headers={"KV-Operation": "DEL"}
            )

    async def _invoke(
        self,
        tenant: str,
        function: str,
        request_id: str,
        inputs: list[TensorPayload],
        deadline: float,
        *,
        intermediate: bool = False,
        prefer: str | None = None,
        dispatch_id: str = "",
    ) -> InvokeReply:
        """Queue a request on its function, wait for an instance with room, run it there
        (on ``prefer`` when that node has an instance with room: where its inputs are)."""
        t0 = time.perf_counter()
        assert self._functions is not None
        record = await self._functions.get(tenant, function)
        if record is None:
            raise NotFound(f"function {function!r} not found", field="model")
        key = function_key(tenant, function)
        fq = self.queues.get(key)
        if fq is None:
            fq = self.queues[key] = FunctionQueue(key)
        tubes = tuple(p.tube for p in inputs if p.tube is not None)
        pending = Pending(
            deadline,
            request_id,
            asyncio.get_running_loop().create_future(),
            prefer=prefer,
            tubes=tubes,
        )
        fq.push(pending)
        profile = await self.profile_of(tenant, function)
        await self._pump(fq, record)
        try:
            async with asyncio.timeout(max(deadline - time.time(), 0.001)):
                node = await pending.node
        except TimeoutError:
            pending.node.cancel()
            raise DeadlineExceeded(
                f"request waited past its deadline in the queue of {function!r}"
            ) from None
        finally:
            if not pending.node.done():
                pending.node.cancel()
        if tubes:  # pinned on that node until it is answered (see the queue view)
            fq.running_tubes[pending.seq] = (node, tubes)
        try:
            run = WorkerRunRequest(
                spec=record.spec,
                request_id=request_id,
                inputs=inputs,
                queue_us=int((time.perf_counter() - t0) * 1e6),
                deadline=deadline,
                max_batch=profile.batch if profile and profile.complete else None,
                concurrency=profile.concurrency if profile and profile.complete else None,
                intermediate=intermediate,
                dispatch_id=dispatch_id,
            )
            reply, bound = await self._worker(
                node,
                tenant,
                subjects.WORKER_RUN,
                run,
                InvokeReply,
                timeout=max(deadline - time.time(), 0.001),
                request_id=request_id,
            )
            if bound is not None:  # it waited for a worker process of its tenant
                reply = msgspec_replace(
                    reply,
                    breakdown=msgspec_replace(
                        reply.breakdown,
                        worker_us=bound.waited_us,
                        new_process=bound.new_process,
                        queue_us=reply.breakdown.queue_us + bound.waited_us,
                    ),
                )
        finally:
            fq.release(node)
            fq.running_tubes.pop(pending.seq, None)
            await self._pump(fq, None)
        if pending.cold_us:  # the instance was built for it before the worker saw it
            b = reply.breakdown
            reply = msgspec_replace(
                reply,
                breakdown=msgspec_replace(
                    b,
                    cold=True,
                    load_us=b.load_us + pending.cold_us,
                    worker_us=b.worker_us + pending.worker_us,
                    loaded_bytes=b.loaded_bytes + pending.loaded_bytes,
                    new_process=b.new_process or pending.new_process,
                ),
            )
        await self.publish_event(
            "invocation.completed",
            {
                "function": function,
                "tenant": tenant,
                "node": reply.node,
                "device": reply.device,
                "breakdown": to_builtins(reply.breakdown),
            },
            request_id=request_id,
            ack=False,
        )
        return reply

    async def _pump(self, fq: FunctionQueue, record: FunctionRecord | None) -> None:
        """Hand waiting requests to instances with room; start one if the function has none."""
        if not fq.waiting:
            return
        tenant, _, name = fq.key.partition(".")
        if record is None:
            assert self._functions is not None
            record = await self._functions.get(tenant, name)
            if record is None:  # deleted while requests waited
                for p in fq.waiting:
                    if not p.node.done():
                        p.node.set_exception(
                            NotFound(f"function {name!r} not found", field="model")
                        )
                fq.waiting.clear()
                return
        nodes = [n for n in record.nodes if n in self.workers]
        if not nodes:
            if fq.key not in self._cold or self._cold[fq.key].done():
                self._cold[fq.key] = self.spawn(self._cold_start(fq, record), f"cold-{fq.key}")
            return
        profile = await self.profile_of(tenant, name)
        batch = (
            profile.batch if profile and profile.complete else record.spec.options.max_batch_size
        )
        capacity = 2 * batch * (profile.concurrency if profile and profile.complete else 1)
        for pending, node in fq.assign(nodes, capacity):
            pending.node.set_result(node)

    async def _cold_start(self, fq: FunctionQueue, record: FunctionRecord) -> None:
        """A function with requests waiting and no live instance: place and build one."""
        spec = record.spec
        t0 = time.perf_counter()
        try:
            # Where the most urgent waiting request's inputs are, on a tie of θ.
            head = min((p for p in fq.waiting if not p.node.done()), default=None)
            node = await self._place(spec, near=head.prefer if head else None)
            loaded, bound = await self._worker(
                node,
                spec.tenant,
                subjects.WORKER_LOAD,
                WorkerLoadRequest(spec=spec),
                WorkerLoadReply,
                timeout=self.config.deploy_timeout_s,
            )
            updated = await self._update_nodes(
                spec, lambda ns: [n for n in ns if n in self.workers and n != node] + [node]
            )
        except PlatformError as exc:
            log.warning("cold_start.failed", function=spec.name, error=exc.message)
            for p in fq.waiting:
                if not p.node.done():
                    p.node.set_exception(exc)
            fq.waiting.clear()
            return
        cold_us = int((time.perf_counter() - t0) * 1e6)
        for p in fq.waiting:  # every request that waited for it reports a cold start
            p.cold_us = cold_us
            p.loaded_bytes = loaded.bytes_stored
            if bound is not None:
                p.worker_us, p.new_process = bound.waited_us, bound.new_process
        if updated is not None:
            await self.publish_event(
                "function.scaled",
                {
                    "function": spec.name,
                    "tenant": spec.tenant,
                    "from": 0,
                    "to": len(updated.nodes),
                    "nodes": updated.nodes,
                    "reason": "requests waiting and no live instance",
                },
            )
            await self._pump(fq, updated)

    async def _update_nodes(
        self, spec: FunctionSpec, change: Callable[[list[str]], list[str]]
    ) -> FunctionRecord | None:
        """Change a function's instance nodes in KV (compare-and-set, retried); None when
        the function is gone or was redeployed with another spec."""
        kv = self.buckets.functions
        key = function_key(spec.tenant, spec.name)
        for _ in range(20):
            try:
                entry = await kv.get(key)
            except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                return None
            if entry.value is None:
                return None
            record = decode_json(entry.value, FunctionRecord)
            if record.spec != spec:
                return None
            new = msgspec_replace(record, nodes=change(list(record.nodes)))
            try:
                await kv.update(key, encode_json(new), last=entry.revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                continue
            assert self._functions is not None
            self._functions.remember(new)
            return new
        raise Unavailable(f"function {spec.name!r} is being changed by others; try again")

    # --- autoscaling -----------------------------------------------------------------------

    async def _on_rejected(self, msg: NatsMsg) -> None:
        """A node's memory manager found a function's working set bigger than its GPU:
        fail the requests waiting for it there (507 with the reason) instead of letting
        them thrash the device, unless another live node has the function too."""
        try:
            event = decode_json(msg.data, Event)
            tenant, name = str(event.data["function"]).split("/", 1)
            node, reason = str(event.data["node"]), str(event.data["reason"])
        except (PlatformError, KeyError, ValueError):
            return
        fq = self.queues.get(function_key(tenant, name))
        if fq is None:
            return
        assert self._functions is not None
        record = await self._functions.get(tenant, name)
        others = [n for n in (record.nodes if record else []) if n != node and n in self.workers]
        if others:
            return
        error = ResourceExhausted(f"function {name!r} cannot run on {node}: {reason}")
        for p in fq.waiting:
            if not p.node.done():
                p.node.set_exception(error)
        fq.waiting.clear()

    async def _on_load(self, msg: SchedulerLoad) -> SchedulerLoad:
        if msg.replica != self.replica:
            self._reports[msg.replica] = msg
        return msg

    async def _autoscale_loop(self) -> None:
        while self.looping:
            await asyncio.sleep(self.config.autoscale_interval_s)
            try:
                await self.autoscale_once(time.time())
            except PlatformError as exc:
                log.warning("autoscale.failed", error=exc.message)

    async def autoscale_once(self, now: float) -> None:
        """One tick: publish this replica's load and queue views; if leader, scale."""
        await self._publish_load(now)
        await self._take_over(now)
        if not await self._lead():
            return
        fresh = [
            r
            for r in self._reports.values()
            if now - r.at <= 3 * self.config.autoscale_interval_s + 1
        ]
        totals: dict[str, list[int]] = {}
        for report in fresh:
            for f in report.functions:
                t = totals.setdefault(f.function, [0, 0, 0])
                t[0] += f.arrivals
                t[1] += f.queued
                t[2] += f.in_flight
        for report in fresh:  # counted once: arrivals are since each replica's last report
            self._reports[report.replica] = msgspec_replace(
                report, functions=[msgspec_replace(f, arrivals=0) for f in report.functions]
            )
        records = await list_functions(self.js, self.buckets.functions)
        loads = []
        for record in records:
            key = function_key(record.spec.tenant, record.spec.name)
            arrivals, queued, in_flight = totals.get(key, [0, 0, 0])
            if arrivals:
                self.autoscaler.observe(key, now, arrivals)
            profile = await self.profile_of(record.spec.tenant, record.spec.name)
            batch = (
                profile.batch
                if profile and profile.complete
                else record.spec.options.max_batch_size
            )
            conc = profile.concurrency if profile and profile.complete else 1
            rps = 0.0
            if profile and profile.complete:
                point = next(
                    (p for p in profile.points if (p.batch, p.concurrency) == (batch, conc)), None
                )
                rps = point.batch * point.concurrency / point.latency_s if point else 0.0
            live = [n for n in record.nodes if n in self.workers]
            loads.append(FunctionLoad(key, len(live), queued, in_flight, batch * conc, rps))
        by_key = {function_key(r.spec.tenant, r.spec.name): r for r in records}
        for key, decision in self.autoscaler.decide(now, loads).items():
            if decision.desired != decision.current:
                await self._scale(by_key[key], decision.desired, decision.reason, now)
        await self._finish_draining(now)

    async def _publish_load(self, now: float) -> None:
        reports = []
        views: dict[str, list[QueueEntry]] = {}
        assert self._functions is not None
        for key, fq in list(self.queues.items()):
            queued, in_flight = fq.queued(), sum(fq.in_flight.values())
            if not (fq.arrivals or queued or in_flight):
                del self.queues[key]
                continue
            reports.append(FunctionLoadReport(key, fq.arrivals, queued, in_flight))
            shown = key.replace(".", "/", 1)  # as workers name functions to the memory service
            fq.arrivals = 0
            tenant, _, name = key.partition(".")
            record = await self._functions.get(tenant, name)
            if record is None:
                continue
            profile = await self.profile_of(tenant, name)
            compute_s = None
            if profile is not None and profile.points:
                chosen = [
                    p
                    for p in profile.points
                    if (p.batch, p.concurrency) == (profile.batch, profile.concurrency)
                ]
                point = chosen[0] if chosen else min(profile.points, key=lambda p: p.batch)
                compute_s = point.latency_s / (point.batch * point.concurrency)
            for node in record.nodes:  # queued requests will run on one of its instances
                views.setdefault(node, []).append(
                    QueueEntry(
                        shown,
                        record.spec.model,
                        queued,
                        fq.in_flight.get(node, 0),
                        fq.next_deadline(),
                        compute_s,
                        fq.queued_tubes(node, VIEW_TUBES),
                    )
                )
        load = SchedulerLoad(replica=self.replica, at=now, functions=reports)
        self._reports[self.replica] = load  # our own, without waiting for it to loop back
        with contextlib.suppress(nats.errors.Error):
            await self.nc.publish(subjects.SCHED_LOAD, encode(load))
            for node, entries in views.items():
                view = QueueView(replica=self.replica, node=node, at=now, entries=entries)
                await self.nc.publish(
                    subjects.node(node, "memory", subjects.MEMORY_QUEUE_VIEW), encode(view)
                )

    def _inflight_key(self, dispatch_id: str, replica: str | None = None) -> str:
        return f"{_token(replica or self.replica)}.{dispatch_id}"

    async def _take_over(self, now: float) -> None:
        """Renew this replica's liveness key; answer the callers of replicas whose key lapsed.

        Each replica records what it accepted under its own prefix of the inflight bucket
        and is listed in the replicas bucket, so only a dead replica's prefix is read.
        Its live records are claimed (compare-and-set, so one survivor answers each) and
        run again; requests it had already sent on are answered from the worker's memory,
        not run twice (``dispatch_id``). Once none is left, its prefix is purged.
        """
        me = await self._renew_membership()
        for dead in await bucket_keys(self.js, c.KV_REPLICAS):
            if dead == me or await _exists(self.buckets.leases, f"replica.{dead}"):
                continue
            pending = 0
            for key in await bucket_keys(self.js, c.KV_INFLIGHT, prefix=f"{dead}."):
                pending += await self._claim(key, now)
            if pending:
                log.info("scheduler.replica_dead", replica=dead, pending=pending)
            if not pending and not any(k.startswith(f"{dead}.") for k in self._adopted):
                # Gone for good: its records and markers, then its name (whole subjects,
                # so that no marker is left for the next tick to read).
                with contextlib.suppress(nats.js.errors.Error):
                    for bucket, subject in ((c.KV_INFLIGHT, f"{dead}.>"), (c.KV_REPLICAS, dead)):
                        await self.js.purge_stream(
                            f"KV_{bucket}", subject=subjects.kv_key(bucket, subject)
                        )
                log.info("scheduler.replica_gone", replica=dead)

    async def _renew_membership(self) -> str:
        """This replica's liveness key (it lapses with the TTL unless renewed each tick) and,
        once, its name among the replicas; returns its token."""
        me = _token(self.replica)
        await self.buckets.leases.put(f"replica.{me}", b"1")
        if not self._member:
            await self.buckets.replicas.put(me, self.replica.encode())
            self._member = True
        return me

    async def _claim(self, key: str, now: float) -> int:
        """Claim one of a dead replica's records and answer it; 1 if it is still pending."""
        if key in self._adopted:
            return 1
        try:
            entry = await self.buckets.inflight.get(key)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return 0
        if entry.value is None or entry.revision is None:
            return 0
        record: InflightRecord | WorkflowInflightRecord
        try:
            record = decode(entry.value, InflightRecord)
        except InvalidArgument:  # a workflow's
            record = decode(entry.value, WorkflowInflightRecord)
        if record.request.deadline and record.request.deadline < now:
            await self._forget_inflight(key)  # its caller has given up
            return 0
        mine = msgspec_replace(record, replica=self.replica)
        try:
            await self.buckets.inflight.update(key, encode(mine), last=entry.revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            return 1  # another replica claimed it
        log.warning(
            "invoke.taken_over", request_id=record.request.request_id, from_replica=record.replica
        )
        self._adopted.add(key)
        self.spawn(self._answer(key, mine), f"takeover-{record.dispatch_id}")
        return 1

    async def _answer(self, key: str, record: InflightRecord | WorkflowInflightRecord) -> None:
        """Run a dead replica's request (a function's or a workflow's) under the same
        dispatch id and answer its caller directly."""
        req = record.request
        deadline = req.deadline or (record.accepted_at + self.config.request_timeout_s)
        try:
            if isinstance(record, WorkflowInflightRecord):
                data = encode(
                    await self._run_workflow(record.request, record.dispatch_id, deadline)
                )
            else:
                data = encode(
                    await self._invoke(
                        record.request.tenant,
                        record.request.function,
                        req.request_id,
                        record.request.inputs,
                        deadline,
                        dispatch_id=record.dispatch_id,
                    )
                )
            headers = None
        except PlatformError as exc:
            data, headers = error_reply(exc)
        log.info("invoke.takeover_answered", request_id=req.request_id, error=headers is not None)
        with contextlib.suppress(nats.errors.Error):
            await self.nc.publish(record.reply_to, data, headers=headers)
        await self._forget_inflight(key)
        self._adopted.discard(key)

    async def _lead(self) -> bool:
        """Take or keep the autoscaling lease (a KV key with the leases bucket's TTL)."""
        kv = self.buckets.leases
        value = self.replica.encode()
        try:
            if self.leader:
                self._leader_rev = await kv.update(
                    c.SCHEDULER_LEADER_KEY, value, last=self._leader_rev
                )
            else:
                self._leader_rev = await kv.create(c.SCHEDULER_LEADER_KEY, value)
                log.info("autoscale.leader", replica=self.replica)
            self.leader = True
        except nats.js.errors.KeyWrongLastSequenceError:
            self.leader = False
        return self.leader

    async def _scale(self, record: FunctionRecord, desired: int, reason: str, now: float) -> None:
        spec = record.spec
        key = function_key(spec.tenant, spec.name)
        live = [n for n in record.nodes if n in self.workers]
        if desired > len(live):
            node = await self._place(spec, exclude=set(live))
            if node in live:
                return  # no other node to scale out to
            await self._worker(
                node,
                spec.tenant,
                subjects.WORKER_LOAD,
                WorkerLoadRequest(spec=spec),
                WorkerLoadReply,
                timeout=self.config.deploy_timeout_s,
            )
            updated = await self._update_nodes(
                spec, lambda ns: [n for n in ns if n in self.workers and n != node] + [node]
            )
        else:
            fq = self.queues.get(key)
            busy = fq.in_flight if fq else Counter[str]()
            drop = set(live) if desired == 0 else {min(live, key=lambda n: (busy[n], n))}
            updated = await self._update_nodes(spec, lambda ns: [n for n in ns if n not in drop])
            for node in drop:  # unloaded next tick, once requests already sent have arrived
                self._draining[(key, node)] = now
        if updated is not None:
            await self.publish_event(
                "function.scaled",
                {
                    "function": spec.name,
                    "tenant": spec.tenant,
                    "from": len(live),
                    "to": len(updated.nodes),
                    "nodes": updated.nodes,
                    "reason": reason,
                },
            )

    async def _finish_draining(self, now: float) -> None:
        assert self._functions is not None
        for (key, node), since in list(self._draining.items()):
            if now - since < self.config.autoscale_interval_s:
                continue
            del self._draining[(key, node)]
            tenant, _, name = key.partition(".")
            record = await self._functions.get(tenant, name)
            if record is not None and node in record.nodes:
                continue  # scaled back onto it meanwhile
            await self._unload(node, tenant, name)

    # --- workflows -------------------------------------------------------------------------

    async def workflow_deploy(self, req: WorkflowDeployRequest) -> WorkflowDeployReply:
        """Validate a workflow against its tenant's functions and record it (all or nothing)."""
        spec = req.spec
        records = await list_functions(self.js, self.buckets.functions, spec.tenant)
        record = validate_workflow(spec, {r.spec.name: r for r in records}, now=time.time())
        if spec.slo_ms is not None:
            await self._check_workflow_slo(record)
        kv = self.buckets.workflows
        key = function_key(spec.tenant, spec.name)
        existing = await self._workflow(spec.tenant, spec.name)
        if existing is not None:
            if existing.spec == record.spec:
                return WorkflowDeployReply(workflow=existing, created=False)
            raise AlreadyExists(
                f"workflow {spec.name!r} exists with another spec; delete it first", field="name"
            )
        try:
            await kv.create(key, encode_json(record))
        except nats.js.errors.KeyWrongLastSequenceError:
            winner = await self._workflow(spec.tenant, spec.name)
            if winner is not None and winner.spec == record.spec:
                return WorkflowDeployReply(workflow=winner, created=False)
            raise AlreadyExists(
                f"workflow {spec.name!r} was deployed concurrently", field="name"
            ) from None
        await self.publish_event(
            "workflow.deployed",
            {"workflow": spec.name, "tenant": spec.tenant, "order": record.order},
        )
        return WorkflowDeployReply(workflow=record, created=True)

    async def _check_workflow_slo(self, record: WorkflowRecord) -> None:
        """Refuse a workflow whose SLO is shorter than its critical path at batch 1 (each
        step's fastest profiled batch, along the longest chain of dependent steps)."""
        spec = record.spec
        assert spec.slo_ms is not None
        deps = producers(spec)
        fastest: dict[str, float] = {}
        finish: dict[str, float] = {}
        for name in record.order:
            step = next(s for s in spec.steps if s.name == name)
            if step.function not in fastest:
                profile = await self.profile_of(spec.tenant, step.function)
                times = [p.latency_s for p in profile.points] if profile else []
                fastest[step.function] = min(times, default=0.0)
            finish[name] = (
                max((finish[d] for d in deps[name]), default=0.0) + fastest[step.function]
            )
        path_ms = max(finish.values(), default=0.0) * 1e3
        if path_ms > spec.slo_ms:
            raise InvalidArgument(
                f"no configuration meets slo_ms={spec.slo_ms:g}: the steps' fastest runs, "
                f"one after another along the longest chain, take {path_ms:.1f} ms",
                field="slo_ms",
            )

    async def _workflow(self, tenant: str, name: str) -> WorkflowRecord | None:
        try:
            entry = await self.buckets.workflows.get(function_key(tenant, name))
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        return None if entry.value is None else decode_json(entry.value, WorkflowRecord)

    async def workflow_delete(self, req: WorkflowDeleteRequest) -> WorkflowDeleteReply:
        if await self._workflow(req.tenant, req.name) is None:
            raise NotFound(f"workflow {req.name!r} not found", field="name")
        await self.buckets.workflows.delete(function_key(req.tenant, req.name))
        await self.publish_event("workflow.deleted", {"workflow": req.name, "tenant": req.tenant})
        return WorkflowDeleteReply(name=req.name)

    async def workflow_invoke(self, req: WorkflowInvokeRequest) -> WorkflowInvokeReply:
        """Run a workflow (``workflow_run.py``): steps as their inputs become ready, tube ids
        between them, lost intermediates recomputed from the steps that made them. Recorded
        like a function's invocation, so a replica that outlives this one answers it."""
        return await self._accepted(
            WorkflowInflightRecord, req, lambda d, deadline: self._run_workflow(req, d, deadline)
        )

    async def _run_workflow(
        self, req: WorkflowInvokeRequest, dispatch_id: str, deadline: float
    ) -> WorkflowInvokeReply:
        """Each step's n-th run is dispatched as ``<dispatch_id>.<step>.<n>``: run again by a
        replica taking over, a step already sent is answered from its worker's memory; a
        step run again to recompute a lost output (lineage) gets a new id, so it runs."""
        wf = await self._workflow(req.tenant, req.workflow)
        if wf is None:
            raise NotFound(f"workflow {req.workflow!r} not found", field="workflow")
        runs: Counter[str] = Counter()

        async def invoke(
            function: str,
            step: str,
            inputs: list[TensorPayload],
            *,
            intermediate: bool,
            prefer: str | None,
        ) -> InvokeReply:
            runs[step] += 1
            return await self._invoke(
                req.tenant,
                function,
                f"{req.request_id}.{step}",
                inputs,
                deadline,
                intermediate=intermediate,
                prefer=prefer,
                dispatch_id=f"{dispatch_id}.{step}.{runs[step]}",
            )

        run = WorkflowRun(wf, req, invoke, self._lost_steps, self.step_done)
        try:
            return await run.run()
        finally:
            self.after_reply(self._drop_intermediates(run.intermediates()))

    async def _lost_steps(
        self, spec: WorkflowSpec, step: str, produced: Mapping[str, Mapping[str, TensorPayload]]
    ) -> set[str]:
        """The producers of ``step`` whose output tubes have no copy on a live node left."""
        await self.reconcile_once(time.time(), announce=False)
        lost = set()
        for producer in producers(spec)[step]:
            for out in produced.get(producer, {}).values():
                if out.tube is None:
                    continue
                try:
                    entry = await self.buckets.tubes.get(out.tube.id)
                    tube = decode_json(entry.value or b"", Tube)
                except (
                    nats.js.errors.KeyNotFoundError,
                    nats.js.errors.KeyDeletedError,
                    PlatformError,
                ):
                    lost.add(producer)
                    continue
                if not any(p.node in self.workers or p.tier == "object" for p in tube.placements):
                    lost.add(producer)
        return lost

    async def _drop_intermediates(self, tubes: list[str]) -> None:
        """Forget a finished workflow's intermediate tubes (each holder's sweeper frees them)."""
        for tube_id in tubes:
            with contextlib.suppress(nats.errors.Error, nats.js.errors.Error):
                await self.buckets.tubes.delete(tube_id)


def _token(replica: str) -> str:
    """A replica id as one KV key token (no dots or slashes)."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", replica)


async def _exists(kv: KeyValue, key: str) -> bool:
    try:
        entry = await kv.get(key)
    except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
        return False
    return entry.value is not None
