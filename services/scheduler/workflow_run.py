"""One run of a workflow: its steps as their inputs become ready, with lineage recompute.

A step's outputs up to the inline threshold travel in its reply and the next step's
dispatch (no tube, never lost); bigger ones are tube ids: a step whose outputs feed other
steps asks for them as intermediates (tubes kept on its GPU tier), and the consuming step
prefers the node that holds them (``workflow_locality.py``: scaled out there when that
is cheaper than copying them). When a step fails because an input tube was lost with its node, the
steps that produced it (and, transitively, their lost inputs) are run again in order and
the step retried, instead of failing the workflow.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

import structlog
from msgspec.structs import replace

from gpufaas.shared.errors import InvalidArgument, NotFound
from gpufaas.shared.messages import InvokeReply, TensorPayload
from gpufaas.shared.workflows import (
    StepReport,
    WorkflowInvokeReply,
    WorkflowInvokeRequest,
    WorkflowRecord,
    WorkflowSpec,
    lineage,
    parse_ref,
    ready_steps,
)

log = structlog.get_logger()

ATTEMPTS = 3  # runs of a step whose inputs keep getting lost, before its error stands


class Invoke(Protocol):
    """Runs one step's function through the scheduler's queues."""

    def __call__(
        self,
        function: str,
        step: str,
        inputs: list[TensorPayload],
        *,
        intermediate: bool,
        prefer: str | None,
    ) -> Awaitable[InvokeReply]: ...


LostSteps = Callable[
    [WorkflowSpec, str, Mapping[str, Mapping[str, TensorPayload]]], Awaitable[set[str]]
]


class WorkflowRun:
    """The state of one workflow invocation: what each step produced and how it ran."""

    def __init__(
        self,
        record: WorkflowRecord,
        req: WorkflowInvokeRequest,
        invoke: Invoke,
        lost_steps: LostSteps,
        step_done: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self.record, self.spec, self.req = record, record.spec, req
        self._invoke, self._lost_steps, self._step_done = invoke, lost_steps, step_done
        self.given = {p.name: p for p in req.inputs}
        self.steps = {s.name: s for s in self.spec.steps}
        self.final = {parse_ref(r).step for r in (self.spec.outputs or {}).values()}
        self.produced: dict[str, dict[str, TensorPayload]] = {}
        self.reports: dict[str, StepReport] = {}

    def value(self, ref: str) -> TensorPayload:
        r = parse_ref(ref)
        return self.given[r.name] if r.step is None else self.produced[r.step][r.name]

    def intermediates(self) -> list[str]:
        """Ids of the tubes steps passed to each other (not the workflow's outputs)."""
        return [
            o.tube.id
            for step, outs in self.produced.items()
            if step not in self.final
            for o in outs.values()
            if o.tube is not None
        ]

    async def run(self) -> WorkflowInvokeReply:
        t0 = time.perf_counter()
        for t in self.record.inputs:
            if t.name not in self.given:
                raise InvalidArgument(f"input {t.name!r} is missing", field=f"inputs[{t.name}]")
        done: set[str] = set()
        running: dict[str, asyncio.Task[None]] = {}
        try:
            while len(done) < len(self.record.order):
                for name in ready_steps(self.record, self.spec, done):
                    if name not in running:
                        running[name] = asyncio.create_task(self._with_lineage(name))
                finished, _ = await asyncio.wait(
                    running.values(), return_when=asyncio.FIRST_COMPLETED
                )
                for name, task in list(running.items()):
                    if task in finished:
                        task.result()  # a step's error is the workflow's
                        done.add(name)
                        del running[name]
        finally:
            for task in running.values():
                task.cancel()
            await asyncio.gather(*running.values(), return_exceptions=True)
        outputs = [
            replace(self.value(ref), name=out) for out, ref in (self.spec.outputs or {}).items()
        ]
        return WorkflowInvokeReply(
            workflow=self.spec.name,
            request_id=self.req.request_id,
            outputs=outputs,
            steps=[self.reports[s] for s in self.record.order],
            total_us=int((time.perf_counter() - t0) * 1e6),
        )

    async def _with_lineage(self, name: str) -> None:
        for attempt in range(ATTEMPTS):
            try:
                await self._step(name)
            except NotFound:  # an input tube gone with its node?
                lost = await self._lost_steps(self.spec, name, self.produced)
                if not lost or attempt == ATTEMPTS - 1:
                    raise
                order = self.record.order
                redo = sorted(
                    {s for p in lost for s in lineage(self.spec, p, lost)}, key=order.index
                )
                log.warning("workflow.recompute", workflow=self.spec.name, step=name, redo=redo)
                for again in redo:
                    await self._step(again)
            else:
                return

    async def _step(self, name: str) -> None:
        step = self.steps[name]
        inputs = [replace(self.value(ref), name=inp) for inp, ref in step.inputs.items()]
        near = [pl.node for p in inputs if p.tube for pl in p.tube.placements]
        reply = await self._invoke(
            step.function,
            name,
            inputs,
            intermediate=name not in self.final,
            prefer=near[0] if near else None,
        )
        self.produced[name] = {o.name: o for o in reply.outputs}
        tiers = sorted({pl.tier for o in reply.outputs if o.tube for pl in o.tube.placements})
        self.reports[name] = StepReport(
            step=name,
            function=step.function,
            node=reply.node,
            device=reply.device,
            breakdown=reply.breakdown,
            runs=self.reports[name].runs + 1 if name in self.reports else 1,
            output_tiers=tiers or ["inline"],
        )
        if self._step_done is not None:
            await self._step_done(name)
