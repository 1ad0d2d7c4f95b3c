"""The tube directory's changes of a record, as pure functions (no NATS)."""

from __future__ import annotations

import pytest

from gpufaas.shared.errors import NotFound
from gpufaas.shared.messages import Placement, Tube
from gpufaas.transfer.directory import (
    is_tube_key,
    owned,
    with_placement,
    without_nodes,
    without_placement,
)

pytestmark = pytest.mark.unit

HOST_A = Placement(node="node-a", tier="host", segment="tubes/node-a/t1")
GPU_A = Placement(node="node-a", tier="gpu:0", segment="gpu/node-a/gpu0/t1.3")
HOST_B = Placement(node="node-b", tier="host", segment="tubes/node-b/t1", offset=4096)


def tube(*placements: Placement, tenant: str = "acme") -> Tube:
    return Tube(
        id="t1",
        tenant=tenant,
        datatype="UINT8",
        shape=[8],
        nbytes=8,
        placements=list(placements),
    )


def test_a_new_placement_is_appended_once() -> None:
    added = with_placement(tube(HOST_A), GPU_A)
    assert added is not None
    assert added.placements == [HOST_A, GPU_A]
    assert with_placement(added, GPU_A) is None  # already recorded: leave the record
    assert with_placement(added, HOST_A) is None


def test_a_placement_differing_only_in_offset_is_another_copy() -> None:
    moved = Placement(node="node-b", tier="host", segment=HOST_B.segment)
    added = with_placement(tube(HOST_B), moved)
    assert added is not None
    assert added.placements == [HOST_B, moved]


def test_removing_a_placement_keeps_the_others_in_order() -> None:
    removed = without_placement(tube(HOST_A, GPU_A, HOST_B), GPU_A)
    assert removed is not None
    assert removed.placements == [HOST_A, HOST_B]
    assert without_placement(removed, GPU_A) is None  # gone already: a no-op


def test_copies_on_nodes_that_left_are_dropped() -> None:
    dropped = without_nodes(tube(HOST_A, GPU_A, HOST_B), {"node-a"})
    assert dropped is not None
    assert dropped.placements == [HOST_B]
    assert without_nodes(dropped, {"node-a", "node-gone"}) is None
    emptied = without_nodes(dropped, ["node-b"])
    assert emptied is not None
    assert emptied.placements == []


def test_the_changes_leave_everything_else_as_it_was() -> None:
    before = tube(HOST_A)
    after = with_placement(before, HOST_B)
    assert after is not None
    assert (after.id, after.tenant, after.nbytes, after.shape) == ("t1", "acme", 8, [8])
    assert before.placements == [HOST_A]  # the record read is never changed in place


def test_another_tenants_tube_is_not_found() -> None:
    mine = tube(HOST_A)
    assert owned(mine, "t1", "acme") is mine
    with pytest.raises(NotFound, match="'t1' not found"):
        owned(mine, "t1", "other")
    with pytest.raises(NotFound):
        owned(None, "t1", "acme")


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("0f3a9c", True),
        ("abc-DEF_1=", True),
        ("", False),
        ("has space", False),
        ("dotted.name", False),
        ("ünïcode", False),
    ],
)
def test_only_names_that_can_be_kv_keys_are_tube_ids(name: str, ok: bool) -> None:
    assert is_tube_key(name) is ok
