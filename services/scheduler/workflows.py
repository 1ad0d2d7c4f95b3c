"""Workflows: deploy (validated against the tenant's functions, SLO checked), delete, and
run (``workflow_run.py``) through the request path, one dispatch id per step run."""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping

import nats.errors
import nats.js.errors

from gpufaas.scheduler.dispatch import Call, Dispatcher
from gpufaas.scheduler.host import Host
from gpufaas.scheduler.profiling import Profiles
from gpufaas.scheduler.workflow_locality import InputLocality
from gpufaas.scheduler.workflow_run import WorkflowRun
from gpufaas.shared.errors import AlreadyExists, InvalidArgument, NotFound
from gpufaas.shared.identity import FunctionRef
from gpufaas.shared.messages import InvokeReply, TensorPayload
from gpufaas.shared.registry import Mirror, records
from gpufaas.shared.workflows import (
    WorkflowDeleteReply,
    WorkflowDeleteRequest,
    WorkflowDeployReply,
    WorkflowDeployRequest,
    WorkflowInvokeReply,
    WorkflowInvokeRequest,
    WorkflowRecord,
    WorkflowSpec,
    producers,
    validate_workflow,
)

StepDone = Callable[[str], Awaitable[None]]


def critical_path_s(record: WorkflowRecord, fastest: Mapping[str, float]) -> float:
    """The longest chain of dependent steps, each at its function's ``fastest`` time."""
    spec, deps = record.spec, producers(record.spec)
    finish: dict[str, float] = {}
    for name in record.order:
        step = next(s for s in spec.steps if s.name == name)
        finish[name] = max((finish[d] for d in deps[name]), default=0.0) + fastest[step.function]
    return max(finish.values(), default=0.0)


class Workflows:
    """Workflow records (``workflows`` bucket) and their runs."""

    def __init__(self, host: Host, dispatcher: Dispatcher, profiles: Profiles) -> None:
        self.host = host
        self.dispatcher = dispatcher
        self.profiles = profiles
        self.locality = InputLocality(host, dispatcher.registry)
        # The records, watched (bound at start): a run reads its record without a round trip.
        self.cache: Mirror[WorkflowRecord] = Mirror()
        # Called after each workflow step (a test seam: stop a node between two steps).
        self.step_done: StepDone | None = None

    async def record(self, ref: FunctionRef) -> WorkflowRecord | None:
        """The workflow's record in KV (deploy and delete decide on the stored one)."""
        return await self.host.kv.workflows.value(ref.key)

    async def deploy(self, req: WorkflowDeployRequest) -> WorkflowDeployReply:
        """Validate a workflow against its tenant's functions and record it (all or nothing)."""
        spec = req.spec
        ref = FunctionRef(spec.tenant, spec.name)
        functions = await records(self.host.kv.functions, spec.tenant)
        record = validate_workflow(spec, {r.spec.name: r for r in functions}, now=time.time())
        if spec.slo_ms is not None:
            await self._check_slo(record)
        existing = await self.record(ref)
        if existing is not None:
            if existing.spec == record.spec:
                return WorkflowDeployReply(workflow=existing, created=False)
            raise AlreadyExists(
                f"workflow {spec.name!r} exists with another spec; delete it first", field="name"
            )
        created = await self.host.kv.workflows.create(ref.key, record)
        if created is not None:
            self.cache.put(ref.key, record)
        else:
            winner = await self.record(ref)
            if winner is not None and winner.spec == record.spec:
                return WorkflowDeployReply(workflow=winner, created=False)
            raise AlreadyExists(f"workflow {spec.name!r} was deployed concurrently", field="name")
        await self.host.publish_event(
            "workflow.deployed",
            {"workflow": spec.name, "tenant": spec.tenant, "order": record.order},
        )
        return WorkflowDeployReply(workflow=record, created=True)

    async def _check_slo(self, record: WorkflowRecord) -> None:
        """Refuse a workflow whose SLO is shorter than its critical path at batch 1 (each
        step's fastest profiled batch, along the longest chain of dependent steps)."""
        spec = record.spec
        assert spec.slo_ms is not None
        fastest: dict[str, float] = {}
        for step in spec.steps:
            if step.function not in fastest:
                profile = await self.profiles.of(FunctionRef(spec.tenant, step.function))
                times = [p.latency_s for p in profile.points] if profile else []
                fastest[step.function] = min(times, default=0.0)
        path_ms = critical_path_s(record, fastest) * 1e3
        if path_ms > spec.slo_ms:
            raise InvalidArgument(
                f"no configuration meets slo_ms={spec.slo_ms:g}: the steps' fastest runs, "
                f"one after another along the longest chain, take {path_ms:.1f} ms",
                field="slo_ms",
            )

    async def delete(self, req: WorkflowDeleteRequest) -> WorkflowDeleteReply:
        ref = FunctionRef(req.tenant, req.name)
        if await self.record(ref) is None:
            raise NotFound(f"workflow {req.name!r} not found", field="name")
        await self.host.kv.workflows.delete(ref.key)
        self.cache.drop(ref.key)
        await self.host.publish_event(
            "workflow.deleted", {"workflow": req.name, "tenant": req.tenant}
        )
        return WorkflowDeleteReply(name=req.name)

    async def run(
        self, req: WorkflowInvokeRequest, dispatch_id: str, deadline: float
    ) -> WorkflowInvokeReply:
        """Each step's n-th run is dispatched as ``<dispatch_id>.<step>.<n>``: run again by a
        replica taking over, a step already sent is answered from its worker's memory; a
        step run again to recompute a lost output (lineage) gets a new id, so it runs."""
        wf = await self.cache.record(FunctionRef(req.tenant, req.workflow))
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
            ref = FunctionRef(req.tenant, function)
            await self.locality.bring(ref, inputs, prefer)
            call = Call(
                ref,
                f"{req.request_id}.{step}",
                inputs,
                deadline,
                intermediate=intermediate,
                prefer=prefer,
                dispatch_id=f"{dispatch_id}.{step}.{runs[step]}",
            )
            reply = await self.dispatcher.run(call)
            self.locality.observe(ref, inputs, reply)
            return reply

        run = WorkflowRun(wf, req, invoke, self._lost_steps, self.step_done)
        try:
            return await run.run()
        finally:
            self.host.after_reply(self._drop_intermediates(run.intermediates()))

    async def _lost_steps(
        self, spec: WorkflowSpec, step: str, produced: Mapping[str, Mapping[str, TensorPayload]]
    ) -> set[str]:
        """The producers of ``step`` whose output tubes have no copy on a live node left."""
        await self.host.refresh_workers()
        lost = set()
        for producer in producers(spec)[step]:
            for out in produced.get(producer, {}).values():
                if out.tube is None:
                    continue
                tube = await self.host.kv.tubes.value(out.tube.id)
                if tube is None or not any(
                    p.node in self.host.workers or p.tier == "object" for p in tube.placements
                ):
                    lost.add(producer)
        return lost

    async def _drop_intermediates(self, tubes: list[str]) -> None:
        """Forget a finished workflow's intermediate tubes (each holder's sweeper frees them)."""
        for tube_id in tubes:
            with contextlib.suppress(nats.errors.Error, nats.js.errors.Error):
                await self.host.kv.tubes.delete(tube_id)
