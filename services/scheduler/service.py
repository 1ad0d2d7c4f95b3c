"""The scheduler: function registry, placement, queues, profiles and autoscaling.

Replicas share the cluster-wide verbs through a NATS queue group; what they must agree on
lives in KV (functions and where their instances are, profiles, the autoscaling leader).
This module is the front; each concern is its own object:

* **Request path** (``dispatch.py`` over ``queues.py``): every invocation waits in its
  function's queue, earliest deadline first, until one of the function's instances has
  room (its batch size times its concurrency, twice over); the worker forms the batches
  (``workers.py`` sends the verbs). A function with no instance left (scaled to zero, or
  its node gone) is cold-started by the replica that queued it.
* **Placement** (``placer.py`` over ``placement.py``): a node with a warm instance, else
  where most of the model's tensors are resident (θ from each node's tensor store), else
  the least loaded node with room on its GPU.
* **Functions and profiles** (``functions.py``, ``profiling.py`` over ``profiles.py``): on
  deploy the worker measures batch 1 (a deploy whose SLO that cannot meet fails), then the
  batch sizes and concurrencies in the background; the configuration is chosen by
  Decreased Throughput Selection and kept in KV (``effective_config`` reads it).
* **Failover** (``failover.py``): accepted requests are in KV until answered; a survivor
  answers a dead replica's callers.
* **Autoscaling** (``leader.py`` over ``autoscale.py``, ``views.py``): every replica
  publishes its load and queue views each tick; the leader (a KV lease) sums the loads
  and scales each function out, in, or to zero.
* **Workflows** (``workflows.py`` over ``workflow_run.py``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable

import structlog
from nats.aio.msg import Msg as NatsMsg

from gpufaas.scheduler.autoscale import Autoscaler
from gpufaas.scheduler.dispatch import Call, Dispatcher
from gpufaas.scheduler.failover import Failover, Record
from gpufaas.scheduler.functions import FunctionRegistry
from gpufaas.scheduler.leader import Leader
from gpufaas.scheduler.placer import Placer
from gpufaas.scheduler.profiling import Profiles
from gpufaas.scheduler.queues import FunctionQueue
from gpufaas.scheduler.views import LoadPublisher, from_memory_name
from gpufaas.scheduler.workers import WorkerClient
from gpufaas.scheduler.workflows import StepDone, Workflows
from gpufaas.shared import constants as c
from gpufaas.shared import subjects, worker_deaths
from gpufaas.shared.config import Config
from gpufaas.shared.errors import PlatformError, Unavailable
from gpufaas.shared.identity import FunctionRef
from gpufaas.shared.messages import (
    DeleteReply,
    DeleteRequest,
    DeployReply,
    DeployRequest,
    Event,
    InflightRecord,
    InvokeReply,
    InvokeRequest,
    Msg,
    ProfileRecord,
    Reconnected,
    ScaleReply,
    ScaleRequest,
    SchedulerLoad,
    decode_json,
)
from gpufaas.shared.registry import FunctionCache, alive
from gpufaas.shared.service import Endpoint, Service, endpoint
from gpufaas.shared.workflows import (
    WorkflowDeleteReply,
    WorkflowDeleteRequest,
    WorkflowDeployReply,
    WorkflowDeployRequest,
    WorkflowInflightRecord,
    WorkflowInvokeReply,
    WorkflowInvokeRequest,
)

log = structlog.get_logger()


class SchedulerService(Service):
    """Deploys, deletes and dispatches invocations; watches node membership.

    A thin front: it wires the parts (request path, failover, autoscaling leader, queue
    views, functions, profiles, workflows), declares the endpoints and runs the loops.
    """

    name = "scheduler"
    node_scoped = False

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.workers: dict[str, float] = {}  # live node -> its worker's start time
        self.replica = f"{config.node_id}/{os.getpid()}/{self.started_at:.6f}"
        self.functions = FunctionCache()  # bound to KV and watched from start on
        self.worker_client = WorkerClient(self)
        self.placer = Placer(self)
        self.profiles = Profiles(self, self.worker_client)
        self.autoscaler = Autoscaler(
            keep_alive_s=config.instance_keep_alive_s, max_instances=config.max_instances
        )
        self.registry = FunctionRegistry(
            self, self.functions, self.placer, self.worker_client, self.profiles
        )
        self.dispatcher = Dispatcher(self, self.registry)
        self.failover = Failover(self, self._rerun)
        self.leadership = Leader(
            self, self.autoscaler, self.profiles, self.registry, self.dispatcher
        )
        self.views = LoadPublisher(self, self.dispatcher, self.leadership)
        self.workflows = Workflows(self, self.dispatcher, self.profiles)

    # --- wiring and lifecycle -------------------------------------------------------------

    async def on_start(self) -> None:
        # Alive and a member before the first request is accepted: a replica that dies
        # before its first tick must still be found, or its callers would wait in vain.
        # Its own subject first: a survivor that finds no responder there takes it for dead.
        # Not among the subscriptions that stop ends first: it lasts while the replica
        # drains, until the connection closes.
        await self.nc.subscribe(
            subjects.scheduler_replica(self.failover.me), cb=self.failover.on_ping
        )
        await self.failover.register()
        self.functions.bind(self.kv.functions)
        self.watch(self.kv.functions, self.functions.on_change, "functions-watch")
        self.workflows.cache.bind(self.kv.workflows)
        self.watch(self.kv.workflows, self.workflows.cache.on_change, "workflows-watch")
        # An event (JSON, from the EVENTS stream's subject), not a request: no endpoint.
        self._subs.append(
            await self.nc.subscribe(subjects.event("memory.rejected"), cb=self._on_rejected)
        )
        self._subs.append(
            await self.nc.subscribe(subjects.event("worker.exited"), cb=self._on_worker_exited)
        )
        self._subs.append(
            await self.nc.subscribe(subjects.WORKERS_RECONNECTED, cb=self._on_worker_reconnected)
        )
        await self.reconcile_once(time.time(), announce=False)
        self.every(
            self.config.heartbeat_s,
            lambda: self.reconcile_once(time.time()),
            "membership",
            backoff_cap=self.config.heartbeat_s,
        )
        self.every(
            self.config.autoscale_interval_s,
            lambda: self.autoscale_once(time.time()),
            "autoscale",
        )

    def endpoints(self) -> list[Endpoint]:
        q = c.SCHEDULER_QUEUE
        return [
            endpoint(subjects.SCHED_DEPLOY, DeployRequest, self.deploy, queue=q),
            endpoint(subjects.SCHED_DELETE, DeleteRequest, self.delete, queue=q),
            endpoint(subjects.SCHED_SCALE, ScaleRequest, self.rescale, queue=q),
            endpoint(subjects.SCHED_INVOKE, InvokeRequest, self.invoke, queue=q),
            endpoint(
                subjects.SCHED_WORKFLOW_DEPLOY, WorkflowDeployRequest, self.workflow_deploy, queue=q
            ),
            endpoint(
                subjects.SCHED_WORKFLOW_DELETE, WorkflowDeleteRequest, self.workflow_delete, queue=q
            ),
            endpoint(
                subjects.SCHED_WORKFLOW_INVOKE, WorkflowInvokeRequest, self.workflow_invoke, queue=q
            ),
            endpoint(subjects.SCHED_LOAD, SchedulerLoad, self._on_load),  # every replica
        ]

    async def on_stop(self) -> None:
        """Leave cleanly: every request was answered (or told we stopped), so this
        replica's records and its name go, and no survivor answers them again."""
        await self.failover.leave()

    # --- membership --------------------------------------------------------------------

    async def reconcile_once(self, now: float, *, announce: bool = True) -> None:
        """Refresh the live worker set; announce nodes whose worker vanished without leaving."""
        nodes = await alive(self.kv.nodes, self.config.node_ttl_s, now)
        current = {
            node: beat.started_at
            for node, beats in nodes.items()
            for beat in beats
            if beat.service == "worker"
        }
        for node, started in self.workers.items():
            if current.get(node) != started:  # its worker (pool) went, with every process
                self.worker_client.lost(node, None, f"{node}/worker@{started}")
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

    async def refresh_workers(self) -> None:
        await self.reconcile_once(time.time(), announce=False)

    async def live_workers(self) -> list[str]:
        if not self.workers:
            await self.refresh_workers()
        if not self.workers:
            raise Unavailable("no node with a worker is up")
        return sorted(self.workers)

    # --- endpoints -----------------------------------------------------------------------

    async def deploy(self, req: DeployRequest) -> DeployReply:
        return await self.registry.deploy(req)

    async def delete(self, req: DeleteRequest) -> DeleteReply:
        return await self.registry.delete(req)

    async def rescale(self, req: ScaleRequest) -> ScaleReply:
        return await self.leadership.rescale(req, time.time())

    async def invoke(self, req: InvokeRequest) -> InvokeReply:
        """Accept an invocation: recorded in KV (with the caller's reply subject) before it
        is queued, forgotten once answered; a replica that outlives us answers it if we die."""

        def run(dispatch_id: str, deadline: float) -> Awaitable[InvokeReply]:
            return self.dispatcher.run(_call(req, deadline, dispatch_id))

        return await self.failover.accepted(InflightRecord, req, run)

    async def workflow_deploy(self, req: WorkflowDeployRequest) -> WorkflowDeployReply:
        return await self.workflows.deploy(req)

    async def workflow_delete(self, req: WorkflowDeleteRequest) -> WorkflowDeleteReply:
        return await self.workflows.delete(req)

    async def workflow_invoke(self, req: WorkflowInvokeRequest) -> WorkflowInvokeReply:
        """Run a workflow (``workflow_run.py``): steps as their inputs become ready, tube ids
        between them, lost intermediates recomputed from the steps that made them. Recorded
        like a function's invocation, so a replica that outlives this one answers it."""

        def run(dispatch_id: str, deadline: float) -> Awaitable[WorkflowInvokeReply]:
            return self.workflows.run(req, dispatch_id, deadline)

        return await self.failover.accepted(WorkflowInflightRecord, req, run)

    async def _rerun(self, record: Record, deadline: float) -> Msg:
        """A dead replica's request, run again here under its dispatch id."""
        if isinstance(record, WorkflowInflightRecord):
            return await self.workflows.run(record.request, record.dispatch_id, deadline)
        return await self.dispatcher.run(_call(record.request, deadline, record.dispatch_id))

    async def _on_load(self, msg: SchedulerLoad) -> SchedulerLoad:
        if msg.replica != self.replica:
            self.leadership.report(msg)
        return msg

    async def _on_rejected(self, msg: NatsMsg) -> None:
        """``memory.rejected``: fail the requests waiting for the function there."""
        try:
            event = decode_json(msg.data, Event)
            ref = from_memory_name(str(event.data["function"]))
            node, reason = str(event.data["node"]), str(event.data["reason"])
        except (PlatformError, KeyError, ValueError):
            return
        await self.dispatcher.rejected(ref, node, reason)

    async def _on_worker_exited(self, msg: NatsMsg) -> None:
        """``worker.exited`` (a node's pool saw a tenant's process die unasked): send the
        requests it had not answered again now, not at their deadlines."""
        if (said := worker_deaths.exited(msg)) is not None:
            self.worker_client.lost(*said)

    async def _on_worker_reconnected(self, msg: NatsMsg) -> None:
        """A worker process's connection came back: send again what it may have missed."""
        if (said := worker_deaths.reconnected(msg)) is not None:
            self.worker_client.reconnected(*said)

    def reconnect_announcement(self) -> tuple[str, Msg] | None:
        """Gateways send again the invocations this replica may have missed."""
        return subjects.SCHED_RECONNECTED, Reconnected()

    # --- autoscaling -----------------------------------------------------------------------

    async def autoscale_once(self, now: float) -> None:
        """One tick: publish this replica's load and queue views, take over dead replicas'
        requests; if leader, scale. Each step in its own error boundary."""
        await self.bounded("tick.views", lambda: self.views.publish(now), None)
        await self.bounded("tick.takeover", lambda: self.failover.take_over(now), None)
        if await self.bounded("tick.lead", self.leadership.lead, False):
            await self.bounded("tick.scale", lambda: self.leadership.tick(now), None)
        else:  # a repository unload this replica did
            await self.bounded("tick.drain", lambda: self.leadership.finish_draining(now), None)

    # --- what tests and tools read -------------------------------------------------------

    @property
    def queues(self) -> dict[str, FunctionQueue]:
        """This replica's queues, by ``FunctionRef.key``."""
        return self.dispatcher.queues

    @property
    def leader(self) -> bool:
        return self.leadership.leader

    @property
    def step_done(self) -> StepDone | None:
        """Called after each workflow step (a test seam: stop a node between two steps)."""
        return self.workflows.step_done

    @step_done.setter
    def step_done(self, hook: StepDone | None) -> None:
        self.workflows.step_done = hook

    async def profile_of(self, tenant: str, name: str) -> ProfileRecord | None:
        return await self.profiles.of(FunctionRef(tenant, name))


def _call(req: InvokeRequest, deadline: float, dispatch_id: str) -> Call:
    return Call(
        FunctionRef(req.tenant, req.function),
        req.request_id,
        req.inputs,
        deadline,
        dispatch_id=dispatch_id,
        grant=True,
        direct=req.direct,
    )
