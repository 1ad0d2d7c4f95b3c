"""The autoscaling leader's arithmetic and the queue views, without NATS."""

from __future__ import annotations

import asyncio
from collections import Counter

import msgspec
import pytest

from gpufaas.scheduler.leader import Totals, counted, function_load, sum_reports, to_drop
from gpufaas.scheduler.placer import node_gpus
from gpufaas.scheduler.queues import FunctionQueue, Pending
from gpufaas.scheduler.views import from_memory_name, memory_name, queue_entries
from gpufaas.scheduler.workflows import critical_path_s
from gpufaas.shared.identity import FunctionRef
from gpufaas.shared.messages import (
    DeviceInfo,
    FunctionLoadReport,
    FunctionOptions,
    FunctionRecord,
    FunctionSpec,
    Heartbeat,
    LinkInfo,
    ModelSource,
    SchedulerLoad,
)
from gpufaas.shared.registry import instance_devices
from gpufaas.shared.workflows import WorkflowRecord, WorkflowSpec

pytestmark = pytest.mark.unit

SPEC = FunctionSpec(
    name="f", tenant="t1", model=ModelSource(builtin="m"), options=FunctionOptions(max_batch_size=4)
)


def fn_record(nodes: list[str]) -> FunctionRecord:
    return FunctionRecord(
        spec=SPEC, inputs=[], outputs=[], model_bytes=1, tensor_count=1, nodes=nodes, created_at=0
    )


def test_reports_are_summed_per_function_and_arrivals_counted_once() -> None:
    a = SchedulerLoad(
        replica="a",
        at=1.0,
        functions=[FunctionLoadReport("t1.f", 3, 2, 1), FunctionLoadReport("t1.g", 1, 0, 0)],
    )
    b = SchedulerLoad(replica="b", at=1.0, functions=[FunctionLoadReport("t1.f", 2, 5, 4)])
    totals = sum_reports([a, b])
    assert totals == {"t1.f": Totals(5, 7, 5), "t1.g": Totals(1, 0, 0)}
    assert sum_reports([counted(a), counted(b)])["t1.f"] == Totals(0, 7, 5)


def test_a_function_load_uses_the_effective_capacity() -> None:
    load = function_load(fn_record(["n1", "n2"]), None, 2, Totals(3, 9, 4))
    assert (load.function, load.instances, load.queued, load.in_flight) == ("t1.f", 2, 9, 4)
    assert load.capacity == 4  # the spec's batch, concurrency 1: no profile yet
    assert load.service_rps == 0.0


def test_scaling_in_drops_the_least_busy_instance_or_all_at_zero() -> None:
    busy = Counter({"n1": 3, "n2": 1, "n3": 1})
    assert to_drop(["n1", "n2", "n3"], 2, busy) == {"n2"}  # a tie goes by name
    assert to_drop(["n1", "n2", "n3"], 0, busy) == {"n1", "n2", "n3"}


async def test_queue_views_name_the_function_as_the_memory_service_does() -> None:
    ref = FunctionRef("t1", "f")
    assert memory_name(ref) == "t1.f"  # the one spelling
    assert from_memory_name("t1/f") == ref  # from a memory service not restarted since
    assert from_memory_name("t1.f") == ref
    fq = FunctionQueue(ref)
    fq.push(Pending(5.0, "r1", asyncio.get_running_loop().create_future()))
    fq.in_flight["n2"] = 2
    entries = queue_entries(fq, fn_record(["n1", "n2"]), None)
    assert sorted(entries) == ["n1", "n2"]
    assert entries["n2"].function == "t1.f"
    assert (entries["n2"].queued, entries["n2"].running) == (1, 2)
    assert (entries["n1"].running, entries["n1"].next_deadline) == (0, 5.0)
    assert entries["n1"].compute_s is None


def test_each_gpus_free_memory_is_as_its_busiest_reporter_sees_it() -> None:
    def beat(service: str, used: int) -> Heartbeat:
        devices = [
            DeviceInfo(name="host", kind="host", model="h", memory_bytes=10**12),
            DeviceInfo(name="gpu:10", kind="sim", model="s", memory_bytes=100, used_bytes=5),
            DeviceInfo(name="gpu:1", kind="sim", model="s", memory_bytes=100, used_bytes=0),
            DeviceInfo(name="gpu:0", kind="sim", model="s", memory_bytes=100, used_bytes=used),
        ]
        links = [LinkInfo(a="gpu:0", b="gpu:1", kind="nvlink2", gbps=50.0)]
        return Heartbeat(
            node="n",
            service=service,
            pid=1,
            started_at=0,
            updated_at=0,
            devices=devices,
            links=links if service == "worker" else [],
        )

    gpus = node_gpus([beat("memory", 30), beat("worker", 60)])
    assert gpus.free == {"gpu:0": 40, "gpu:1": 100, "gpu:10": 95}
    assert gpus.names == ["gpu:0", "gpu:1", "gpu:10"]  # by number, not by name
    # A record from before placement was per GPU: its instance is on the first GPU.
    assert instance_devices(fn_record(["n"]), "n", gpus.names) == ["gpu:0"]
    assert gpus.links == {("gpu:0", "gpu:1"): 50.0, ("gpu:1", "gpu:0"): 50.0}
    host_only = Heartbeat(
        node="n",
        service="worker",
        pid=1,
        started_at=0,
        updated_at=0,
        devices=[DeviceInfo(name="host", kind="host", model="h", memory_bytes=1)],
    )
    assert node_gpus([host_only]).names == []


def test_a_workflows_critical_path_is_its_longest_chain_of_dependent_steps() -> None:
    steps = [
        {"name": "a", "function": "slow", "inputs": {"x": "$input.x"}},
        {"name": "b", "function": "fast", "inputs": {"x": "$input.x"}},
        {"name": "c", "function": "fast", "inputs": {"x": "a.y", "z": "b.y"}},
    ]
    spec = msgspec.convert({"name": "w", "steps": steps}, WorkflowSpec)
    record = WorkflowRecord(spec=spec, order=["a", "b", "c"], inputs=[], outputs=[], created_at=0)
    assert critical_path_s(record, {"slow": 0.5, "fast": 0.1}) == pytest.approx(0.6)
