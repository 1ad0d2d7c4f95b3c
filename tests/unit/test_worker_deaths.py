"""A worker process's death ends the waits of the requests sent to it (``Deaths``)."""

from __future__ import annotations

import asyncio

import pytest

from gpufaas.scheduler.workers import Deaths, WorkerLost, until_lost

pytestmark = pytest.mark.unit


async def test_a_death_ends_the_sends_that_went_to_that_process_only() -> None:
    deaths = Deaths()
    with (
        deaths.watching("n1", "a", None) as unknown,
        deaths.watching("n1", "a", "w1") as to_w1,
        deaths.watching("n1", "a", "w2") as to_w2,
        deaths.watching("n1", "b", None) as other_tenant,
        deaths.watching("n2", "a", None) as other_node,
    ):
        assert deaths.died("n1", "a", "w1") == 2
        assert unknown.result() == "w1"  # may have gone to it: sent again, harmlessly
        assert to_w1.result() == "w1"
        assert not to_w2.done()  # went to the process its own bind gave
        assert not other_tenant.done()
        assert not other_node.done()
        assert deaths.died("n1", None, "pool") == 2  # the node's pool: all of its sends
        assert to_w2.done()
        assert other_tenant.done()
        assert not other_node.done()
    assert not deaths._sends  # nothing kept once the sends end


async def test_until_lost_prefers_an_answer_and_cancels_the_wait_on_a_death() -> None:
    loop = asyncio.get_running_loop()
    died: asyncio.Future[str] = loop.create_future()

    async def answer() -> str:
        return "reply"

    assert await until_lost(answer(), died) == "reply"
    hang = asyncio.Event()
    waiting = asyncio.ensure_future(until_lost(hang.wait(), died))
    died.set_result("w1")
    with pytest.raises(WorkerLost) as lost:
        await waiting
    assert lost.value.worker == "w1"
