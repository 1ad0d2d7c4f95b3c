"""Copies to a tier of this node: to its host tier (from another node or the object tier),
to the object tier, to a simulated GPU (over the emulated links, in real time) or to a
real GPU (by the planned routes, into a block of the memory service's pool).

The bytes are written first and the placement recorded after, so no placement ever
points at half-written bytes; a copy that fails frees what it took. A GPU copy takes its
room from the node's memory service: on a real GPU the block is a piece of a pool segment
exported by CUDA IPC handle, and the placement names the handle (``ipc:<hex>``) and the
block's offset. When no memory service answers, a real GPU's copy falls back to an
allocation of its own (offset 0), unbudgeted.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import structlog
from nats.js import JetStreamContext

from gpufaas.shared.config import Config
from gpufaas.shared.errors import InvalidArgument, Unavailable
from gpufaas.shared.identity import is_gpu
from gpufaas.shared.memory_client import MemoryClient, tube_item
from gpufaas.shared.messages import (
    AdoptRequest,
    EnsureReply,
    EnsureRequest,
    MemAllocation,
    Placement,
    Tube,
)
from gpufaas.shared.objects import put_object
from gpufaas.shared.paths import allocate, make_dirs, regular_size
from gpufaas.shared.shm import TUBES_DIR
from gpufaas.transfer.cuda_engine import CudaCopyEngine, multipath_host_to_device
from gpufaas.transfer.directory import TubeDirectory
from gpufaas.transfer.emulator import EmulatedCopies
from gpufaas.transfer.links import NodeLinks, describe, describe_routes
from gpufaas.transfer.remote import PeerFetch
from gpufaas.transfer.residency import (
    OBJECT_BUCKET,
    OBJECT_NODE,
    LocalCopies,
    create_staging,
    device_copy,
    gpu_index,
)

log = structlog.get_logger()


def deadline_met(req: EnsureRequest, took_s: float) -> bool | None:
    """Whether the copy left the function its inference time within the SLO."""
    if req.slo_ms is None:
        return None
    return took_s * 1e3 + req.inference_ms <= req.slo_ms


@dataclass(frozen=True, slots=True)
class Leg:
    """One copy of a tube from one tier to another: where it landed and how."""

    placement: Placement
    route: str
    modelled_s: float = 0.0  # a GPU copy's time (simulated: the emulated links')
    deadline_met: bool | None = None  # simulated GPUs: the copy engine's verdict
    at_risk: list[str] = field(default_factory=list)


class TierCopies:
    """Makes a tube resident on a tier of this node (``copy``); adopts a worker's output."""

    def __init__(
        self,
        config: Config,
        directory: TubeDirectory,
        local: LocalCopies,
        peers: PeerFetch,
        memory: MemoryClient,
        *,
        js: Callable[[], JetStreamContext],
        emulator: EmulatedCopies | None,
        simulated: bool,
    ) -> None:
        self.config = config
        self.directory = directory
        self.local = local
        self.peers = peers
        self.memory = memory
        self._js = js  # the service's JetStream context, made after this
        self.emulator = emulator  # simulated GPUs: copies emulated in real time
        self.simulated = simulated
        self.links: NodeLinks | None = None  # a node with GPUs: its link model (set at start)
        self.engines: dict[str, CudaCopyEngine] = {}  # real GPUs: set up once at start

    async def copy(self, tube: Tube, req: EnsureRequest) -> tuple[EnsureReply, float]:
        """Copy ``tube`` to ``req.tier`` (through this node's host tier when no copy is
        here yet); the reply, and the wall time it took."""
        t0 = time.perf_counter()
        host = self.local.find(tube, "host")
        peer = self.local.on_gpu(tube) if is_gpu(req.tier) else None
        routes: list[str] = []
        nbytes = 0
        updated = tube
        if peer is None and host is None:  # bring it to this node's host tier first
            host, route = await self.peers.to_host(tube)
            routes.append(route)
            nbytes += tube.nbytes
            updated = await self.directory.add_placement(tube.id, tube.tenant, host)
        source = peer or host
        assert source is not None
        leg = None if req.tier == "host" else await self._leg(tube, source, req)
        placement = source if leg is None else leg.placement
        if leg is not None:
            routes.append(leg.route)
            nbytes += tube.nbytes
        if placement != source:
            updated = await self.directory.add_placement(tube.id, tube.tenant, placement)
        measured_s = time.perf_counter() - t0
        simulated = req.tier != "host" and self.simulated
        took_s = (leg.modelled_s if leg else 0.0) if is_gpu(req.tier) else measured_s
        met = leg.deadline_met if leg else None
        reply = EnsureReply(
            tube=updated,
            placement=placement,
            path=", ".join(routes),
            nbytes=nbytes,
            duration_us=int(took_s * 1e6),
            simulated=simulated,
            deadline_met=met if self.emulator and simulated else deadline_met(req, took_s),
            at_risk=leg.at_risk if leg else [],
        )
        return reply, measured_s

    async def _leg(self, tube: Tube, source: Placement, req: EnsureRequest) -> Leg:
        if req.tier == "object":
            return await self._to_object(tube, source)
        if self.emulator is not None:  # simulated GPUs
            return await self._to_emulated(tube, source, req)
        # From a GPU copy (over NVLink when a route exists) or the host.
        return await self._to_device(tube, source, req.tier)

    async def _to_object(self, tube: Tube, source: Placement) -> Leg:
        src = self.local.file(tube.id, source)
        if source.offset or regular_size(src) != tube.nbytes:
            raise InvalidArgument("only whole-file host copies go to the object tier", field="tier")
        await put_object(self._js(), OBJECT_BUCKET, tube.id, src)
        return Leg(Placement(node=OBJECT_NODE, tier="object", segment=tube.id), "host->object")

    async def _to_emulated(self, tube: Tube, src: Placement, req: EnsureRequest) -> Leg:
        """A copy to a simulated GPU: the bytes land chunk by chunk as the emulated links
        carry them, into a staging file renamed into place once whole."""
        assert self.emulator is not None
        n = tube.nbytes
        # The GPU's budget is the memory service's: the copy's room comes from its pool,
        # and the file is named after the block, so the sweeper can give it back.
        block = await self.memory.alloc(
            req.tier, n, tube_item(tube.id), swap_bytes=self.local.swap_bytes(tube)
        )
        relpath = self.local.gpu_relpath(req.tier, tube.id, block.id)
        final = self.local.path(relpath)
        try:
            tmp, f = await asyncio.to_thread(create_staging, final)
        except BaseException:
            await self.memory.free(req.tier, block.id)
            raise
        try:
            view = memoryview(self.local.maps.map(src.segment))[src.offset : src.offset + n]
        except BaseException:
            f.close()
            tmp.unlink(missing_ok=True)
            await self.memory.free(req.tier, block.id)
            raise
        try:
            f.truncate(n)
            # Pages committed now: a full tmpfs is a 507 here, never a SIGBUS mid-copy.
            await asyncio.to_thread(allocate, f.fileno(), n, final, req.tier)
            with mmap.mmap(f.fileno(), n) if n else contextlib.nullcontext() as dst:

                def copy(offset: int, size: int) -> None:
                    assert dst is not None
                    dst[offset : offset + size] = view[offset : offset + size]

                record = await self.emulator.copy(
                    src.tier,
                    req.tier,
                    n,
                    copy,
                    deadline_in_s=None if req.slo_ms is None else req.slo_ms / 1e3,
                    inference_s=req.inference_ms / 1e3,
                )
            f.close()
            os.replace(tmp, final)
        except BaseException:
            f.close()
            tmp.unlink(missing_ok=True)
            await self.memory.free(req.tier, block.id)
            raise
        finally:
            view.release()
        parts = [(r.name, b) for r, b in zip(record.routes, record.route_nbytes, strict=True)]
        return Leg(
            Placement(node=self.local.node, tier=req.tier, segment=relpath),
            describe_routes(src.tier, req.tier, n, parts),
            record.duration_sim_s,
            record.deadline_met,
            [*record.at_risk],
        )

    async def _to_device(self, tube: Tube, source: Placement, tier: str) -> Leg:
        """A copy to a real GPU, into a block of its budget (freed again if it fails)."""
        block = await self._device_block(tier, tube)
        try:
            placement, took_s, route = await asyncio.to_thread(
                self._to_gpu, tube, source, tier, block
            )
        except BaseException:
            if block is not None:
                await self.memory.free(tier, block.id)
            raise
        return Leg(placement, route, took_s)

    async def _device_block(self, tier: str, tube: Tube) -> MemAllocation | None:
        """Room on a real GPU from its budget; None when no memory service runs (the copy
        then takes an allocation of its own). No room is a 507, as on simulated GPUs."""
        nbytes = tube.nbytes
        try:
            return await self.memory.alloc(
                tier, nbytes, tube_item(tube.id), swap_bytes=self.local.swap_bytes(tube)
            )
        except Unavailable as exc:
            log.warning("transfer.unbudgeted_copy", tier=tier, bytes=nbytes, error=exc.message)
            return None

    def _to_gpu(
        self, tube: Tube, src: Placement, tier: str, block: MemAllocation | None
    ) -> tuple[Placement, float, str]:
        """(Off the loop.) Copy this node's host or GPU copy to a GPU by the planned routes
        into ``block`` (a pool segment others open by its IPC handle, at the block's
        offset); returns the placement, the measured time and the routes."""
        assert self.links is not None, "a node with GPUs has a topology"
        with self.links.copying(src.tier, tier, tube.nbytes) as plan:
            copy = device_copy(gpu_index(tier), tube.nbytes, block)
            try:
                if src.tier == "host":  # over every route the plan chose, at once
                    view = memoryview(self.local.maps.map(src.segment))
                    parts = [(p.route.hops, p.offset, p.nbytes) for p in plan.parts]
                    took = multipath_host_to_device(
                        self.engines,
                        view[src.offset : src.offset + tube.nbytes],
                        copy.tensor,
                        parts,
                    )
                else:
                    peer = self.local.devices[(tube.id, src.tier)].tensor
                    took = self.engines[tier].device_to_device(peer, copy.tensor)
            except BaseException:
                copy.free()
                raise
            self.local.devices[(tube.id, tier)] = copy
        ipc = f"ipc:{copy.handle.hex()}"
        placed = Placement(node=self.local.node, tier=tier, segment=ipc, offset=copy.offset)
        return placed, took, describe(plan)

    def _written(self, tube: Tube) -> Path:
        """The file a worker of this node has just written for ``tube``: exactly its own
        ``tubes/<id>``, a regular file (never a link) of exactly its size."""
        src = tube.placements[0] if len(tube.placements) == 1 else None
        if src is None or src.node != self.local.node or src.tier != "host" or src.offset:
            raise InvalidArgument("the tube is not one host file of this node", field="tube")
        if src.segment != f"{TUBES_DIR}/{tube.id}":
            raise InvalidArgument("the tube's file is not its own", field="tube.placements")
        source = self.local.path(src.segment)
        if regular_size(source) != tube.nbytes:
            raise InvalidArgument("the tube's file is not a tube of this node", field="tube")
        return source

    async def adopt(self, req: AdoptRequest) -> Tube:
        """Move a worker's freshly written output file onto a simulated GPU's memory (its
        room from the memory service, the file renamed: no bytes move) and record the tube.

        Real GPUs are not adopted this way (their outputs would be device tensors exported
        by IPC handle); the worker keeps a host tube there. Raises 507 when the GPU has no
        room, and then the file is left as it was, for the worker to record as a host tube.
        """
        tube = req.tube
        if self.emulator is None or not is_gpu(req.tier):
            raise InvalidArgument(f"tier {req.tier!r} does not adopt files here", field="tier")
        source = await asyncio.to_thread(self._written, tube)
        # Its only copy from now on: moving it to the host would copy all of it.
        block = await self.memory.alloc(
            req.tier, tube.nbytes, tube_item(tube.id), swap_bytes=tube.nbytes
        )
        relpath = self.local.gpu_relpath(req.tier, tube.id, block.id)
        final = self.local.path(relpath)
        try:
            make_dirs(final.parent)
            os.replace(source, final)
            placed = msgspec.structs.replace(
                tube, placements=[Placement(node=self.local.node, tier=req.tier, segment=relpath)]
            )
            await self.directory.create(placed)
        except BaseException:
            if final.exists():
                with contextlib.suppress(OSError):
                    os.replace(final, source)
            await self.memory.free(req.tier, block.id)
            raise
        return placed
