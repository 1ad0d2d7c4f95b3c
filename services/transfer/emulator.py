"""Copies between the tiers of a simulated node, emulated in real time.

The simulated copy engine (``simengine.py``) runs with its clock tied to the wall clock
(slowed down by DILATION):
a copy submitted now finishes when the link model says it would, *alongside every other
copy in flight* (contention, SLO-aware bandwidth sharing: each transfer's least rate
first, the rest shared fairly), and its bytes land chunk by chunk through the callback,
so the destination is byte-exact when the copy completes. The durations it reports are
simulated (the link model's), never measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from gpufaas.shared.shm import new_id
from gpufaas.transfer.linkmodel import LinkModel
from gpufaas.transfer.links import LinkBytes
from gpufaas.transfer.simengine import CopyFn, SimCopyEngine, SimTransfer, TransferRecord

TICK_S = 0.0005  # how often the clock catches up while copies are in flight
# Simulated time runs this many times slower than the wall clock, so that the CPU's real
# copies (5-8 GB/s on the 2-core box) keep pace with the modelled links (up to 150 GB/s
# of NVLink per GPU): copies that overlap on the links overlap here too. Durations
# reported are simulated time; a copy takes DILATION times longer in wall time.
DILATION = 50.0


class EmulatedCopies:
    """One node's simulated copy engine, advanced in step with the wall clock."""

    def __init__(self, model: LinkModel, moved: LinkBytes | None = None) -> None:
        self.engine = SimCopyEngine(model)
        self.moved = moved if moved is not None else LinkBytes()  # per link, as copies land
        self._t0 = time.monotonic()
        self._waiting: dict[str, asyncio.Future[TransferRecord]] = {}
        self._pump: asyncio.Task[None] | None = None

    def _now(self) -> float:
        return (time.monotonic() - self._t0) / DILATION

    async def copy(
        self,
        src: str,
        dst: str,
        nbytes: int,
        copy: CopyFn,
        *,
        deadline_in_s: float | None = None,
        inference_s: float = 0.0,
    ) -> TransferRecord:
        """Run one copy among the others in flight; returns its (simulated) record."""
        now = self._now()
        self._advance(now)
        tid = new_id(9)
        done: asyncio.Future[TransferRecord] = asyncio.get_running_loop().create_future()
        self._waiting[tid] = done
        deadline = None if deadline_in_s is None else now + deadline_in_s
        try:
            self.engine.submit(
                SimTransfer(tid, src, dst, nbytes, copy, deadline, inference_s), at_s=now
            )
        except BaseException:
            del self._waiting[tid]
            raise
        self._advance(now)  # a copy of nothing is done at once
        if self._pump is None or self._pump.done():
            self._pump = asyncio.create_task(self._pump_loop())
        return await done

    async def close(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump

    def _advance(self, t_s: float) -> None:
        try:
            records = self.engine.run_until(t_s)
        except Exception as exc:  # a failing copy callback: fail every waiter, not hang
            for waiter in self._waiting.values():
                if not waiter.done():
                    waiter.set_exception(exc)
            self._waiting.clear()
            self.engine = SimCopyEngine(self.engine.model)
            return
        self.engine.records.clear()  # returned above; a long-lived service keeps none
        for rec in records:
            for route, nbytes in zip(rec.routes, rec.route_nbytes, strict=True):
                self.moved.add(route.hops, nbytes)
            fut = self._waiting.pop(rec.id) if rec.id in self._waiting else None
            if fut is not None and not fut.done():
                fut.set_result(rec)

    async def _pump_loop(self) -> None:
        while self._waiting:
            await asyncio.sleep(TICK_S)
            self._advance(self._now())
