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

import time

from aiohttp import web

from gpufaas.gateway import app as gw
from gpufaas.shared import constants as c
from gpufaas.shared.errors import NotFound
from gpufaas.shared.messages import Placement, Tube
from gpufaas.shared.objects import delete_object, get_object, put_object
from gpufaas.shared.shm import new_id
from gpufaas.shared.tube_fetch import fetch_tube


async def write_input(
    app: web.Application, tenant: str, datatype: str, shape: list[int], data: bytes | memoryview
) -> Tube:
    """Put ``data`` in the object tier and record it as a tube (KV), for the caller to drop."""
    tube_id = new_id()
    await put_object(app[gw.NC].jetstream(), c.TUBES_OBJECT_BUCKET, tube_id, data)
    tube = Tube(
        id=tube_id,
        tenant=tenant,
        datatype=datatype,  # type: ignore[arg-type]
        shape=shape,
        nbytes=len(data),
        placements=[Placement(node=c.OBJECT_NODE, tier="object", segment=tube_id)],
        created_at=time.time(),
    )
    await app[gw.KV].tubes.put(tube.id, tube)
    return tube


async def read_output(app: web.Application, tube: Tube) -> bytes:
    """An output tube's bytes, fetched from a node that holds a host copy (else from the
    object tier)."""
    holders = [p.node for p in tube.placements if p.tier == "host" and p.node != c.OBJECT_NODE]
    out = bytearray(tube.nbytes)
    if holders:
        timeout_s = app[gw.CONFIG].request_timeout_s
        await fetch_tube(gw.connected_nats(app), holders[0], tube, out, timeout_s=timeout_s)
    elif any(p.tier == "object" for p in tube.placements):
        await get_object(app[gw.NC].jetstream(), c.TUBES_OBJECT_BUCKET, tube.id, out)
    else:
        raise NotFound(f"output tube {tube.id} has no copy this gateway can read", field="tube")
    return bytes(out)


async def drop(app: web.Application, tube: Tube) -> None:
    """Delete the object of an input this gateway stored (its record goes with the rest)."""
    if any(p.tier == "object" for p in tube.placements):
        await delete_object(app[gw.NC].jetstream(), c.TUBES_OBJECT_BUCKET, tube.id)
