"""A worker process's death (or its reconnect) ends the waits of the requests sent to it
(``Deaths``); reconnect notices are rate limited."""

from __future__ import annotations

import time

import pytest

from gpufaas.scheduler import workers
from gpufaas.scheduler.workers import Deaths, Loss, WorkerClient

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
        assert unknown.result() == Loss("w1", died=True)  # may have gone to it: sent again
        assert to_w1.result() == Loss("w1", died=True)
        assert not to_w2.done()  # went to the process its own bind gave
        assert not other_tenant.done()
        assert not other_node.done()
        assert deaths.died("n1", None, "pool") == 2  # the node's pool: all of its sends
        assert to_w2.done()
        assert other_tenant.done()
        assert not other_node.done()
    assert not deaths._sends  # nothing kept once the sends end


async def test_a_reconnect_ends_the_waits_without_counting_as_a_death(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker back from a NATS drop: its sends go again (not counted against
    ``MAX_RESENDS``), at most once a ``RECONNECT_GAP_S`` per (node, tenant), so a process
    repeating the notice cannot make anyone's requests fail."""
    client = WorkerClient(host=None)  # type: ignore[arg-type]  # reconnected() needs no host
    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    with client.deaths.watching("n1", "a", None) as first:
        client.reconnected("n1", "a", "w1")
        assert first.result() == Loss("w1", died=False)
    with client.deaths.watching("n1", "a", None) as second:
        client.reconnected("n1", "a", "w1")  # again within the gap: ignored
        assert not second.done()
        client.reconnected("n1", "b", "w9")  # another tenant's notice: its own sends only
        assert not second.done()
        clock[0] += workers.RECONNECT_GAP_S
        client.reconnected("n1", "a", "w1")
        assert second.done()
