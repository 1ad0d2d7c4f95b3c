"""Sends in flight to a tenant's worker processes, ended early when the process dies or
reconnects: the scheduler sends them again, a gateway's direct route goes through a
scheduler instead. Both learn of it from the node pool's ``worker.exited`` event and the
worker's ``worker.reconnected`` notice (``exited``, ``reconnected`` read them)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import NamedTuple

from nats.aio.msg import Msg as NatsMsg

from gpufaas.shared.errors import PlatformError
from gpufaas.shared.messages import Event, Reconnected, decode, decode_json


class Loss(NamedTuple):
    """Why a send's wait ended early: its process died, or reconnected (``died`` False)."""

    worker: str
    died: bool


class WorkerLost(Exception):
    """(Internal.) The process a request was sent to died, or reconnected, before it
    answered."""

    def __init__(self, loss: Loss) -> None:
        super().__init__(loss.worker)
        self.worker = loss.worker
        self.died = loss.died


class Deaths:
    """The sends in flight to each ``(node, tenant)``, each with the process it went to
    when known (its own bind's): a death notice ends the wait of those that went to the
    dead process (or may have), so they are sent again at once instead of at deadline."""

    def __init__(self) -> None:
        self._sends: dict[tuple[str, str], dict[asyncio.Future[Loss], str | None]] = {}

    @contextlib.contextmanager
    def watching(
        self, node: str, tenant: str, worker: str | None
    ) -> Iterator[asyncio.Future[Loss]]:
        """A future set if the process of this send dies or reconnects."""
        fut: asyncio.Future[Loss] = asyncio.get_running_loop().create_future()
        key = (node, tenant)
        sends = self._sends.setdefault(key, {})
        sends[fut] = worker
        try:
            yield fut
        finally:
            sends.pop(fut, None)
            if not sends and self._sends.get(key) is sends:
                del self._sends[key]

    def died(self, node: str, tenant: str | None, worker: str, *, died: bool = True) -> int:
        """A process of ``tenant`` on ``node`` died (``tenant`` None: every process of the
        node, its pool gone), or with ``died`` False reconnected: end the waits of the sends
        that may have gone to it. One that went to another process (known from its bind)
        waits on; an unknown one is sent again, harmlessly (the worker answers a dispatch id
        it runs or ran once)."""
        told = 0
        for (at, who), sends in list(self._sends.items()):
            if at != node or (tenant is not None and who != tenant):
                continue
            for fut, sent_to in sends.items():
                if fut.done() or (tenant is not None and sent_to not in (None, worker)):
                    continue
                fut.set_result(Loss(worker, died))
                told += 1
        return told


def exited(msg: NatsMsg) -> tuple[str, str, str] | None:
    """``(node, tenant, worker)`` of a ``worker.exited`` event; None if malformed."""
    try:
        data = decode_json(msg.data, Event).data
        return str(data["node"]), str(data["tenant"]), str(data["worker"])
    except (PlatformError, KeyError, ValueError, TypeError):
        return None


def reconnected(msg: NatsMsg) -> tuple[str, str | None, str] | None:
    """``(node, tenant, worker)`` of a worker's reconnect notice; None if malformed. The
    node is the subject's (NATS lets a node's workers publish only their own)."""
    try:
        node = msg.subject.split(".")[3]
        said = decode(msg.data, Reconnected)
    except (PlatformError, IndexError):
        return None
    return node, said.tenant, said.worker
