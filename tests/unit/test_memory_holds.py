"""Holds for intermediates: sized from the observed load, given up when idle, and what
the pool refuses noted as short (no NATS: a ledger over a simulated GPU)."""

from __future__ import annotations

import pytest

from gpufaas.memory.holds import Holds
from gpufaas.shared.messages import MemObserve
from tests.unit.test_memory_ledger import MIB, Node

pytestmark = pytest.mark.unit


def obs(fn: str, rid: str, phase: str, nbytes: int = 0, device: str = "gpu:0") -> MemObserve:
    return MemObserve(
        device=device,
        function=fn,
        request_id=rid,
        phase="start" if phase == "start" else "end",
        nbytes=nbytes,
    )


async def test_holds_follow_the_load_and_what_the_pool_refuses_is_short() -> None:
    n = Node()
    holds = Holds(n.ledger, ["gpu:0"], window_s=10.0, max_request_s=60.0)
    for i in range(3):
        assert holds.observe(obs("t.f", f"r{i}", "start", 4 * MIB), 1.0)
    assert not holds.observe(obs("t.f", "x", "start", device="gpu:9"), 1.0)
    await holds.update(2.0)
    assert holds.reserved == {("gpu:0", "t.f"): 12 * MIB}  # R_size 4 MiB x R_con 3
    assert holds.by_name() == {"gpu:0 t.f": 12 * MIB}
    assert n.pool.stats().held_bytes == 12 * MIB
    assert holds.running_on(["t.f", "t.g"]) == {"t.f": "gpu:0"}

    holds.observe(obs("t.g", "g", "start", 60 * MIB), 2.0)  # more than the pool can hold
    await holds.update(3.0)
    assert holds.short == {("gpu:0", "t.g"): 60 * MIB}
    assert holds.short_bytes("gpu:0") == 60 * MIB
    assert n.pool.stats().held_bytes == 12 * MIB

    for rid, fn in (("r0", "t.f"), ("r1", "t.f"), ("r2", "t.f"), ("g", "t.g")):
        holds.observe(obs(fn, rid, "end"), 4.0)
    await holds.update(20.0)  # a whole window idle: nothing held
    assert (holds.reserved, holds.short) == ({}, {})
    assert n.pool.stats().held_bytes == 0


async def test_a_hold_shrinks_only_to_half_or_less_of_what_is_held() -> None:
    n = Node()
    holds = Holds(n.ledger, ["gpu:0"], window_s=10.0, max_request_s=60.0)
    holds.observe(obs("t.f", "a", "start", 8 * MIB), 0.0)
    holds.observe(obs("t.f", "b", "start", 8 * MIB), 0.0)
    await holds.update(1.0)
    assert holds.reserved == {("gpu:0", "t.f"): 16 * MIB}
    holds.observe(obs("t.f", "a", "end"), 1.0)
    holds.observe(obs("t.f", "b", "end"), 1.0)
    holds.observe(obs("t.f", "c", "start", 10 * MIB), 12.0)  # one in flight: wants 10 MiB
    await holds.update(12.0)
    assert holds.reserved == {("gpu:0", "t.f"): 16 * MIB}  # 10 is more than half of 16
    holds.observe(obs("t.f", "c", "end"), 12.0)
    holds.observe(obs("t.f", "d", "start", 4 * MIB), 23.0)  # wants 4 MiB: half or less
    await holds.update(23.0)
    assert holds.reserved == {("gpu:0", "t.f"): 4 * MIB}
