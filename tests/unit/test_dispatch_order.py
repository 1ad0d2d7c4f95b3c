"""A worker runs ready batches by deadline slack, not by arrival."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import pytest

from gpufaas.shared.config import Config
from gpufaas.shared.messages import FunctionSpec, ModelSource, TensorSpec
from gpufaas.worker.runners import Output
from gpufaas.worker.service import Instance, WorkerService

pytestmark = pytest.mark.unit


class Recorder:
    """A runner that records the order it ran in; the first call waits to be let go."""

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


def instance(runner: Recorder, name: str, compute_s: float = 0.0) -> Instance:
    spec = FunctionSpec(tenant="t", name=name, model=ModelSource(builtin="all-minilm-l6-v2"))
    return Instance(spec=spec, runner=runner, device="cpu", model_bytes=0, tensor_count=0,
                    bytes_stored=0, bytes_deduplicated=0, load_us=0, tensors=[],
                    held=frozenset(), compute_s=compute_s)  # fmt: skip


async def test_ready_batches_run_shortest_slack_first(tmp_path: Path) -> None:
    worker = WorkerService(Config(devices="cpu", shm_dir=tmp_path, data_dir=tmp_path))
    order: list[str] = []
    gate = threading.Event()
    runner = Recorder(order, gate)
    now = time.time()
    first = asyncio.create_task(
        worker._compute(instance(runner, "f"), now + 60, {"busy": ([], b"")})
    )
    await asyncio.sleep(0.05)  # "busy" holds the device thread
    long_batch = instance(runner, "long", compute_s=5.0)
    jobs = [
        worker._compute(instance(runner, "f"), 0.0, {"no-deadline": ([], b"")}),
        worker._compute(long_batch, now + 9, {"long-batch": ([], b"")}),  # slack 4 s
        worker._compute(instance(runner, "f"), now + 30, {"later": ([], b"")}),
        worker._compute(instance(runner, "f"), now + 2, {"urgent": ([], b"")}),
    ]
    tasks = [asyncio.create_task(j) for j in jobs]
    await asyncio.sleep(0.05)  # all queued behind "busy"
    gate.set()
    await asyncio.gather(first, *tasks)
    assert order == ["busy", "urgent", "long-batch", "later", "no-deadline"]
    worker._executor.shutdown(wait=True)
