"""Copies between nodes: a tube's host copy fetched from another live node's transfer
service in chunks (a bounded window in flight), or read back from the object tier; and
the chunks this node serves to others.

A fetched copy is written under a staging name and renamed into place once whole, so a
node that leaves mid-copy leaves nothing behind. Placements on nodes that left are
dropped from the directory when found.
"""

from __future__ import annotations

import asyncio
import mmap
import os
from collections.abc import Awaitable, Callable, Collection
from pathlib import Path
from typing import BinaryIO

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from gpufaas.shared.errors import InvalidArgument, NotFound
from gpufaas.shared.identity import is_gpu
from gpufaas.shared.messages import FetchReply, FetchRequest, Placement, Tube
from gpufaas.shared.objects import get_object
from gpufaas.shared.paths import allocate, make_dirs
from gpufaas.shared.tube_fetch import FETCH_CHUNK_BYTES, fetch_tube
from gpufaas.transfer.directory import TubeDirectory
from gpufaas.transfer.residency import OBJECT_BUCKET, LocalCopies, create_staging


class PeerFetch:
    """This node's host copies of other nodes' tubes, and the chunks it serves them."""

    def __init__(
        self,
        directory: TubeDirectory,
        local: LocalCopies,
        *,
        nc: Callable[[], NATS],
        js: Callable[[], JetStreamContext],
        alive: Callable[[], Awaitable[Collection[str]]],
        timeout_s: float,
    ) -> None:
        self.directory = directory
        self.local = local
        self._nc = nc  # the service's connection, made after this
        self._js = js
        self._alive = alive  # the nodes with a fresh heartbeat
        self.timeout_s = timeout_s

    def chunk(self, tube: Tube, req: FetchRequest) -> FetchReply:
        """A chunk of this node's host copy (or simulated-GPU copy: a file too)."""
        here = self.local.find(tube, "host")
        if here is None and not self.local.cuda:
            here = self.local.on_gpu(tube)
        if here is None:
            raise NotFound(f"tube {req.tube_id!r} has no host copy on this node", field="tube")
        if req.nbytes > FETCH_CHUNK_BYTES or req.offset + req.nbytes > tube.nbytes:
            raise InvalidArgument("chunk out of range", field="offset")
        start = here.offset + req.offset
        return FetchReply(data=bytes(self.local.maps.map(here.segment)[start : start + req.nbytes]))

    async def to_host(self, tube: Tube) -> tuple[Placement, str]:
        """Copy another live node's host copy here (or the object tier's); the new
        placement, not yet recorded, and the path it took."""
        node = self.local.node
        alive = await self._alive()
        # Host copies, and on simulated GPUs their copies too (files the holder serves).
        remote = [
            p
            for p in tube.placements
            if p.node != node and (p.tier == "host" or (is_gpu(p.tier) and not self.local.cuda))
        ]
        gone = {p.node for p in remote if p.node not in alive}
        if gone:
            await self.directory.drop_nodes(tube.id, tube.tenant, gone)
        sources = [p for p in remote if p.node in alive]
        stored = any(p.tier == "object" for p in tube.placements)
        if not sources and not stored:
            raise NotFound(f"tube {tube.id!r} has no copy on a live node", field="tube")
        relpath = self.local.host_relpath(tube.id)
        final = self.local.path(relpath)
        await asyncio.to_thread(make_dirs, final.parent)
        here = Placement(node=node, tier="host", segment=relpath)
        if not sources:  # read back from the object tier (renamed into place once checked)
            await get_object(self._js(), OBJECT_BUCKET, tube.id, final)
            return here, "object->host"
        src = sources[0].node
        tmp, f = await asyncio.to_thread(create_staging, final)
        try:
            await self._fetch_into(tube, src, f, final)
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return here, f"host({src})->host"

    async def _fetch_into(self, tube: Tube, src_node: str, f: BinaryIO, final: Path) -> None:
        with f:
            f.truncate(tube.nbytes)
            # Pages committed now: a full tmpfs is a 507 here, never a SIGBUS mid-copy.
            await asyncio.to_thread(allocate, f.fileno(), tube.nbytes, final, "host")
            if tube.nbytes == 0:
                return
            with mmap.mmap(f.fileno(), tube.nbytes) as out:
                await fetch_tube(self._nc(), src_node, tube, out, timeout_s=self.timeout_s)
