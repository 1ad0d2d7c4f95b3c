"""Workflow steps near their inputs: a step's function is scaled out to the node that holds
its input tubes when that costs less than copying them (``placement.bring_to_inputs``).

A step whose input tubes lie on a node without an instance of its function runs where
the function's instances are, and its worker copies the tubes there (its reply's
``transfer_us``). The copy time paid is added up per function and node; once it, with
the next copy's estimate, reaches a cold start, the function gets an instance on that
node and later steps read their inputs where they are. Both sides are measured: the
link's rate from the copies paid, a cold start from the function's last one (defaults in
``shared/constants.py`` until then). Inline inputs travel in the dispatch: nothing to weigh.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

import structlog

from gpufaas.scheduler.functions import FunctionRegistry, scaled
from gpufaas.scheduler.host import Host
from gpufaas.scheduler.placement import bring_to_inputs
from gpufaas.scheduler.placer import Where, inputs_at
from gpufaas.shared import constants as c
from gpufaas.shared.errors import PlatformError
from gpufaas.shared.identity import FunctionRef
from gpufaas.shared.messages import FunctionRecord, InvokeReply, TensorPayload

log = structlog.get_logger()


def bytes_away(inputs: Iterable[TensorPayload], nodes: Iterable[str]) -> int:
    """Bytes of the input tubes with no copy on any of ``nodes`` (what a step run there
    copies in)."""
    where = set(nodes)
    return sum(
        p.tube.nbytes
        for p in inputs
        if p.tube is not None and not any(pl.node in where for pl in p.tube.placements)
    )


class InputLocality:
    """Copy time paid per (function, node holding the inputs), and the scale-outs it buys."""

    def __init__(self, host: Host, registry: FunctionRegistry) -> None:
        self.host = host
        self.registry = registry
        self.paid: dict[tuple[str, str], float] = {}  # (function key, node) -> seconds
        self.cold_s: dict[str, float] = {}  # function key -> its last cold start
        self.link_bps = c.WORKFLOW_LINK_BYTES_PER_S  # a moving average of copies measured
        self._bringing: dict[tuple[str, str], asyncio.Task[None]] = {}

    async def bring(self, ref: FunctionRef, inputs: list[TensorPayload], near: str | None) -> None:
        """Before a step runs on ``inputs`` (tubes on ``near``): give its function an
        instance on ``near`` when it has live ones only elsewhere and the copies paid,
        with this one, cost as much as a cold start there. Never fails the step."""
        if near is None or near not in self.host.workers:
            return
        record = await self.registry.cache.record(ref)
        if record is None:  # gone: the dispatch answers why
            self.forget(ref)
            return
        live = [n for n in record.nodes if n in self.host.workers]
        if not live or near in live:  # none (a cold start places it) or there already
            return
        key = (ref.key, near)
        next_copy_s = bytes_away(inputs, live) / self.link_bps
        cold_s = self.cold_s.get(ref.key, c.WORKFLOW_COLD_START_S)
        if not bring_to_inputs(self.paid.get(key, 0.0), next_copy_s, cold_s):
            return
        if len(live) >= self.host.config.max_instances or not await self.registry.room_for(
            record, len(live) + 1
        ):
            return
        task = self._bringing.get(key)
        if task is None:
            where = inputs_at([p.tube for p in inputs if p.tube is not None], near)
            task = asyncio.ensure_future(self._scale_out(record, near, where, live, cold_s))
            self._bringing[key] = task
            task.add_done_callback(lambda _: self._bringing.pop(key, None))
        await asyncio.shield(task)  # a caller that gives up leaves it to the others

    async def _scale_out(
        self,
        record: FunctionRecord,
        node: str,
        where: Where | None,
        live: list[str],
        cold_s: float,
    ) -> None:
        """An instance on ``node``: on the GPU that holds the inputs (``where``), else the
        nearest to it by placement's order (an NVLink neighbour first)."""
        spec, key = record.spec, FunctionRef(record.spec.tenant, record.spec.name).key
        paid = self.paid.get((key, node), 0.0)
        t0 = time.perf_counter()
        try:
            at = await self.registry.placer.place(spec, near=where, on=node)
            if at.node != node:
                return  # gone meanwhile: the step runs where the function is
            await self.registry.load(node, spec, at.gpu)
            updated = await self.registry.add_instance(spec, node, at.gpu, lambda n: True)
        except PlatformError as exc:  # the step runs where the function is
            log.warning("workflow.bring_failed", function=spec.name, node=node, error=exc.message)
            return
        self.cold_s[key] = time.perf_counter() - t0
        self.paid.pop((key, node), None)
        if updated is None:
            return
        reason = (
            f"workflow inputs on {node}: copies there cost {paid * 1e3:.1f} ms so far, "
            f"a cold start about {cold_s * 1e3:.0f} ms"
        )
        await self.host.publish_event("function.scaled", scaled(spec, len(live), updated, reason))

    def observe(self, ref: FunctionRef, inputs: list[TensorPayload], reply: InvokeReply) -> None:
        """A step's reply: its cold start, or the copy it paid for inputs held elsewhere."""
        b = reply.breakdown
        if b.cold:
            self.cold_s[ref.key] = b.load_us / 1e6
        moved = bytes_away(inputs, [reply.node])
        if not moved or b.transfer_us <= 0:
            return
        source = next(
            (
                pl.node
                for p in inputs
                if p.tube is not None and p.tube.placements
                for pl in p.tube.placements
            ),
            None,
        )
        if source is None:  # its only copy was on the object tier: no node to bring it to
            return
        seconds = b.transfer_us / 1e6
        key = (ref.key, source)
        self.paid[key] = self.paid.get(key, 0.0) + seconds
        self.link_bps = 0.8 * self.link_bps + 0.2 * (moved / seconds)

    def forget(self, ref: FunctionRef) -> None:
        """Drop what is known of a function that is gone."""
        self.cold_s.pop(ref.key, None)
        for key in [k for k in self.paid if k[0] == ref.key]:
            del self.paid[key]
