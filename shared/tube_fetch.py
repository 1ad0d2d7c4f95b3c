"""Reading a tube's host copy from the node that holds it, in chunks over NATS.

The holder's transfer service answers ``transfer.fetch`` with one chunk of its copy
(tenant-checked against the tube's record); a reader asks for every chunk, a few in
flight, into a buffer of the tube's size. Nodes copy tubes between them this way, and a
gateway that shares no memory with a node reads big outputs so.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from nats.aio.client import Client as NATS

from gpufaas.shared import subjects
from gpufaas.shared.errors import InvalidArgument, PlatformError, Unavailable
from gpufaas.shared.messages import FetchReply, FetchRequest, Tube
from gpufaas.shared.rpc import request

FETCH_CHUNK_BYTES = 4 * 2**20  # one fetch reply: well under the server's max payload
FETCH_WINDOW = 4  # chunks in flight per copy (flow control)


class Writable(Protocol):
    def __setitem__(self, index: slice, data: bytes) -> None: ...


async def fetch_tube(nc: NATS, node: str, tube: Tube, out: Writable, *, timeout_s: float) -> None:
    """Fill ``out`` (``tube.nbytes`` long: a mapping, a bytearray) with ``node``'s copy of
    ``tube``. A refused tube is ``InvalidArgument`` (a forged record: not transient); any
    other failure, a short chunk included, is ``Unavailable``. On a failure the chunks
    still in flight are stopped before it is raised, so ``out`` may be closed then."""
    window = asyncio.Semaphore(FETCH_WINDOW)
    subject = subjects.node(node, "transfer", subjects.TRANSFER_FETCH)

    async def chunk(offset: int) -> None:
        n = min(FETCH_CHUNK_BYTES, tube.nbytes - offset)
        req = FetchRequest(tube_id=tube.id, tenant=tube.tenant, offset=offset, nbytes=n)
        async with window:
            try:
                reply = await request(nc, subject, req, FetchReply, timeout=timeout_s)
            except InvalidArgument:
                raise
            except PlatformError as exc:
                raise Unavailable(
                    f"copying tube {tube.id!r} from node {node} failed: {exc.message}"
                ) from None
        if len(reply.data) != n:
            raise Unavailable(f"node {node} sent a short chunk of {tube.id!r}")
        out[offset : offset + n] = reply.data

    tasks = [asyncio.create_task(chunk(o)) for o in range(0, tube.nbytes, FETCH_CHUNK_BYTES)]
    try:
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
