"""Big tensors for a gateway that shares no shared memory with any node.

Under ``gpufaas up`` and compose a gateway runs on a node's machine: it writes a big input
as a host tube in that machine's ``/dev/shm`` and reads a big output from there. On
Kubernetes gateways run anywhere (``GPUFAAS_GATEWAY_LOCAL_SHM=0``), so instead:
- an input over the inline threshold is put in the object tier (the ``tubes`` object
  store every node reads) and named by a tube whose only placement is there; the worker's
  ``transfer.ensure`` brings it to its host tier as for any tube whose node is gone;
- an output tube is read from a live node that holds a host copy, in the transfer
  service's 4 MiB ``fetch`` chunks (the same verb nodes copy tubes with, tenant-checked
  by the holder), a few in flight;
- at the end the input's object is deleted with its record; the nodes' sweepers free
  their copies of both once the records are gone.
"""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from gpufaas.gateway import app as gw
from gpufaas.shared import subjects
from gpufaas.shared.errors import NotFound
from gpufaas.shared.messages import FetchReply, FetchRequest, Placement, Tube
from gpufaas.shared.objects import delete_object, get_object, put_object
from gpufaas.shared.rpc import request
from gpufaas.shared.shm import new_id

OBJECT_BUCKET = "tubes"  # the object tier's bucket (transfer/residency.py)
OBJECT_NODE = "*"  # an object-tier placement belongs to no node
FETCH_CHUNK_BYTES = 4 * 2**20  # one fetch reply, as the transfer services copy
FETCH_WINDOW = 4  # chunks in flight


async def write_input(
    app: web.Application, tenant: str, datatype: str, shape: list[int], data: bytes | memoryview
) -> Tube:
    """Put ``data`` in the object tier and record it as a tube (KV), for the caller to drop."""
    tube_id = new_id()
    await put_object(app[gw.NC].jetstream(), OBJECT_BUCKET, tube_id, data)
    tube = Tube(
        id=tube_id,
        tenant=tenant,
        datatype=datatype,  # type: ignore[arg-type]
        shape=shape,
        nbytes=len(data),
        placements=[Placement(node=OBJECT_NODE, tier="object", segment=tube_id)],
        created_at=time.time(),
    )
    await app[gw.KV].tubes.put(tube.id, tube)
    return tube


async def read_output(app: web.Application, tube: Tube) -> bytes:
    """An output tube's bytes, fetched from a node that holds a host copy (else from the
    object tier)."""
    holders = [p.node for p in tube.placements if p.tier == "host" and p.node != OBJECT_NODE]
    if not holders:
        if any(p.tier == "object" for p in tube.placements):
            buf = bytearray()
            await get_object(app[gw.NC].jetstream(), OBJECT_BUCKET, tube.id, buf)
            return bytes(buf)
        raise NotFound(f"output tube {tube.id} has no copy this gateway can read", field="tube")
    out = bytearray(tube.nbytes)
    window = asyncio.Semaphore(FETCH_WINDOW)
    subject = subjects.node(holders[0], "transfer", subjects.TRANSFER_FETCH)

    async def chunk(offset: int) -> None:
        n = min(FETCH_CHUNK_BYTES, tube.nbytes - offset)
        req = FetchRequest(tube_id=tube.id, tenant=tube.tenant, offset=offset, nbytes=n)
        async with window:
            reply = await request(
                gw.connected_nats(app),
                subject,
                req,
                FetchReply,
                timeout=app[gw.CONFIG].request_timeout_s,
                what=f"transfer service of node {holders[0]}",
            )
        if len(reply.data) != n:
            raise NotFound(f"output tube {tube.id} is truncated", field="tube")
        out[offset : offset + n] = reply.data

    await asyncio.gather(*(chunk(o) for o in range(0, tube.nbytes, FETCH_CHUNK_BYTES)))
    return bytes(out)


async def drop(app: web.Application, tube: Tube) -> None:
    """Delete the object of an input this gateway stored (its record goes with the rest)."""
    if any(p.tier == "object" for p in tube.placements):
        await delete_object(app[gw.NC].jetstream(), OBJECT_BUCKET, tube.id)
