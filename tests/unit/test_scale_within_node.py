"""Scale-out within a node: a function's record names several GPUs of one node, each an
instance; the queue gives such a node as many more requests, quotas count each instance,
a scale-in takes another GPU's instance before a node, and placement puts the next
instance on another GPU of the node that holds the model's tensors when that is cheaper
than a node that must read them (θ)."""

from __future__ import annotations

import asyncio
from collections import Counter

import msgspec
import pytest

from gpufaas.scheduler.functions import with_gpu, with_instances
from gpufaas.scheduler.leader import _extra_gpu
from gpufaas.scheduler.placement import choose
from gpufaas.scheduler.placer import facts_of, gpu_views, node_gpus
from gpufaas.scheduler.queues import FunctionQueue, Pending
from gpufaas.shared.devices import parse_devices
from gpufaas.shared.errors import InvalidArgument
from gpufaas.shared.identity import FunctionRef
from gpufaas.shared.messages import (
    FunctionRecord,
    FunctionSpec,
    Heartbeat,
    LocalityReply,
    ModelSource,
    WorkerLoadRequest,
    WorkerUnloadRequest,
    decode,
    encode,
)
from gpufaas.shared.quotas import gpu_bytes
from gpufaas.shared.registry import first_gpu, instance_count, instance_devices

pytestmark = pytest.mark.unit

SPEC = FunctionSpec(name="f", tenant="t", model=ModelSource(builtin="m"))


def record(gpus: dict[str, list[str]], nodes: list[str] | None = None) -> FunctionRecord:
    return FunctionRecord(
        spec=SPEC,
        inputs=[],
        outputs=[],
        model_bytes=100,
        tensor_count=1,
        nodes=nodes if nodes is not None else list(gpus),
        created_at=0,
        gpus=gpus,
    )


def test_a_record_counts_an_instance_per_gpu_it_names() -> None:
    r = record({"a": ["gpu:0", "gpu:3"], "b": ["gpu:1"]}, ["a", "b", "cpu"])
    assert instance_count(r) == 4  # "cpu": no GPU named, one instance
    assert instance_count(r, ["a"]) == 2
    assert instance_devices(r, "a", ["gpu:0"]) == ["gpu:0", "gpu:3"]
    assert instance_devices(r, "cpu", []) == ["host"]
    assert (first_gpu(r, "a"), first_gpu(r, "cpu")) == ("gpu:0", None)
    assert gpu_bytes(r) == 400  # the GPU memory quota counts each instance's model


def test_gpus_are_added_and_taken_within_a_node_never_its_last() -> None:
    r = record({"a": ["gpu:0"]})
    r = with_gpu(r, "a", "gpu:2", add=True)
    assert r.gpus == {"a": ["gpu:0", "gpu:2"]}
    assert with_gpu(r, "a", "gpu:2", add=True) == r  # there already
    assert with_gpu(r, "b", "gpu:1", add=True) == r  # not a node of the function
    r = with_gpu(r, "a", "gpu:0", add=False)
    assert r.gpus == {"a": ["gpu:2"]}
    assert with_gpu(r, "a", "gpu:2", add=False) == r  # the node's last: update_nodes' job
    # A node dropped takes its GPUs with it; a new node comes with its GPU.
    r2 = with_instances(record({"a": ["gpu:0", "gpu:1"], "b": ["gpu:0"]}), lambda n: n != "a")
    assert (r2.nodes, r2.gpus) == (["b"], {"b": ["gpu:0"]})
    r3 = with_instances(r2, lambda n: True, ("c", "gpu:5"))
    assert r3.gpus == {"b": ["gpu:0"], "c": ["gpu:5"]}


def test_a_scale_in_takes_another_gpus_instance_before_a_node() -> None:
    r = record({"a": ["gpu:0", "gpu:1"], "b": ["gpu:0", "gpu:4", "gpu:2"]})
    assert _extra_gpu(r, ["a", "b"]) == ("b", "gpu:2")  # the newest of the fullest node
    assert _extra_gpu(r, ["a"]) == ("a", "gpu:1")  # live nodes only
    assert _extra_gpu(record({"a": ["gpu:0"]}), ["a"]) is None


async def test_a_node_with_two_instances_takes_twice_the_requests() -> None:
    fq = FunctionQueue(FunctionRef("t", "f"))
    loop = asyncio.get_running_loop()
    for i in range(6):
        fq.push(Pending(100.0 + i, f"r{i}", loop.create_future()))
    got = Counter(node for _, node in fq.assign({"two": 4, "one": 2}))
    assert got == {"two": 4, "one": 2}
    assert fq.queued() == 0


def test_the_next_instance_goes_to_another_gpu_of_the_node_holding_the_tensors() -> None:
    devices = parse_devices("sim:8", "dgx1-v100")

    def beats(node: str) -> list[Heartbeat]:
        return [
            Heartbeat(
                node=node,
                service="worker",
                pid=1,
                started_at=0,
                updated_at=0,
                devices=devices.devices,
            )
        ]

    nodes = {n: node_gpus(beats(n)) for n in ("a", "b")}
    deployed = [record({"a": ["gpu:0"]})]
    taken = {("a", "gpu:0")}
    facts = facts_of(SPEC, deployed, nodes, set(), None)
    loc = {
        "a": LocalityReply(
            known=True, model_bytes=100, resident_bytes=100, bytes_to_load=0, theta=1.0
        ),
        "b": LocalityReply(
            known=True, model_bytes=100, resident_bytes=0, bytes_to_load=100, theta=0.0
        ),
    }
    views = [v for n, g in nodes.items() for v in gpu_views(n, g, loc[n], facts)]
    at = choose([v for v in views if (v.node, v.gpu) not in taken])
    assert (at.node, at.gpu) == ("a", "gpu:1")
    # Where the node holds nothing of it, another node's idle GPU is as good: the least
    # loaded node wins.
    loc["a"] = loc["b"]
    views = [v for n, g in nodes.items() for v in gpu_views(n, g, loc[n], facts)]
    at = choose([v for v in views if (v.node, v.gpu) not in taken])
    assert at.node == "b"


def test_a_gpu_from_the_wire_is_a_gpu_name_or_the_message_is_refused_naming_it() -> None:
    load = WorkerLoadRequest(spec=SPEC, device="gpu:3", replica=True)
    assert decode(encode(load), WorkerLoadRequest) == load
    for bad in ("cuda:0", "gpu:", "gpu:1.2", "gpu:../x", "gpu:1\n", "gpu:12345"):
        forged = {"type": "worker_unload_request.v1", "function": "f", "device": bad}
        with pytest.raises(InvalidArgument) as err:
            decode(msgspec.msgpack.encode(forged), WorkerUnloadRequest)
        assert err.value.field == "device", bad
    # A record naming a node with no GPU at all, or a GPU that is no GPU name.
    bad_gpus: list[dict[str, list[str]]] = [{"a": []}, {"a": ["host"]}]
    for gpus in bad_gpus:
        forged_record = {**msgspec.to_builtins(record({"a": ["gpu:0"]})), "gpus": gpus}
        with pytest.raises(InvalidArgument):
            decode(msgspec.msgpack.encode(forged_record), FunctionRecord)
