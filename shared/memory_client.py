"""A node service's side of the memory service: its blocks of a GPU's budget, and their lease.

The tensor store (model copies) and the transfer service (tube copies) take room on a
GPU from the node's memory service through this; the blocks belong to ``owner``, which
must renew them (``keep_alive``) or they lapse and are freed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import structlog
from nats.aio.client import Client as NATS

from gpufaas.shared import subjects
from gpufaas.shared.errors import PlatformError
from gpufaas.shared.messages import (
    MemAllocation,
    MemAllocRequest,
    MemFreeReply,
    MemFreeRequest,
    MemListReply,
    MemListRequest,
    MemRenewReply,
    MemRenewRequest,
)
from gpufaas.shared.rpc import request

log = structlog.get_logger()

# A block's ``item`` when it holds a tube's copy on a GPU: the memory manager may evict it
# (through the transfer service, to the host tier) and bring it back for a queued request.
TUBE_ITEM: Final = "tube:"


def tube_item(tube_id: str) -> str:
    return f"{TUBE_ITEM}{tube_id}"


class MemoryClient:
    """Allocations of one owner in one node's memory service."""

    def __init__(self, nc: Callable[[], NATS], node: str, owner: str, timeout_s: float) -> None:
        self._nc = nc  # the service's connection, made after this client
        self.node = node
        self.owner = owner
        self.timeout_s = timeout_s

    def _subject(self, verb: str) -> str:
        return subjects.node(self.node, "memory", verb)

    async def alloc(
        self, device: str, nbytes: int, item: str = "", *, swap_bytes: int = 0
    ) -> MemAllocation:
        """A block of ``nbytes`` on ``device``; ``ResourceExhausted`` when it has no room.
        ``item``: what it holds, when the manager may move it, and ``swap_bytes`` what such
        a move would copy (see MemAllocRequest)."""
        return await request(
            self._nc(),
            self._subject(subjects.MEMORY_ALLOC),
            MemAllocRequest(
                device=device, nbytes=nbytes, owner=self.owner, item=item, swap_bytes=swap_bytes
            ),
            MemAllocation,
            timeout=self.timeout_s,
            what="memory service of this node",
        )

    async def free(self, device: str, block: int) -> None:
        """Give a block back (best effort: if the manager is away, the lease lapses)."""
        try:
            await request(
                self._nc(),
                self._subject(subjects.MEMORY_FREE),
                MemFreeRequest(device=device, id=block),
                MemFreeReply,
                timeout=5,
            )
        except PlatformError as exc:
            log.warning(
                "memory.free_failed",
                owner=self.owner,
                device=device,
                block=block,
                error=exc.message,
            )

    async def list(self, device: str) -> list[MemAllocation]:
        """This owner's live blocks on ``device`` (with what each holds and when made)."""
        reply = await request(
            self._nc(),
            self._subject(subjects.MEMORY_LIST),
            MemListRequest(device=device, owner=self.owner),
            MemListReply,
            timeout=self.timeout_s,
            what="memory service of this node",
        )
        return reply.allocations

    async def renew(self) -> int:
        """Renew the owner's lease once; how many blocks it holds. One step of a supervised
        loop: ``service.every(interval_s, client.renew_step, "memory-lease", first=0)``."""
        reply = await request(
            self._nc(),
            self._subject(subjects.MEMORY_RENEW),
            MemRenewRequest(owner=self.owner),
            MemRenewReply,
            timeout=5,
        )
        return reply.allocations

    async def renew_step(self) -> None:
        """:meth:`renew` as a loop step (a failure is the loop's to log and retry): run it
        with ``every(interval, client.renew_step, name, first=0, backoff_cap=interval)``,
        so that a renewal never waits past the lease it keeps."""
        await self.renew()
