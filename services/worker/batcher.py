"""Dynamic batching on a worker's device, and the answers kept by dispatch id.

Ready requests wait in one queue ordered by deadline slack; the dispatcher starts a batch
(the head request and its instance's other ready requests that fit) whenever the device
has a free stream, and runs it through an injected ``execute`` (the device's executor in
the worker, a fake in tests). The clock is injected too, so the bounded wait of an idle
device is tested without sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import math
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from gpufaas.shared.errors import DeadlineExceeded, Unavailable
from gpufaas.shared.messages import WorkerRunRequest
from gpufaas.worker.instances import Instance
from gpufaas.worker.runners import Inputs, Output, merge, rows, split

ANSWERS_KEPT = 4096  # answers kept by dispatch id for repeats (see Answers)

Infer = Callable[[Inputs], dict[str, Output]]
# Runs a runner's ``infer`` over inputs off the event loop (the device's own thread).
Execute = Callable[[Infer, Inputs], Awaitable[dict[str, Output]]]
T = TypeVar("T")
A = TypeVar("A")


class Clock(Protocol):
    """What the batcher reads time from (a fake one in tests)."""

    def time(self) -> float:
        """Wall-clock seconds: what deadlines are in."""

    def monotonic(self) -> float:
        """Seconds for intervals: queueing and compute times."""

    async def wait(self, event: asyncio.Event, timeout: float) -> None:
        """Until ``event`` is set or ``timeout`` seconds have passed."""


class SystemClock:
    """The real clocks; ``wait`` is the event loop's timer."""

    @staticmethod
    def time() -> float:
        return time.time()

    @staticmethod
    def monotonic() -> float:
        return time.monotonic()

    @staticmethod
    async def wait(event: asyncio.Event, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)


@dataclass(slots=True)
class Ready:
    """A request waiting for the device, ordered by slack then arrival."""

    slack: float
    seq: int
    inst: Instance
    inputs: Inputs
    rows: int
    queued_at: float  # clock.monotonic()
    fut: asyncio.Future[dict[str, Output]]
    max_batch: int  # rows its instance's batches may hold
    deadline: float = math.inf  # clock.time(); past it, dropped without computing
    batch: int = 1  # requests in the batch it ran in

    def __lt__(self, other: Ready) -> bool:
        return (self.slack, self.seq) < (other.slack, other.seq)


class Batcher:
    """The device's ready queue and the dispatcher that runs it in batches."""

    def __init__(
        self,
        execute: Execute,
        *,
        streams: int,
        batch_wait_s: float,
        clock: Clock | None = None,
    ) -> None:
        self.execute = execute
        self.streams = streams  # batches the device runs at once
        self.batch_wait_s = batch_wait_s
        self.clock: Clock = clock or SystemClock()
        self.ready: list[Ready] = []
        self._seq = itertools.count()
        self._wake = asyncio.Event()  # a request arrived or a batch finished
        self._dispatcher: asyncio.Task[None] | None = None
        self.computed = 0  # requests handed to ``execute`` (retries of a failed batch too)
        self.expired = 0  # requests dropped uncomputed: their deadline passed first

    async def compute(self, inst: Instance, req: WorkerRunRequest, inputs: Inputs) -> Ready:
        """Queue a request for its instance's next batch; returns it once computed.

        Ready requests are ordered by deadline slack (the deadline minus the instance's
        moving-average batch time), so a short urgent request is not stuck behind a long
        batch that arrived first; without a deadline a request waits behind every one that
        has one. The dispatcher batches a request with the other ready requests of its
        instance (dynamic batching, up to the profile's batch size). A request whose
        deadline passes before its batch starts gets ``DeadlineExceeded``, uncomputed:
        nobody waits for its answer, and it would delay the requests behind it.
        """
        if req.deadline and req.deadline <= self.clock.time():
            self.expired += 1
            raise DeadlineExceeded(f"request {req.request_id} arrived past its deadline")
        item = Ready(
            slack=(req.deadline or math.inf) - inst.compute_s,
            seq=next(self._seq),
            inst=inst,
            inputs=inputs,
            rows=rows(inputs),
            queued_at=self.clock.monotonic(),
            fut=asyncio.get_running_loop().create_future(),
            max_batch=max(1, req.max_batch or req.spec.options.max_batch_size),
            deadline=req.deadline or math.inf,
        )
        if req.concurrency:
            inst.concurrency = min(req.concurrency, self.streams)
        heapq.heappush(self.ready, item)
        self._wake.set()
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = asyncio.create_task(self._dispatch())
        await item.fut
        return item

    async def stop(self) -> None:
        """Stop dispatching; every request still waiting hears why (never silence)."""
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            await asyncio.gather(self._dispatcher, return_exceptions=True)
        for r in self.ready:
            if not r.fut.done():
                r.fut.set_exception(Unavailable("the worker is stopping"))
        self.ready.clear()

    async def _dispatch(self) -> None:
        """Start batches while the device has a free stream, in slack order (see compute).

        An idle device waits up to ``batch_wait_s`` for the head request's batch to fill,
        never past that request's slack; a busy one does not wait (requests gather while
        the running batches compute).
        """
        running: set[asyncio.Task[None]] = set()
        try:
            while self.ready or running:
                self._wake.clear()
                head = self._next_head(running)
                if head is not None and not running:
                    wait = self._fill_wait(head, self.clock.monotonic())
                    if wait > 0:
                        await self.clock.wait(self._wake, wait)
                        continue
                if head is not None:
                    batch = self._take_batch(head)
                    head.inst.streams += 1
                    task = asyncio.create_task(self._run_batch(batch))
                    running.add(task)
                    task.add_done_callback(running.discard)
                    continue
                waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(self._wake.wait())]
                await asyncio.wait([*running, *waits], return_when=asyncio.FIRST_COMPLETED)
                for w in waits:
                    w.cancel()
        finally:
            for task in running:
                task.cancel()

    def _next_head(self, running: set[asyncio.Task[None]]) -> Ready | None:
        """The most urgent ready request that may start now (a free stream, its instance
        under its concurrency), dropping cancelled and expired ones; None if none may."""
        self._expire(self.clock.time())
        while self.ready and self.ready[0].fut.done():
            heapq.heappop(self.ready)
        if len(running) >= self.streams:
            return None
        return next(
            (
                r
                for r in sorted(self.ready)
                if not r.fut.done() and r.inst.streams < r.inst.concurrency
            ),
            None,
        )

    def _expire(self, now: float) -> None:
        """Answer the ready requests whose deadline has passed with ``DeadlineExceeded``."""
        for r in self.ready:
            if r.deadline <= now and not r.fut.done():
                r.fut.set_exception(DeadlineExceeded("the request's deadline passed in the queue"))
                self.expired += 1

    def _fill_wait(self, head: Ready, now: float) -> float:
        """How much longer an idle device should wait for ``head``'s batch to fill.

        It waits for as many rows as the instance's last batch held, never more than its
        batch size: the callers of a batch that just finished tend to come back together
        (closed-loop clients, a workflow's fan-out), so an idle device waits briefly for
        them rather than running the first alone and the rest behind it. An instance whose
        last batch held one row does not wait at all: a lone caller pays no batching
        delay, and concurrent arrivals still form batches behind a running one (a busy
        device never waits), after which the device waits for that many again.
        """
        if not head.inst.runner.batchable or head.max_batch <= 1:
            return 0.0
        want = min(head.max_batch, head.inst.last_rows)
        if head.rows >= want:
            return 0.0
        queued = sum(r.rows for r in self.ready if r.inst is head.inst and not r.fut.done())
        if queued >= want:
            return 0.0
        budget = self.batch_wait_s - (now - head.queued_at)
        if head.slack != math.inf:  # never wait past the request's slack
            budget = min(budget, head.slack - self.clock.time())
        return max(budget, 0.0)

    def _take_batch(self, head: Ready) -> list[Ready]:
        """``head`` and, in slack order, its instance's other ready requests that fit."""
        batch, rest, total = [head], [], head.rows
        for r in sorted(self.ready):
            if r is head or r.fut.done():
                continue
            if (
                r.inst is head.inst
                and head.inst.runner.batchable
                and total + r.rows <= head.max_batch
            ):
                batch.append(r)
                total += r.rows
            else:
                rest.append(r)
        self.ready[:] = rest
        heapq.heapify(self.ready)
        return batch

    async def _run_batch(self, batch: list[Ready]) -> None:
        """Compute one batch and hand each request its own rows.

        A batch that fails is retried one request at a time, so each caller gets its own
        result or its own error (one bad input does not fail its neighbours).
        """
        inst = batch[0].inst
        try:
            if len(batch) > 1 and await self._run_together(batch):
                return
            for r in batch:  # inline, not a helper: the one-request batch is the hot path
                if r.fut.done():
                    continue
                t0 = self.clock.monotonic()
                self.computed += 1
                try:
                    result = await self.execute(inst.runner.infer, r.inputs)
                except Exception as exc:  # the request's own error: its caller gets it
                    if not r.fut.done():
                        r.fut.set_exception(exc)
                    continue
                inst.compute_s = 0.8 * inst.compute_s + 0.2 * (self.clock.monotonic() - t0)
                inst.last_rows = r.rows
                if not r.fut.done():
                    r.fut.set_result(result)
        finally:
            inst.streams -= 1
            self._wake.set()

    async def _run_together(self, batch: list[Ready]) -> bool:
        """Run ``batch`` as one call; False if it failed (some request's own fault)."""
        inst = batch[0].inst
        t0 = self.clock.monotonic()
        try:
            merged = merge([r.inputs for r in batch])
            self.computed += len(batch)
            out = await self.execute(inst.runner.infer, merged)
            parts = split(out, [r.rows for r in batch])
        except Exception:  # find out whose, one by one
            return False
        inst.compute_s = 0.8 * inst.compute_s + 0.2 * (self.clock.monotonic() - t0)
        inst.last_rows = sum(r.rows for r in batch)
        for r, result in zip(batch, parts, strict=True):
            r.batch = len(batch)
            if not r.fut.done():
                r.fut.set_result(result)
        return True


class Answers(Generic[T]):
    """Answers by dispatch id, so that a request sent again (a scheduler replica taking
    over a dead one's) is answered, not run twice: the running ones, the last answers."""

    def __init__(self, kept: int = ANSWERS_KEPT) -> None:
        self.kept = kept
        self.running: dict[str, asyncio.Task[T]] = {}
        self.done: dict[str, T] = {}
        self.repeats = 0  # dispatches answered without running again

    def answer(
        self, dispatch_id: str, run: Callable[[A], Coroutine[Any, Any, T]], arg: A
    ) -> Awaitable[T]:
        """The answer of ``dispatch_id``: remembered, being computed, or ``run(arg)`` now.

        Not a coroutine (no await of its own on the hot path): await what it returns.
        """
        done = self.done.get(dispatch_id)
        if done is not None:
            self.repeats += 1
            fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
            fut.set_result(done)
            return fut
        task = self.running.get(dispatch_id)
        if task is None:
            task = asyncio.create_task(run(arg))
            self.running[dispatch_id] = task
            task.add_done_callback(lambda t: self._remember(dispatch_id, t))
        else:
            self.repeats += 1
        return asyncio.shield(task)

    def _remember(self, dispatch_id: str, task: asyncio.Task[T]) -> None:
        self.running.pop(dispatch_id, None)
        if not task.cancelled() and task.exception() is None:
            self.done[dispatch_id] = task.result()
            while len(self.done) > self.kept:
                del self.done[next(iter(self.done))]

    async def stop(self) -> None:
        """Cancel the answers being computed and wait for them to end."""
        tasks = list(self.running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
