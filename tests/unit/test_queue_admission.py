"""A function's queue knows how long its waiting requests take to drain (from the rate of
answers while requests wait, idle spells not counted), and a request that could only
time out in it is turned away at once (429), not accepted."""

from __future__ import annotations

import asyncio

import pytest

from gpufaas.scheduler.dispatch import Dispatcher
from gpufaas.scheduler.queues import FunctionQueue, Pending
from gpufaas.shared.config import Config
from gpufaas.shared.errors import Overloaded
from gpufaas.shared.identity import FunctionRef

pytestmark = pytest.mark.unit


def waiting(fq: FunctionQueue, count: int, loop: asyncio.AbstractEventLoop) -> None:
    for i in range(count):
        fq.push(Pending(1e12, f"r{i}", loop.create_future()))


async def test_the_drain_rate_counts_busy_gaps_only() -> None:
    loop = asyncio.get_running_loop()
    fq = FunctionQueue(FunctionRef("acme", "f"))
    fq.in_flight["n"] = 10
    assert fq.expected_wait() is None  # nothing waits
    fq.release("n", now=10.0)  # idle: no rate
    fq.release("n", now=100.0)  # after an idle spell: still none
    assert fq.drain_rate == 0.0
    waiting(fq, 4, loop)
    fq.release("n", now=200.0)
    fq.release("n", now=200.5)  # 2 answers a second while requests wait
    assert fq.drain_rate == pytest.approx(2.0)
    assert fq.expected_wait() == pytest.approx(2.0)  # 4 waiting at 2/s


async def test_a_request_that_would_wait_past_its_deadline_is_turned_away() -> None:
    class Host:
        config = Config(max_queued=100)

    loop = asyncio.get_running_loop()
    fq = FunctionQueue(FunctionRef("acme", "f"))
    fq.in_flight["n"] = 10
    waiting(fq, 4, loop)
    fq.release("n", now=10.0)
    fq.release("n", now=11.0)  # 1 answer a second: 4 s to drain
    dispatcher = Dispatcher.__new__(Dispatcher)
    dispatcher.host = Host()  # type: ignore[assignment]
    dispatcher.admit(fq, budget_s=10.0)  # room enough: accepted
    with pytest.raises(Overloaded, match="past this request's deadline") as refused:
        dispatcher.admit(fq, budget_s=3.0)
    assert refused.value.retry_after_s is not None
