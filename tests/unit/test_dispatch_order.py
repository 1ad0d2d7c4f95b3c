"""A worker runs ready batches by deadline slack, not by arrival, and batches requests:
through the worker's own executor threads (the batcher's fake-clock tests,
test_worker_batcher.py, cover each rule, the idle wait and the retry of a failing batch)."""

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
from gpufaas.worker.service import WorkerService
from tests.support import eventually
from tests.unit.test_worker_batcher import instance

pytestmark = pytest.mark.unit


class Recorder:
    """A runner that records the order it ran in; the first call waits to be let go."""

    batchable = False

    def __init__(self, order: list[str], gate: threading.Event) -> None:
        self.order, self.gate = order, gate
        self.entered = threading.Event()  # the first call holds the device
        self.inputs: list[TensorSpec] = []
        self.outputs: list[TensorSpec] = []

    def infer(self, inputs: Mapping[str, tuple[list[int], bytes]]) -> dict[str, Output]:
        (name,) = inputs
        if not self.order:
            self.entered.set()
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
        self.entered = threading.Event()  # the first call holds the device
        self.batches: list[int] = []
        self.inputs = [TensorSpec(name="x", datatype="BYTES", shape=[-1])]
        self.outputs = [TensorSpec(name="y", datatype="INT32", shape=[-1])]

    def infer(self, inputs: Inputs) -> dict[str, Output]:
        if not self.batches:
            self.entered.set()
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
    await eventually(runner.entered.is_set, what='"busy" to hold the device thread')
    long_batch = instance(runner, "long", compute_s=5.0)
    jobs = [
        worker._compute(instance(runner, "f"), request(0.0), {"no-deadline": ([], b"")}),
        worker._compute(long_batch, request(now + 9), {"long-batch": ([], b"")}),  # slack 4 s
        worker._compute(instance(runner, "f"), request(now + 30), {"later": ([], b"")}),
        worker._compute(instance(runner, "f"), request(now + 2), {"urgent": ([], b"")}),
    ]
    tasks = [asyncio.create_task(j) for j in jobs]
    await eventually(lambda: len(worker.batcher.ready) == 4, what='all queued behind "busy"')
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
    await eventually(runner.entered.is_set, what="the first batch to hold the device")
    queued = [
        asyncio.create_task(worker._compute(inst, request(deadline, max_batch=4), text(*xs)))
        for xs in ([b"bb", b"ccc"], [b"d"], [b"eeee"], [b"ff", b"g"])
    ]
    await eventually(lambda: len(worker.batcher.ready) == 4, what="four queued requests")
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
