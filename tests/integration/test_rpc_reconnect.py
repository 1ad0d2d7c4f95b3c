"""A request in flight when its NATS connection drops: with ``resend`` it is sent again
once the connection is back and answered within its deadline; a connection that does not
come back is a fast ``Unavailable``, not a wait to the deadline."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import nats
import nats.errors
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg as NatsMsg

from gpufaas.shared import rpc
from gpufaas.shared.config import Config
from gpufaas.shared.errors import Unavailable
from gpufaas.shared.messages import Msg, decode, encode
from gpufaas.shared.service import close_nats, connect_nats
from tests.conftest import NatsServer
from tests.support import eventually

pytestmark = pytest.mark.integration

SUBJECT = "test.slow"


class Ask(Msg, frozen=True, kw_only=True):
    n: int


class Answer(Msg, frozen=True, kw_only=True):
    n: int


@pytest.fixture
async def responder(nats_server: NatsServer) -> AsyncIterator[list[int]]:
    """Answers ``Ask(n)`` with ``Answer(n)`` after 0.5 s; records each request it got."""
    seen: list[int] = []
    nc = await nats.connect(nats_server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1)

    async def answer(msg: NatsMsg) -> None:
        ask = decode(msg.data, Ask)
        seen.append(ask.n)
        await asyncio.sleep(0.5)
        await msg.respond(encode(Answer(n=ask.n)))

    await nc.subscribe(SUBJECT, cb=answer)
    await nc.flush()
    yield seen
    await close_nats(nc)


@pytest.fixture
async def requester(nats_server: NatsServer) -> AsyncIterator[NATS]:
    nc = await connect_nats(Config(nats_url=nats_server.url), "test-requester")
    yield nc
    await close_nats(nc)


async def test_a_request_in_flight_at_a_restart_is_sent_again_and_answered(
    nats_server: NatsServer, responder: list[int], requester: NATS
) -> None:
    call = asyncio.ensure_future(
        rpc.request(requester, SUBJECT, Ask(n=7), Answer, timeout=30, resend=True)
    )
    await eventually(lambda: responder == [7], 5, "the responder to get the request")
    t0 = time.monotonic()
    nats_server.stop()  # the request and its reply's route are gone with the server
    nats_server.start()
    answer = await asyncio.wait_for(call, 15)
    assert answer.n == 7
    took = time.monotonic() - t0
    assert took < 10, took  # not the 30 s deadline
    assert responder[-1] == 7
    assert len(responder) == 2  # sent again once
    print(f"answered {took:.2f} s after the restart began")


async def test_a_connection_that_stays_down_is_a_fast_unavailable(
    nats_server: NatsServer,
    responder: list[int],
    requester: NATS,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(rpc, "RECONNECT_WAIT_S", 0.5)
    call = asyncio.ensure_future(
        rpc.request(requester, SUBJECT, Ask(n=1), Answer, timeout=30, resend=True)
    )
    await eventually(lambda: responder == [1], 5, "the responder to get the request")
    t0 = time.monotonic()
    nats_server.stop()
    with pytest.raises(Unavailable, match="dropped"):
        await asyncio.wait_for(call, 10)
    assert time.monotonic() - t0 < 5


async def test_a_nudge_sends_requests_in_flight_again_at_most_once_a_gap(
    nats_server: NatsServer, requester: NATS
) -> None:
    """A responder that says its connection came back (a scheduler replica) may have
    missed what was sent to it: the request goes again, and is answered."""
    seen: list[int] = []
    nc = await nats.connect(nats_server.url)

    async def answer_the_second(msg: NatsMsg) -> None:
        seen.append(decode(msg.data, Ask).n)
        if len(seen) > 1:  # the first was "lost"
            await msg.respond(encode(Answer(n=seen[-1])))

    async def pong(msg: NatsMsg) -> None:
        await msg.respond(b"")

    await nc.subscribe(SUBJECT, cb=answer_the_second)
    await nc.subscribe(f"{SUBJECT}.probe", cb=pong)  # answered: SUBJECT's interest is known
    await nc.flush()

    async def reachable() -> bool:
        try:
            await requester.request(f"{SUBJECT}.probe", b"", timeout=1)
        except nats.errors.Error:
            return False
        return True

    await eventually(reachable, 5, "the responder's subscriptions at the server")
    try:
        link = rpc.link_of(requester)
        assert link is not None
        call = asyncio.ensure_future(
            rpc.request(requester, SUBJECT, Ask(n=3), Answer, timeout=30, resend=True)
        )
        await eventually(lambda: seen == [3], 5, "the first send")
        assert link.nudge()
        assert not link.nudge()  # a burst of notices counts once
        assert (await asyncio.wait_for(call, 5)).n == 3
        assert seen == [3, 3]
    finally:
        await close_nats(nc)


@pytest.mark.parametrize("resend", [True, False])
async def test_an_interrupt_ends_the_wait_and_an_answer_first_wins(
    responder: list[int], requester: NATS, resend: bool
) -> None:
    """``interrupt`` (a worker's death notice): the wait ends at once with ``Interrupted``
    carrying why, not at the deadline; a reply that came first is returned."""
    loop = asyncio.get_running_loop()
    never: asyncio.Future[str] = loop.create_future()
    answer = await rpc.request(
        requester, SUBJECT, Ask(n=1), Answer, timeout=30, resend=resend, interrupt=never
    )
    assert answer.n == 1
    died: asyncio.Future[str] = loop.create_future()
    call = asyncio.ensure_future(
        rpc.request(requester, SUBJECT, Ask(n=2), Answer, timeout=30, resend=resend, interrupt=died)
    )
    await eventually(lambda: responder[-1:] == [2], 5, "the responder to get the request")
    t0 = time.monotonic()
    died.set_result("worker-1 died")
    with pytest.raises(rpc.Interrupted) as stop:
        await call
    assert stop.value.why == "worker-1 died"
    assert time.monotonic() - t0 < 0.4  # before the responder's answer (0.5 s)
