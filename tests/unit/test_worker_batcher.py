"""The worker's batcher and answer cache, with a fake clock and a fake device: batches up
to the batch size, the bounded wait of an idle device, slack order, a failing batch
retried per request, concurrency limits, a repeated dispatch answered from memory."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest

from gpufaas.shared.errors import DeadlineExceeded, InvalidArgument, Unavailable
from gpufaas.shared.messages import FunctionSpec, ModelSource, TensorSpec, WorkerRunRequest
from gpufaas.shared.tensors import decode_bytes_elements, encode_bytes_elements
from gpufaas.worker.batcher import Answers, Batcher, Infer, Ready
from gpufaas.worker.instances import Instance
from gpufaas.worker.runners import Inputs, Output, Runner
from tests.support import eventually

pytestmark = pytest.mark.unit

T0 = 1_000_000.0


class FakeClock:
    """Time moves only when the test says; ``wait`` ends on its event or a due timer."""

    def __init__(self) -> None:
        self.now = T0
        self.timeouts: list[float] = []  # every bounded wait asked for
        self._timers: list[tuple[float, asyncio.Future[Any]]] = []

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now

    @property
    def waiting(self) -> int:
        return sum(not f.done() for _, f in self._timers)

    async def wait(self, event: asyncio.Event, timeout: float) -> None:
        self.timeouts.append(timeout)
        timer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._timers.append((self.now + timeout, timer))
        woken: asyncio.Future[Any] = asyncio.ensure_future(event.wait())
        try:
            await asyncio.wait([woken, timer], return_when=asyncio.FIRST_COMPLETED)
        finally:
            woken.cancel()
            timer.cancel()
            self._timers = [(d, f) for d, f in self._timers if f is not timer]

    def advance(self, dt: float) -> None:
        self.now += dt
        for due, timer in self._timers:
            if due <= self.now and not timer.done():
                timer.set_result(None)


class FakeDevice:
    """The batcher's executor: each call waits for the test to let it go (when held),
    takes ``took`` seconds of fake time, and counts how many run at once."""

    def __init__(self, clock: FakeClock, *, held: bool = True, took: float = 0.0) -> None:
        self.clock, self.held, self.took = clock, held, took
        self.gates: list[asyncio.Event] = []
        self.running = 0
        self.peak = 0

    async def execute(self, infer: Infer, inputs: Inputs) -> dict[str, Output]:
        self.running += 1
        self.peak = max(self.peak, self.running)
        gate = asyncio.Event()
        self.gates.append(gate)
        try:
            if self.held:
                await gate.wait()
            self.clock.advance(self.took)
            return infer(inputs)
        finally:
            self.running -= 1

    @property
    def started(self) -> int:
        return len(self.gates)

    def release_one(self) -> None:
        next(g for g in self.gates if not g.is_set()).set()

    def release(self) -> None:
        self.held = False
        for g in self.gates:
            g.set()


class Doubler:
    """Batchable: ``x`` (BYTES [N]) -> ``y`` (INT32 [N], each element's length x2); records
    each call's rows; an element ``b"bad"`` fails the whole call."""

    batchable = True

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.inputs = [TensorSpec(name="x", datatype="BYTES", shape=[-1])]
        self.outputs = [TensorSpec(name="y", datatype="INT32", shape=[-1])]

    def infer(self, inputs: Inputs) -> dict[str, Output]:
        shape, raw = inputs["x"]
        items = decode_bytes_elements(raw, shape[0])
        self.batches.append(len(items))
        if b"bad" in items:
            raise InvalidArgument("bad element", field="inputs[x]")
        data = b"".join((2 * len(i)).to_bytes(4, "little") for i in items)
        return {"y": Output("INT32", [len(items)], data)}

    def sample(self, batch: int) -> Inputs:
        return text(*[b"s"] * batch)


class Recorder:
    """Not batchable: records the name of each request's only input, in run order."""

    batchable = False

    def __init__(self) -> None:
        self.order: list[str] = []
        self.inputs: list[TensorSpec] = []
        self.outputs: list[TensorSpec] = []

    def infer(self, inputs: Inputs) -> dict[str, Output]:
        (name,) = inputs
        self.order.append(name)
        return {}

    def sample(self, batch: int) -> Inputs:
        return {}


def text(*items: bytes) -> Inputs:
    return {"x": ([len(items)], encode_bytes_elements(items))}


def named(name: str) -> Inputs:
    return {name: ([], b"")}


def request(
    deadline: float = 0.0, *, max_batch: int | None = None, concurrency: int | None = None
) -> WorkerRunRequest:
    spec = FunctionSpec(tenant="t", name="f", model=ModelSource(builtin="all-minilm-l6-v2"))
    return WorkerRunRequest(
        spec=spec,
        request_id="r",
        inputs=[],
        deadline=deadline,
        max_batch=max_batch,
        concurrency=concurrency,
    )


def instance(runner: Runner, name: str = "f", compute_s: float = 0.0) -> Instance:
    spec = FunctionSpec(tenant="t", name=name, model=ModelSource(builtin="all-minilm-l6-v2"))
    return Instance(
        spec=spec,
        runner=runner,
        device="cpu",
        model_bytes=0,
        tensor_count=0,
        bytes_stored=0,
        bytes_deduplicated=0,
        load_us=0,
        tensors=[],
        held=frozenset(),
        compute_s=compute_s,
    )


def batcher(
    clock: FakeClock, device: FakeDevice, *, streams: int = 1, batch_wait_s: float = 0.0
) -> Batcher:
    return Batcher(device.execute, streams=streams, batch_wait_s=batch_wait_s, clock=clock)


def lengths(ready: Ready) -> list[int]:
    out = ready.fut.result()["y"]
    raw = bytes(out.data)
    return [int.from_bytes(raw[i : i + 4], "little") // 2 for i in range(0, len(raw), 4)]


async def test_requests_queued_behind_a_batch_run_together_up_to_the_batch_size() -> None:
    clock = FakeClock()
    device = FakeDevice(clock)
    b = batcher(clock, device)
    runner = Doubler()
    inst = instance(runner)
    first = asyncio.create_task(b.compute(inst, request(max_batch=4), text(b"a")))
    await eventually(lambda: device.started == 1, what="the first batch holding the device")
    queued = [
        asyncio.create_task(b.compute(inst, request(max_batch=4), text(*xs)))
        for xs in ([b"bb", b"ccc"], [b"d"], [b"eeee"], [b"ff", b"g"])
    ]
    await eventually(lambda: len(b.ready) == 4, what="the others queued")
    device.release()
    done = await asyncio.gather(first, *queued)
    # 2 + 1 + 1 rows fill a batch of 4; the last request (2 rows) runs in the next one.
    assert runner.batches == [1, 4, 2]
    assert [r.batch for r in done] == [1, 3, 3, 3, 1]
    assert [lengths(r) for r in done] == [[1], [2, 3], [1], [4], [2, 1]]
    assert clock.timeouts == []  # a busy device never waits to fill a batch


async def test_a_lone_caller_pays_no_batching_delay() -> None:
    clock = FakeClock()
    device = FakeDevice(clock, held=False)
    b = batcher(clock, device, batch_wait_s=5.0)
    runner = Doubler()
    inst = instance(runner)  # its last batch held one row (a new instance)
    for _ in range(3):
        assert (await b.compute(inst, request(max_batch=3), text(b"x"))).batch == 1
    assert clock.timeouts == []  # one caller at a time: the device never waited
    assert runner.batches == [1, 1, 1]


async def test_an_idle_device_waits_for_a_batch_to_fill_but_no_longer_than_batch_wait() -> None:
    clock = FakeClock()
    device = FakeDevice(clock, held=False)
    b = batcher(clock, device, batch_wait_s=5.0)
    runner = Doubler()
    inst = instance(runner)
    inst.last_rows = 3  # its last batch was full: its callers come back together
    alone = asyncio.create_task(b.compute(inst, request(max_batch=3), text(b"x")))
    await eventually(lambda: clock.waiting, what="the idle device waiting")
    assert clock.timeouts == [5.0]
    assert device.started == 0
    clock.advance(4.9)
    assert device.started == 0
    clock.advance(0.1)  # the wait is over: the batch runs as it is
    assert (await alone).batch == 1
    assert runner.batches == [1]
    assert inst.last_rows == 1  # so the next lone request would not wait

    inst.last_rows = 3
    jobs = [asyncio.create_task(b.compute(inst, request(max_batch=3), text(b"y")))]
    await eventually(lambda: clock.waiting, what="the idle device waiting again")
    jobs += [asyncio.create_task(b.compute(inst, request(max_batch=3), text(b"z"))) for _ in "ab"]
    done = await asyncio.gather(*jobs)  # full at 3 rows: runs at once, no time passed
    assert runner.batches == [1, 3]
    assert [r.batch for r in done] == [3, 3, 3]


async def test_an_idle_device_never_waits_past_the_head_requests_slack() -> None:
    clock = FakeClock()
    device = FakeDevice(clock, held=False)
    b = batcher(clock, device, batch_wait_s=5.0)
    inst = instance(Doubler(), compute_s=0.5)
    inst.last_rows = 3
    job = asyncio.create_task(b.compute(inst, request(T0 + 2.0, max_batch=3), text(b"x")))
    await eventually(lambda: clock.waiting, what="the idle device waiting")
    assert clock.timeouts == [pytest.approx(1.5)]  # the deadline less a batch's compute
    clock.advance(1.5)
    assert (await job).batch == 1


async def test_ready_requests_run_shortest_slack_first() -> None:
    clock = FakeClock()
    device = FakeDevice(clock)
    b = batcher(clock, device)
    runner = Recorder()
    busy = asyncio.create_task(b.compute(instance(runner), request(T0 + 60), named("busy")))
    await eventually(lambda: device.started == 1, what="busy holding the device")
    long_batch = instance(runner, "long", compute_s=5.0)
    jobs = [
        asyncio.create_task(b.compute(inst, request(deadline), named(name)))
        for inst, deadline, name in [
            (instance(runner), 0.0, "no-deadline"),
            (long_batch, T0 + 9, "long-batch"),  # slack 4 s
            (instance(runner), T0 + 30, "later"),
            (instance(runner), T0 + 2, "urgent"),
        ]
    ]
    await eventually(lambda: len(b.ready) == 4, what="all queued behind busy")
    assert max(r.slack for r in b.ready) == math.inf  # no deadline: behind every other
    device.release()
    await asyncio.gather(busy, *jobs)
    assert runner.order == ["busy", "urgent", "long-batch", "later", "no-deadline"]


async def test_a_failing_batch_is_retried_one_request_at_a_time() -> None:
    clock = FakeClock()
    device = FakeDevice(clock)
    b = batcher(clock, device)
    runner = Doubler()
    inst = instance(runner)
    first = asyncio.create_task(b.compute(inst, request(), text(b"a")))
    await eventually(lambda: device.started == 1, what="the first batch holding the device")
    good = asyncio.create_task(b.compute(inst, request(), text(b"ok")))
    bad = asyncio.create_task(b.compute(inst, request(), text(b"bad")))
    await eventually(lambda: len(b.ready) == 2, what="both queued")
    device.release()
    await first
    assert lengths(await good) == [2]
    with pytest.raises(InvalidArgument):
        await bad
    assert runner.batches == [1, 2, 1, 1]  # together (failed), then each on its own
    assert (await good).batch == 1


async def test_an_instance_runs_as_many_batches_at_once_as_its_concurrency() -> None:
    clock = FakeClock()
    device = FakeDevice(clock)
    b = batcher(clock, device, streams=2)
    runner = Recorder()
    one, other = instance(runner, "one"), instance(runner, "other")
    jobs = [
        asyncio.create_task(b.compute(one, request(T0 + 1), named("one-a"))),
        asyncio.create_task(b.compute(one, request(T0 + 2), named("one-b"))),
        asyncio.create_task(b.compute(other, request(T0 + 3), named("other"))),
    ]
    # Two streams, but "one" may run one batch at a time: its second waits, "other" runs.
    await eventually(lambda: device.started == 2, what="two batches on the device")
    assert [r.inputs for r in b.ready] == [named("one-b")]
    device.release_one()
    await eventually(lambda: device.started == 3, what="one's second batch")
    device.release()
    await asyncio.gather(*jobs)
    assert device.peak == 2

    both = instance(runner, "both")  # its profile allows two batches at once
    device.held = True
    jobs = [
        asyncio.create_task(b.compute(both, request(concurrency=2), named(f"b{i}")))
        for i in range(3)
    ]
    await eventually(lambda: both.streams == 2, what="two batches of one instance at once")
    assert both.concurrency == 2
    assert len(b.ready) == 1  # the third: no free stream
    device.release()
    await asyncio.gather(*jobs)


async def test_a_stopped_batcher_tells_the_waiting_requests_why() -> None:
    clock = FakeClock()
    device = FakeDevice(clock)
    b = batcher(clock, device)
    inst = instance(Recorder())
    running = asyncio.create_task(b.compute(inst, request(), named("running")))
    waiting = asyncio.create_task(b.compute(inst, request(), named("waiting")))
    await eventually(lambda: device.started == 1 and len(b.ready) == 1, what="one queued")
    await b.stop()
    with pytest.raises(Unavailable):
        await waiting
    device.release()
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running


async def test_a_repeated_dispatch_is_answered_not_run_again() -> None:
    answers: Answers[str] = Answers(kept=2)
    runs: list[str] = []
    gate = asyncio.Event()

    async def run(x: str) -> str:
        runs.append(x)
        await gate.wait()
        return x.upper()

    first = answers.answer("d1", run, "a")
    again = answers.answer("d1", run, "a")  # while the first is running: shares it
    gate.set()
    assert [await first, await again] == ["A", "A"]
    assert await answers.answer("d1", run, "a") == "A"  # remembered
    assert runs == ["a"]
    assert answers.repeats == 2
    assert not answers.running

    async def fail(x: str) -> str:
        runs.append(x)
        raise InvalidArgument("no")

    with pytest.raises(InvalidArgument):
        await answers.answer("d2", fail, "b")
    with pytest.raises(InvalidArgument):  # a failure is not remembered: it runs again
        await answers.answer("d2", fail, "b")
    assert runs == ["a", "b", "b"]

    for key in ("d3", "d4"):  # only the last two answers are kept
        await answers.answer(key, run, key)
    assert list(answers.done) == ["d3", "d4"]


async def test_a_request_past_its_deadline_is_dropped_not_computed() -> None:
    clock = FakeClock()
    device = FakeDevice(clock)
    b = batcher(clock, device)
    runner = Recorder()
    busy = asyncio.create_task(b.compute(instance(runner), request(T0 + 60), named("busy")))
    await eventually(lambda: device.started == 1, what="busy holding the device")
    late = asyncio.create_task(b.compute(instance(runner), request(T0 + 1), named("late")))
    on_time = asyncio.create_task(b.compute(instance(runner), request(T0 + 60), named("ok")))
    await eventually(lambda: len(b.ready) == 2, what="both queued behind busy")
    clock.advance(2.0)  # late's deadline passes while busy computes
    device.release()
    await asyncio.gather(busy, on_time)
    with pytest.raises(DeadlineExceeded):
        await late
    assert runner.order == ["busy", "ok"]
    assert (b.computed, b.expired) == (2, 1)
    # One that arrives past its deadline is refused at once.
    with pytest.raises(DeadlineExceeded):
        await b.compute(instance(runner), request(T0 + 1), named("later"))
    assert (b.computed, b.expired) == (2, 2)
