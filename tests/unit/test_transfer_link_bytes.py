"""Bytes per link: each finished copy counted on every hop of each route it took, per
direction; a copy that fails is not counted."""

from __future__ import annotations

import pytest

from gpufaas.shared.devices import parse_devices
from gpufaas.transfer.links import LinkBytes, NodeLinks, links_reply

pytestmark = pytest.mark.unit


def test_bytes_counted_per_hop_and_direction() -> None:
    moved = LinkBytes()
    moved.add(("host", "gpu:2", "gpu:0"), 100)
    moved.add(("host", "gpu:0"), 50)
    moved.add(("gpu:0", "host"), 7)
    assert moved.moved("host", "gpu:2") == 100
    assert moved.moved("gpu:2", "gpu:0") == 100
    assert moved.moved("host", "gpu:0") == 50
    assert moved.moved("gpu:0", "host") == 7
    assert moved.moved("gpu:0", "gpu:2") == 0


def test_a_planned_copy_counts_its_routes_once_it_ends() -> None:
    topology = parse_devices("sim:4").topology
    assert topology is not None
    links = NodeLinks(topology)
    with links.copying("host", "gpu:0", 1 << 20) as plan:
        assert links_reply(links, simulated=True).links[0].bytes_a_to_b == 0  # not yet
    with pytest.raises(RuntimeError), links.copying("host", "gpu:1", 1 << 20):
        raise RuntimeError("the copy failed")
    reply = links_reply(links, simulated=True)
    assert reply.topology == "dgx1-v100"
    assert {(ln.a, ln.b) for ln in reply.links} == {(ln.a, ln.b) for ln in topology.links}
    into_gpu0 = sum(p.nbytes for p in plan.parts if p.route.hops[-2:] == ("host", "gpu:0"))
    by_pair = {(ln.a, ln.b): ln for ln in reply.links}
    assert by_pair["host", "gpu:0"].bytes_a_to_b == into_gpu0
    assert sum(ln.bytes_a_to_b + ln.bytes_b_to_a for ln in reply.links) == sum(
        p.nbytes * (len(p.route.hops) - 1) for p in plan.parts
    )
    assert by_pair["host", "gpu:1"].bytes_a_to_b == sum(
        p.nbytes for p in plan.parts if p.route.hops[:2] == ("host", "gpu:1")
    )  # only the first copy's relays: the failed one counted nothing


def test_a_node_without_gpus_has_no_links() -> None:
    reply = links_reply(None, simulated=False)
    assert (reply.topology, reply.links) == ("", [])
