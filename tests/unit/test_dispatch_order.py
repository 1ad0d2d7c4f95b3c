"""A worker runs ready batches by deadline slack, not by arrival, and batches requests."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import pytest

from gpufaas.shared.config import Config
from gpufaas.shared.errors import InvalidArgument
from gpufaas.shared.messages import FunctionSpec, ModelSource, TensorSpec, WorkerRunRequest
from gpufaas.shared.tensors import decode_bytes_elements, encode_bytes_elements
from gpufaas.worker.runners import Inputs, Output
from gpufaas.worker.service import Instance, WorkerService

pytestmark = pytest.mark.unit


class Recorder:
    """A runner that records the order it ran in; the first call waits to be let go."""

    batchable = False

    def __init__(self, order: list[str], gate: threading.Event) -> None:
        self.order, self.gate = order, gate
        self.inputs: list[TensorSpec] = []
        self.outputs: list[TensorSpec] = []

    def infer(self, inputs: Mapping[str, tuple[list[int], bytes]]) -> dict[str, Output]:
        (name,) = inputs
        if not self.order:
            self.gate.wait(10)
        self.order.append(name)
        return {}

    def sample(self, batch: int) -> Inputs:
        return {}


class Doubler:
    """A batchable runner: ``x`` (BYTES [N]) -> ``y`` (INT32 [N], each element's length x2).

    Records each batch's size; an element ``b"bad"`` fails the whole call. The first call
    waits for ``gate`` so that others queue behind it.
    """

    batchable = True

    def __init__(self, gate: threading.Event) -> None:
        self.gate = gate
        self.batches: list[int] = []
        self.inputs = [TensorSpec(name="x", datatype="BYTES", shape=[-1])]
        self.outputs = [TensorSpec(name="y", datatype="INT32", shape=[-1])]

    def infer(self, inputs: Inputs) -> dict[str, Output]:
        if not self.batches:
            self.gate.wait(10)
        shape, raw = inputs["x"]
        items = decode_bytes_elements(raw, shape[0])
        self.batches.append(len(items))
        if b"bad" in items:
            raise InvalidArgument("bad element", field="inputs[x]")
        data = b"".join((2 * len(i)).to_bytes(4, "little") for i in items)
        return {"y": Output("INT32", [len(items)], data)}

    def sample(self, batch: int) -> Inputs:
        return text(*[b"s"] * batch)


def text(*items: bytes) -> Inputs:
    return {"x": ([len(items)], encode_bytes_elements(items))}


def request(deadline: float, *, max_batch: int | None = None) -> WorkerRunRequest:
    spec = FunctionSpec(tenant="t", name="f", model=ModelSource(builtin="all-minilm-l6-v2"))
    return WorkerRunRequest(
        spec=spec, request_id="r", inputs=[], deadline=deadline, max_batch=max_batch
    )


def instance(runner: Recorder | Doubler, name: str, compute_s: float = 0.0) -> Instance:
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


async def test_ready_batches_run_shortest_slack_first(tmp_path: Path) -> None:
    config = Config(devices="cpu", shm_dir=tmp_path, data_dir=tmp_path, device_streams=1)
    worker = WorkerService(config)
    order: list[str] = []
    gate = threading.Event()
    runner = Recorder(order, gate)
    now = time.time()
    first = asyncio.create_task(
        worker._compute(instance(runner, "f"), request(now + 60), {"busy": ([], b"")})
    )
    await asyncio.sleep(0.05)  # "busy" holds the device thread
    long_batch = instance(runner, "long", compute_s=5.0)
    jobs = [
        worker._compute(instance(runner, "f"), request(0.0), {"no-deadline": ([], b"")}),
        worker._compute(long_batch, request(now + 9), {"long-batch": ([], b"")}),  # slack 4 s
        worker._compute(instance(runner, "f"), request(now + 30), {"later": ([], b"")}),
        worker._compute(instance(runner, "f"), request(now + 2), {"urgent": ([], b"")}),
    ]
    tasks = [asyncio.create_task(j) for j in jobs]
    await asyncio.sleep(0.05)  # all queued behind "busy"
    gate.set()
    await asyncio.gather(first, *tasks)
    assert order == ["busy", "urgent", "long-batch", "later", "no-deadline"]
    worker._executor.shutdown(wait=True)


async def test_requests_queued_behind_a_batch_run_together_up_to_the_batch_size(
    tmp_path: Path,
) -> None:
    worker = WorkerService(Config(devices="cpu", shm_dir=tmp_path, data_dir=tmp_path))
    gate = threading.Event()
    runner = Doubler(gate)
    inst = instance(runner, "f")
    deadline = time.time() + 60
    first = asyncio.create_task(worker._compute(inst, request(deadline, max_batch=4), text(b"a")))
    await asyncio.sleep(0.05)  # holds the device
    queued = [
        asyncio.create_task(worker._compute(inst, request(deadline, max_batch=4), text(*xs)))
        for xs in ([b"bb", b"ccc"], [b"d"], [b"eeee"], [b"ff", b"g"])
    ]
    await asyncio.sleep(0.05)
    gate.set()
    done = await asyncio.gather(first, *queued)
    # 2 + 1 + 1 rows fill a batch of 4; the last request (2 rows) runs in the next one.
    assert runner.batches == [1, 4, 2]
    assert [r.batch for r in done] == [1, 3, 3, 3, 1]
    got = [list(r.fut.result()["y"].shape) for r in done]
    assert got == [[1], [2], [1], [1], [2]]
    assert bytes(done[1].fut.result()["y"].data) == b"".join(
        n.to_bytes(4, "little") for n in (4, 6)
    )
    worker._executor.shutdown(wait=True)


async def test_a_failing_batch_is_retried_one_request_at_a_time(tmp_path: Path) -> None:
    worker = WorkerService(Config(devices="cpu", shm_dir=tmp_path, data_dir=tmp_path))
    gate = threading.Event()
    runner = Doubler(gate)
    inst = instance(runner, "f")
    first = asyncio.create_task(worker._compute(inst, request(0.0), text(b"a")))
    await asyncio.sleep(0.05)
    good = asyncio.create_task(worker._compute(inst, request(0.0), text(b"ok")))
    bad = asyncio.create_task(worker._compute(inst, request(0.0), text(b"bad")))
    await asyncio.sleep(0.05)
    gate.set()
    await first
    assert bytes((await good).fut.result()["y"].data) == (4).to_bytes(4, "little")
    with pytest.raises(InvalidArgument):
        await bad
    assert runner.batches == [1, 2, 1, 1]
    worker._executor.shutdown(wait=True)


async def test_an_idle_device_waits_briefly_to_fill_a_batch(tmp_path: Path) -> None:
    config = Config(devices="cpu", shm_dir=tmp_path, data_dir=tmp_path, batch_wait_s=5.0)
    worker = WorkerService(config)
    gate = threading.Event()
    gate.set()
    runner = Doubler(gate)
    inst = instance(runner, "f")
    deadline = time.time() + 60
    jobs = [asyncio.create_task(worker._compute(inst, request(deadline, max_batch=3), text(b"x")))]
    await asyncio.sleep(0.05)  # the device idles, waiting for more (up to 5 s)
    assert runner.batches == []
    jobs += [
        asyncio.create_task(worker._compute(inst, request(deadline, max_batch=3), text(b"y")))
        for _ in range(2)
    ]
    await asyncio.wait_for(asyncio.gather(*jobs), 2)  # full at 3 rows: runs at once
    assert runner.batches == [3]
    worker._executor.shutdown(wait=True)
