"""The ledger of the memory service: allocations, segments and leases, persisted, on a
fake clock and an in-process store (no NATS)."""

from __future__ import annotations

from typing import Any

import pytest

from gpufaas.memory.devices import NodePools
from gpufaas.memory.ledger import RESERVATION_OWNER, Leases, Ledger, Movable
from gpufaas.memory.pool import SegmentPool, SimBackend
from gpufaas.memory.records import DictStore, MemoryKeys
from gpufaas.shared.errors import InvalidArgument, ResourceExhausted
from gpufaas.shared.messages import MemAllocation

pytestmark = pytest.mark.unit

MIB = 1 << 20
NODE = "n1"


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Node:  # also used by test_memory_holds
    """A ledger over one simulated GPU of 64 MiB (8 MiB segments), its records in dicts."""

    def __init__(self, allocs: DictStore[MemAllocation] | None = None, segments: Any = None):
        self.clock = Clock()
        self.events: list[tuple[str, dict[str, Any]]] = []
        pool = SegmentPool("gpu:0", 64 * MIB, SimBackend(), segment_bytes=8 * MIB, clock=self.clock)
        self.pools = NodePools(NODE, {"gpu:0": pool})
        self.allocs: DictStore[MemAllocation] = allocs or DictStore()
        self.segments: DictStore[int] = segments or DictStore()
        self.ledger = Ledger(
            self.pools,
            MemoryKeys(NODE),
            self.allocs,
            self.segments,
            lease_s=10.0,
            announce=lambda kind, data: self.events.append((kind, data)),
            clock=self.clock,
        )

    @property
    def pool(self) -> SegmentPool:
        return self.pools.gpus["gpu:0"]

    def kinds(self) -> list[str]:
        return [k for k, _ in self.events]


async def test_an_allocation_is_recorded_with_its_segment_before_the_reply() -> None:
    n = Node()
    a = await n.ledger.alloc("gpu:0", MIB, "w1", item="tube:x", swap_bytes=MIB)
    assert n.allocs.data[f"{NODE}.gpu0.a.{a.id}"] == a
    assert (a.item, a.at, a.swap_bytes) == ("tube:x", 1000.0, MIB)
    (segment,) = n.pool.segments()
    assert n.segments.data == {f"{NODE}.gpu0.s.{segment}": 8 * MIB}
    assert n.kinds() == ["memory.pool.resized"]
    assert n.ledger.items == {("gpu:0", a.id): Movable("tube:x", 1000.0, MIB)}


async def test_a_free_forgets_the_record_and_is_idempotent() -> None:
    n = Node()
    a = await n.ledger.alloc("gpu:0", MIB, "w1", item="tube:x")
    assert await n.ledger.free("gpu:0", a.id)
    assert not n.allocs.data
    assert not n.ledger.items
    assert not await n.ledger.free("gpu:0", a.id)


async def test_an_unknown_device_names_the_field() -> None:
    n = Node()
    with pytest.raises(InvalidArgument) as err:
        await n.ledger.alloc("gpu:7", MIB, "w1")
    assert err.value.field == "device"


async def test_a_refused_allocation_announces_pressure() -> None:
    n = Node()
    await n.ledger.alloc("gpu:0", 40 * MIB, "w1")
    with pytest.raises(ResourceExhausted):
        await n.ledger.alloc("gpu:0", 30 * MIB, "w1")
    assert n.events[-1][0] == "memory.pressure"
    assert n.events[-1][1]["bytes"] == 30 * MIB


async def test_lapsed_owners_lose_their_blocks_and_renewed_ones_keep_them() -> None:
    n = Node()
    await n.ledger.alloc("gpu:0", MIB, "alive")
    await n.ledger.alloc("gpu:0", MIB, "dead")
    n.clock.t += 5
    assert n.ledger.renew("alive") == 1
    assert await n.ledger.lapse(1009.0) == []
    assert await n.ledger.lapse(1011.0) == ["dead"]
    assert [a.owner for a in n.pool.allocations()] == ["alive"]
    assert [m.owner for m in n.allocs.data.values()] == ["alive"]
    assert await n.ledger.lapse(1016.0) == ["alive"]


async def test_idle_segments_go_back_after_the_keep_alive_and_leave_kv() -> None:
    n = Node()
    a = await n.ledger.alloc("gpu:0", MIB, "w1")
    await n.ledger.free("gpu:0", a.id)
    await n.ledger.release_idle(n.clock.t + 1, keep_alive_s=30)
    assert n.segments.data
    await n.ledger.release_idle(n.clock.t + 31, keep_alive_s=30)
    assert not n.segments.data
    assert [e[1]["kind"] for e in n.events] == ["grow", "shrink"]


async def test_a_restarted_ledger_rebuilds_the_pool_and_grants_a_grace() -> None:
    old = Node()
    kept = await old.ledger.alloc("gpu:0", 3 * MIB, "w1", item="tube:y", swap_bytes=7)
    stale = await old.ledger.alloc("gpu:0", MIB, f"{RESERVATION_OWNER}f")
    new = Node(old.allocs, old.segments)
    keys = sorted([*old.allocs.data, *old.segments.data])
    await new.ledger.restore(keys, now=2000.0)
    assert [(a.id, a.owner) for a in new.pool.allocations()] == [(kept.id, "w1")]
    assert stale.id not in {m.id for m in new.allocs.data.values()}  # a hold now: freed
    assert new.ledger.items == {("gpu:0", kept.id): Movable("tube:y", 1000.0, 7)}
    assert new.ledger.leases.expiry == {"w1": 2010.0}
    b = await new.ledger.alloc("gpu:0", MIB, "w2")
    assert b.id > stale.id  # new blocks never reuse a restored id


def test_a_lease_starts_with_the_first_block_and_a_renewal_extends_it() -> None:
    leases = Leases(10.0)
    leases.first("w", 0.0)
    leases.first("w", 5.0)  # a later block does not move it
    assert leases.expiry == {"w": 10.0}
    leases.renew("w", 5.0)
    assert leases.lapsed(14.0) == []
    assert leases.lapsed(16.0) == ["w"]
    assert leases.expiry == {}
