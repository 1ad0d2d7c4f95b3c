"""Placement order: warm, then θ, then load, among nodes with room."""

from __future__ import annotations

import pytest

from gpufaas.scheduler.placement import NodeView, choose
from gpufaas.shared.errors import Unavailable

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
    assert choose([view("a", theta=1.0), view("b", warm=True, load=9)]) == "b"


def test_then_the_highest_share_of_resident_tensors() -> None:
    nodes = [view("a", theta=0.2), view("b", theta=0.9, load=5), view("c", load=0)]
    assert choose(nodes) == "b"


def test_then_the_least_loaded_then_the_name() -> None:
    assert choose([view("b", load=1), view("a", load=2), view("c", load=1)]) == "b"


def test_nodes_with_room_for_what_is_left_to_load_come_first() -> None:
    full = view("a", theta=0.5, free=GB // 10, to_load=GB // 2)
    assert choose([full, view("b", free=2 * GB, to_load=GB)]) == "b"
    assert choose([view("cpu", free=None)]) == "cpu"  # no GPU: nothing to check
    # None has room by the heartbeats' count (idle copies count as used): the node's own
    # store may still evict them, so the usual order decides.
    assert choose([full, view("c", free=0, to_load=GB)]) == "a"
    with pytest.raises(Unavailable):
        choose([])


def test_a_tie_on_theta_goes_to_the_node_holding_the_inputs() -> None:
    near = NodeView("b", False, 0.5, GB, 3, 10 * GB, near=True)
    assert choose([view("a", theta=0.5, load=0), near]) == "b"
    assert choose([view("a", theta=0.6), near]) == "a"  # θ first


def test_a_model_already_on_a_gpu_comes_before_theta() -> None:
    cached = NodeView("b", False, 0.5, GB // 2, 3, 10 * GB, on_gpu=True)
    assert choose([view("a", theta=0.9), cached]) == "b"
    assert choose([view("a", warm=True), cached]) == "a"  # a warm instance still wins
