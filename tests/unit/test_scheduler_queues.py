"""A function's queue: what its queue view tells the memory manager of the input tubes."""

from __future__ import annotations

import asyncio

import pytest

from gpufaas.scheduler.queues import FunctionQueue, Pending
from gpufaas.shared.identity import FunctionRef
from gpufaas.shared.messages import Placement, Tube

pytestmark = pytest.mark.unit


def tube(tid: str, *nodes: str) -> Tube:
    return Tube(
        id=tid,
        tenant="t1",
        datatype="FP32",
        shape=[4],
        nbytes=16,
        placements=[Placement(node=n, tier="host", segment=f"tubes/{tid}") for n in nodes],
    )


async def test_queued_tubes_name_copies_on_the_node_by_queue_position() -> None:
    loop = asyncio.get_running_loop()
    fq = FunctionQueue(FunctionRef("t1", "f"))
    later = Pending(9.0, "r-later", loop.create_future(), tubes=(tube("c", "n1"),))
    first = Pending(
        1.0, "r-first", loop.create_future(), tubes=(tube("a", "n1"), tube("elsewhere", "n2"))
    )
    gone = Pending(0.5, "r-gone", loop.create_future(), tubes=(tube("x", "n1"),))
    for p in (later, first, gone):
        fq.push(p)
    gone.node.cancel()  # timed out: no longer queued
    shown = fq.queued_tubes("n1", limit=10)
    assert [(t.id, t.position, t.tenant, t.nbytes) for t in shown] == [
        ("a", 0, "t1", 16),
        ("c", 1, "t1", 16),
    ]
    assert [t.id for t in fq.queued_tubes("n2", limit=10)] == ["elsewhere"]
    assert [t.id for t in fq.queued_tubes("n1", limit=1)] == ["a"]
    # Sent to n1 and not answered yet: its tubes are shown as running (pinned there).
    fq.running_tubes[7] = ("n1", (tube("r", "n1"),))
    shown = fq.queued_tubes("n1", limit=10)
    assert [(t.id, t.position, t.running) for t in shown] == [
        ("r", 0, True),
        ("a", 0, False),
        ("c", 1, False),
    ]
    assert [t.id for t in fq.queued_tubes("n2", limit=10)] == ["elsewhere"]
