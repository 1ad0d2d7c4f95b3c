"""Placement order: warm, then the model on the GPU, then θ, then nearness to the inputs,
then load, among GPUs with room; per GPU on a simulated DGX-1 (sim:8)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import msgspec
import pytest

from gpufaas.scheduler.placement import (
    FAR,
    NEIGHBOUR,
    ON_INPUT_GPU,
    SAME_NODE,
    NodeView,
    choose,
    nearness,
)
from gpufaas.scheduler.placer import Facts, NodeGpus, facts_of, gpu_views, inputs_at, node_gpus
from gpufaas.shared.devices import links_between_gpus, parse_devices
from gpufaas.shared.errors import Unavailable
from gpufaas.shared.messages import (
    FunctionRecord,
    FunctionSpec,
    Heartbeat,
    LocalityReply,
    ModelSource,
    Placement,
    Tube,
)

pytestmark = pytest.mark.unit

GB = 10**9


def view(
    node: str,
    *,
    warm: bool = False,
    theta: float = 0.0,
    load: int = 0,
    free: int | None = 10 * GB,
    to_load: int = GB,
) -> NodeView:
    return NodeView(node, warm, theta, to_load, load, free)


def test_a_warm_instance_wins() -> None:
    assert choose([view("a", theta=1.0), view("b", warm=True, load=9)]).node == "b"


def test_then_the_highest_share_of_resident_tensors() -> None:
    nodes = [view("a", theta=0.2), view("b", theta=0.9, load=5), view("c", load=0)]
    assert choose(nodes).node == "b"


def test_then_the_least_loaded_then_the_name() -> None:
    assert choose([view("b", load=1), view("a", load=2), view("c", load=1)]).node == "b"


def test_nodes_with_room_for_what_is_left_to_load_come_first() -> None:
    full = view("a", theta=0.5, free=GB // 10, to_load=GB // 2)
    assert choose([full, view("b", free=2 * GB, to_load=GB)]).node == "b"
    assert choose([view("cpu", free=None)]).node == "cpu"  # no GPU: nothing to check
    # None has room by the heartbeats' count (idle copies count as used): the node's own
    # store may still evict them, so the usual order decides.
    assert choose([full, view("c", free=0, to_load=GB)]).node == "a"
    with pytest.raises(Unavailable):
        choose([])


def test_nearness_to_the_inputs_wins_among_gpus_not_crowded() -> None:
    near = NodeView("b", False, 0.5, GB, 1, 10 * GB, near=SAME_NODE)
    assert choose([view("a", theta=0.5, load=0), near]).node == "b"  # within the slack
    crowded = NodeView("b", False, 0.5, GB, 2, 10 * GB, near=ON_INPUT_GPU)
    assert choose([view("a", theta=0.5, load=0), crowded]).node == "a"  # beyond it
    assert choose([view("a", theta=0.6, load=9), near]).node == "a"  # θ first
    # Of GPUs near alike, the least loaded; a neighbour by its widest link first.
    wide = NodeView("b", False, 0.5, GB, 1, 10 * GB, near=NEIGHBOUR, gpu="gpu:1", link_gbps=50)
    thin = NodeView("b", False, 0.5, GB, 0, 10 * GB, near=NEIGHBOUR, gpu="gpu:2", link_gbps=25)
    assert choose([thin, wide]).gpu == "gpu:1"


def test_a_model_already_on_a_gpu_comes_before_theta() -> None:
    cached = NodeView("b", False, 0.5, GB // 2, 3, 10 * GB, on_gpu=True)
    assert choose([view("a", theta=0.9), cached]).node == "b"
    assert choose([view("a", warm=True), cached]).node == "a"  # a warm instance still wins


# --- per GPU, on simulated 8-GPU DGX-1 nodes ------------------------------------------------

MODEL = 2 * GB


def dgx1_beats(node: str, free: dict[str, int] | None = None) -> list[Heartbeat]:
    """A sim:8 dgx1-v100 node's heartbeats: its tensor store's devices (``free`` bytes on
    some GPUs, the others empty) and its worker pool's GPU links, as the services report
    them."""
    devices = parse_devices("sim:8", "dgx1-v100")
    reported = [
        msgspec.structs.replace(
            d, used_bytes=d.memory_bytes - (free or {}).get(d.name, d.memory_bytes)
        )
        for d in devices.devices
    ]

    def beat(service: str, **kw: Any) -> Heartbeat:
        return Heartbeat(node=node, service=service, pid=1, started_at=0, updated_at=0, **kw)

    return [
        beat("tensorstore", devices=reported),
        beat("worker", devices=devices.devices, links=links_between_gpus(devices)),
    ]


def record(name: str, node: str, gpu: str) -> FunctionRecord:
    spec = FunctionSpec(name=name, tenant="t1", model=ModelSource(builtin=f"m-{name}"))
    return FunctionRecord(
        spec=spec,
        inputs=[],
        outputs=[],
        model_bytes=MODEL,
        tensor_count=1,
        nodes=[node],
        created_at=0,
        gpus={node: [gpu]},
    )


def place(
    name: str,
    deployed: list[FunctionRecord],
    nodes: dict[str, NodeGpus],
    near: tuple[str, str] | None = None,
) -> NodeView:
    """Where the scheduler's placer puts a new function ``name`` (nothing resident)."""
    spec = FunctionSpec(name=name, tenant="t1", model=ModelSource(builtin=f"m-{name}"))
    facts = facts_of(spec, deployed, nodes, set(), near)
    loc = LocalityReply(
        known=True, model_bytes=MODEL, resident_bytes=0, bytes_to_load=MODEL, theta=0.0
    )
    return choose([v for n, g in nodes.items() for v in gpu_views(n, g, loc, facts)])


def test_eight_functions_spread_over_the_eight_gpus_of_a_node() -> None:
    nodes = {"n1": node_gpus(dgx1_beats("n1"))}
    deployed: list[FunctionRecord] = []
    for i in range(8):
        at = place(f"f{i}", deployed, nodes)
        deployed.append(record(f"f{i}", at.node, str(at.gpu)))
    assert sorted(r.gpus["n1"][0] for r in deployed) == [f"gpu:{i}" for i in range(8)]
    # A ninth goes to a GPU of a second node before doubling up on the first's.
    nodes["n2"] = node_gpus(dgx1_beats("n2"))
    assert place("f8", deployed, nodes).node == "n2"


def test_a_consumer_step_goes_to_the_producers_gpu_or_its_fastest_nvlink_neighbour() -> None:
    nodes = {"n1": node_gpus(dgx1_beats("n1")), "n2": node_gpus(dgx1_beats("n2"))}
    topology = parse_devices("sim:8", "dgx1-v100").topology
    assert topology is not None
    widest = max(ln.gbps for ln in topology.links if "gpu:3" in (ln.a, ln.b) and ln.kind != "pcie3")

    def neighbour(at: NodeView) -> bool:
        """``at`` is an NVLink neighbour of n1's gpu:3 with the widest link (dgx1-v100:
        gpu:0 and gpu:7, two NVLinks, 50 GB/s), never a GPU reached through the host."""
        link = topology.link("gpu:3", str(at.gpu))
        return (
            (at.node, at.near) == ("n1", NEIGHBOUR)
            and link is not None
            and link.kind.startswith("nvlink")
            and link.gbps == widest
        )

    # Its input tube is on gpu:3 of n1, where the producer runs: that GPU, where the tube
    # needs no copy, rather than an idle GPU the tube would be copied to.
    deployed = [record("producer", "n1", "gpu:3")]
    at = place("consumer", deployed, nodes, near=("n1", "gpu:3"))
    assert (at.node, at.gpu, at.near) == ("n1", "gpu:3", ON_INPUT_GPU)
    # gpu:3 crowded (two instances more than the idlest GPU): its widest NVLink neighbour,
    # not a GPU of n1 that the copy would reach only through the host, nor n2.
    crowded = [*deployed, record("other", "n1", "gpu:3")]
    assert neighbour(place("consumer", crowded, nodes, near=("n1", "gpu:3")))
    # gpu:3 full: the same.
    full = {"n1": node_gpus(dgx1_beats("n1", {"gpu:3": 0})), "n2": nodes["n2"]}
    assert neighbour(place("consumer", deployed, full, near=("n1", "gpu:3")))
    # Every GPU of both nodes as busy: the producer's own again.
    busy = [
        record(f"f{g}{n}", n, f"gpu:{g}")
        for n in ("n1", "n2")
        for g in range(8)
        if (n, g) != ("n1", 3)
    ]
    at = place("consumer", crowded + busy, nodes, near=("n1", "gpu:3"))
    assert (at.node, at.gpu) == ("n1", "gpu:3")
    # An input on the host tier of n1: a GPU of n1 before another node's.
    assert place("consumer", deployed, nodes, near=("n1", "host")).node == "n1"


def test_a_gpus_memory_pressure_moves_new_instances_to_other_gpus() -> None:
    busy = {f"gpu:{i}": GB for i in range(4)}  # 1 GB left: less than the 2 GB model
    nodes = {"n1": node_gpus(dgx1_beats("n1", busy))}
    deployed: list[FunctionRecord] = []
    for i in range(4):
        at = place(f"f{i}", deployed, nodes)
        deployed.append(record(f"f{i}", at.node, str(at.gpu)))
    assert sorted(r.gpus["n1"][0] for r in deployed) == [f"gpu:{i}" for i in range(4, 8)]


def test_nearness_and_where_inputs_are() -> None:
    links = {("gpu:0", "gpu:1"): 25.0, ("gpu:1", "gpu:0"): 25.0}
    assert nearness("n", "gpu:0", ("n", "gpu:0"), links) == (ON_INPUT_GPU, 0.0)
    assert nearness("n", "gpu:1", ("n", "gpu:0"), links) == (NEIGHBOUR, 25.0)
    assert nearness("n", "gpu:2", ("n", "gpu:0"), links) == (SAME_NODE, 0.0)
    assert nearness("n", None, ("n", "host"), links) == (SAME_NODE, 0.0)
    assert nearness("m", "gpu:0", ("n", "gpu:0"), links) == (FAR, 0.0)
    assert nearness("n", "gpu:0", None, links) == (FAR, 0.0)

    def tube(nbytes: int, *where: tuple[str, str]) -> Tube:
        placements = [Placement(node=n, tier=t, segment="x") for n, t in where]
        return Tube(
            id="t", tenant="t1", datatype="FP32", shape=[1], nbytes=nbytes, placements=placements
        )

    # The (node, tier) holding the most input bytes; a GPU's copy before the host's.
    tubes = [tube(10, ("n", "host"), ("n", "gpu:2")), tube(5, ("m", "gpu:0"))]
    assert inputs_at(tubes) == ("n", "gpu:2")
    assert inputs_at(tubes, "m") == ("m", "gpu:0")
    assert inputs_at([tube(10, ("*", "object"))]) is None
    assert Facts(set(), Counter(), Counter(), set()).near is None
