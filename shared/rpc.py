"""Request/reply over NATS with typed messages and typed errors.

A request either returns the decoded reply or raises a :class:`PlatformError`:
errors travel back as headers (code, message) plus an ``ErrorReply`` body, no
responders become ``Unavailable`` and a timeout ``DeadlineExceeded``.

A request in flight when its connection drops may be lost with the server that carried
it, or its reply may be (nats-py keeps waiting for it until the timeout). A request sent
with ``resend=True`` is sent again, once the connection is back, within the same deadline:
for requests that may run twice, or whose responder answers a repeat once (a worker
answers a dispatch id once). It needs the connection's :class:`Link`, which
``shared.service.connect_nats`` attaches.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg as NatsMsg

from gpufaas.shared import constants as c
from gpufaas.shared.errors import (
    DeadlineExceeded,
    NoResponders,
    PlatformError,
    Unavailable,
    from_code,
)
from gpufaas.shared.messages import ErrorReply, M, Msg, decode, encode

log = structlog.get_logger()

# How long a request that lost its connection waits for it to come back (within its own
# deadline) before it is a fast ``Unavailable``: an embedded server restarts in about half
# a second, a client of a cluster moves to another server in about as long.
RECONNECT_WAIT_S = 5.0
MAX_RESENDS = 3  # sends again of one request, one per connection lost while it waited
NUDGE_GAP_S = 1.0  # the least time between two resends that responders' reconnects cause


class Link:
    """The state of one NATS connection as its requests see it: ``up`` while connected,
    and a future that resolves when requests in flight may have been lost (one for all of
    them): at a disconnect, or when a responder says its own connection came back
    (:meth:`nudge`)."""

    def __init__(self) -> None:
        self.up = asyncio.Event()
        self.up.set()
        self._lost: asyncio.Future[None] | None = None
        self._nudged = -math.inf
        self.on_reconnect: list[Callable[[], Awaitable[None]]] = []

    def lost(self) -> asyncio.Future[None]:
        """A future that resolves when requests in flight may next have been lost."""
        if self._lost is None or self._lost.done():
            self._lost = asyncio.get_running_loop().create_future()
        return self._lost

    def _lose(self) -> None:
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)

    def nudge(self) -> bool:
        """A responder's connection dropped and came back: what was sent to it meanwhile
        may be lost, so requests in flight are sent again. At most once a ``NUDGE_GAP_S``
        (a server's death reconnects every client of it at about the same time)."""
        now = time.monotonic()
        if now - self._nudged < NUDGE_GAP_S:
            return False
        self._nudged = now
        self._lose()
        return True

    async def disconnected(self) -> None:
        self.up.clear()
        self._lose()

    async def reconnected(self) -> None:
        self.up.set()
        for callback in list(self.on_reconnect):
            try:
                await callback()
            except Exception as exc:  # an announcement is best effort
                log.warning("rpc.on_reconnect_failed", error=repr(exc))


_LINKS: weakref.WeakKeyDictionary[NATS, Link] = weakref.WeakKeyDictionary()


def attach(nc: NATS, link: Link) -> None:
    """Record ``link`` (whose callbacks ``nc`` was connected with) as ``nc``'s."""
    _LINKS[nc] = link


def link_of(nc: NATS) -> Link | None:
    """The :class:`Link` of a connection made by ``connect_nats`` (else None)."""
    return _LINKS.get(nc)


async def reconnected(nc: NATS, wait_s: float) -> bool:
    """Whether ``nc`` is connected, waiting up to ``wait_s`` for a dropped connection to
    come back (a client of a cluster moves to another server in about a second)."""
    link = _LINKS.get(nc)
    if nc.is_connected or link is None or nc.is_closed:
        return nc.is_connected
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(wait_s):
            await link.up.wait()
    return nc.is_connected


async def request(
    nc: NATS,
    subject: str,
    msg: Msg,
    reply_type: type[M],
    *,
    timeout: float,
    request_id: str | None = None,
    what: str | None = None,
    resend: bool = False,
    interrupt: asyncio.Future[Any] | None = None,
) -> M:
    """Send ``msg`` and return the typed reply, or raise the typed error it carried.
    With ``resend``, a request whose connection drops while it waits is sent again once
    the connection is back (see the module's docstring). Should ``interrupt`` resolve
    before the reply comes (its responder died), the wait ends with :class:`Interrupted`
    carrying its result: one wait for both, on the hot path of every worker send."""
    headers = {c.HDR_REQUEST_ID: request_id} if request_id else None
    target = what or subject
    data = encode(msg)
    link = _LINKS.get(nc) if resend else None
    if link is None and interrupt is None:
        resp = await _once(nc, subject, data, timeout=timeout, headers=headers, target=target)
    else:
        resp = await _across_drops(
            nc,
            link,
            subject,
            data,
            timeout=timeout,
            headers=headers,
            target=target,
            interrupt=interrupt,
        )
    return decode_reply(resp, reply_type)


class Interrupted(Exception):
    """(Internal.) A request's ``interrupt`` resolved before its reply came."""

    def __init__(self, why: Any) -> None:
        super().__init__(why)
        self.why = why


async def _once(
    nc: NATS,
    subject: str,
    data: bytes,
    *,
    timeout: float,
    headers: dict[str, str] | None,
    target: str,
) -> NatsMsg:
    try:
        return await nc.request(subject, data, timeout=timeout, headers=headers)
    except nats.errors.NoRespondersError:
        raise NoResponders(f"no {target} is running to answer") from None
    except nats.errors.TimeoutError:
        raise DeadlineExceeded(f"{target} did not answer within {timeout:g} s") from None
    except (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError):
        raise Unavailable("the NATS connection is closed") from None


async def _across_drops(
    nc: NATS,
    link: Link | None,
    subject: str,
    data: bytes,
    *,
    timeout: float,
    headers: dict[str, str] | None,
    target: str,
    interrupt: asyncio.Future[Any] | None,
) -> NatsMsg:
    """``_once``, sent again each time the connection drops before the reply came (with
    a ``link``), unless ``interrupt`` resolves first."""
    until = time.monotonic() + timeout
    for _ in range(MAX_RESENDS + 1):
        waits: list[asyncio.Future[Any]] = [] if link is None else [link.lost()]
        if interrupt is not None:
            waits.append(interrupt)
        left = max(until - time.monotonic(), 0.001)
        task = asyncio.ensure_future(
            _once(nc, subject, data, timeout=left, headers=headers, target=target)
        )
        try:
            await asyncio.wait((task, *waits), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
        if task.done() and not task.cancelled():
            return task.result()
        if interrupt is not None and interrupt.done():
            raise Interrupted(interrupt.result())
        assert link is not None  # only a drop is left to have ended the wait
        left = until - time.monotonic()
        try:
            async with asyncio.timeout(max(min(left, RECONNECT_WAIT_S), 0)):
                await link.up.wait()
        except TimeoutError:
            raise Unavailable(
                f"the NATS connection dropped while {target} had the request, and it was not "
                "back in time; retry later"
            ) from None
        log.info("rpc.resent_after_reconnect", subject=subject, target=target)
    raise Unavailable(f"the NATS connection dropped {MAX_RESENDS + 1} times during one request")


def decode_reply(resp: NatsMsg, reply_type: type[M]) -> M:
    """Raise the error a reply carries, or decode it as ``reply_type``."""
    if resp.headers and c.HDR_ERROR_CODE in resp.headers:
        err = decode(resp.data, ErrorReply)
        raise from_code(err.code, err.message, err.field, err.retry_after_s)
    return decode(resp.data, reply_type)


def error_reply(error: PlatformError) -> tuple[bytes, dict[str, str]]:
    """Body and headers of an error reply."""
    body = encode(
        ErrorReply(
            code=error.code,
            message=error.message,
            field=error.field,
            retry_after_s=error.retry_after_s,
        )
    )
    headers = {c.HDR_ERROR_CODE: error.code, c.HDR_ERROR_MESSAGE: error.message[:256]}
    return body, headers
