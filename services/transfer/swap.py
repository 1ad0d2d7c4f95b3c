"""Releasing a GPU copy for the memory manager: the copy's bytes stay on this node's host
tier, swapped there first (into a block of the host pool) when the node has no host copy.

The GPU placement is removed from the directory before its bytes are freed; a worker that
read the old placement meanwhile re-reads the host copy.
"""

from __future__ import annotations

import asyncio
import mmap
import os
from typing import TYPE_CHECKING

import structlog

from gpufaas.shared.errors import Unavailable
from gpufaas.shared.memory_client import MemoryClient, tube_item
from gpufaas.shared.messages import Placement, Tube, TubeReleaseReply, TubeReleaseRequest
from gpufaas.shared.paths import allocate
from gpufaas.shared.shm import host_pool_segment
from gpufaas.transfer.directory import TubeDirectory
from gpufaas.transfer.emulator import EmulatedCopies
from gpufaas.transfer.residency import LocalCopies, create_staging

if TYPE_CHECKING:
    import torch

log = structlog.get_logger()


class Swapper:
    """Drops this node's GPU copies of tubes, keeping their bytes on the host tier."""

    def __init__(
        self,
        directory: TubeDirectory,
        local: LocalCopies,
        host_memory: MemoryClient,
        emulator: EmulatedCopies | None,
    ) -> None:
        self.directory = directory
        self.local = local
        self.host_memory = host_memory  # swapped-out copies: blocks of the host pool
        self.emulator = emulator  # simulated GPUs: a swap takes the emulated link's time

    async def release(self, req: TubeReleaseRequest) -> TubeReleaseReply:
        """Drop the copy on ``req.tier``, swapping it to the host tier first if need be."""
        tube = await self.directory.get(req.tube_id)
        if tube is None:  # gone from the directory: the sweeper frees its copies
            return TubeReleaseReply(released=False, reason="unknown tube")
        gpu = self.local.find(tube, req.tier)
        if gpu is None:
            return TubeReleaseReply(released=False, reason="not resident")
        swapped = 0
        if self.local.find(tube, "host") is None:  # the swap: keep its bytes on the host tier
            host = await self._swap_out(tube, gpu)
            await self.directory.add_placement(tube.id, tube.tenant, host)
            swapped = tube.nbytes
        await self.directory.remove_placement(tube.id, gpu)
        await self.local.free_gpu_copy(tube.id, gpu)
        log.info(
            "transfer.released", tube=tube.id, tier=req.tier, bytes=tube.nbytes, swapped=swapped
        )
        return TubeReleaseReply(
            released=True, nbytes=tube.nbytes, swapped_bytes=swapped, tenant=tube.tenant
        )

    async def _swap_out(self, tube: Tube, gpu: Placement) -> Placement:
        """Copy a GPU copy to the host tier of this node (simulated GPUs: over the emulated
        link, so it takes the link's time; real GPUs: device to host): into a block of the
        memory manager's host pool, or, when no memory service answers, a file of its own.
        A full host pool is a 507 (the GPU copy stays)."""
        n = tube.nbytes
        try:
            block = await self.host_memory.alloc("host", n, tube_item(tube.id)) if n else None
        except Unavailable as exc:
            log.warning("transfer.unbudgeted_swap", bytes=n, error=exc.message)
            block = None
        if block is None:  # nothing to allocate, or no memory service: a file of its own
            return await self._swap_to_file(tube, gpu)
        relpath = host_pool_segment(self.local.node, block.segment)
        try:
            dst = memoryview(self.local.maps.map(relpath))[block.offset : block.offset + n]
            try:
                await self._copy_out(tube, gpu, dst)
            finally:
                dst.release()
        except BaseException:
            await self.host_memory.free("host", block.id)
            raise
        return Placement(node=self.local.node, tier="host", segment=relpath, offset=block.offset)

    async def _swap_to_file(self, tube: Tube, gpu: Placement) -> Placement:
        relpath = self.local.host_relpath(tube.id)
        final = self.local.path(relpath)
        tmp, f = await asyncio.to_thread(create_staging, final)
        n = tube.nbytes
        try:
            with f:
                f.truncate(n)
                # Pages committed now: a full tmpfs is a 507 here, never a SIGBUS mid-copy.
                await asyncio.to_thread(allocate, f.fileno(), n, final, "host")
                if n:
                    with mmap.mmap(f.fileno(), n) as dst:
                        await self._copy_out(tube, gpu, dst)
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return Placement(node=self.local.node, tier="host", segment=relpath)

    async def _copy_out(self, tube: Tube, gpu: Placement, dst: mmap.mmap | memoryview) -> None:
        n = tube.nbytes
        if self.local.cuda:  # untested without a GPU
            held = self.local.devices[(tube.id, gpu.tier)]
            await asyncio.to_thread(_device_to_host, held.tensor, dst)
            return
        view = memoryview(self.local.maps.map(gpu.segment))[gpu.offset : gpu.offset + n]
        try:
            if self.emulator is None:
                dst[:n] = view
                return

            def copy(offset: int, size: int) -> None:
                dst[offset : offset + size] = view[offset : offset + size]

            await self.emulator.copy(gpu.tier, "host", n, copy)
        finally:
            view.release()


def _device_to_host(src: torch.Tensor, dst: mmap.mmap | memoryview) -> None:
    """(Real GPUs, off the loop.) A device copy's bytes into a host mapping."""
    import torch  # noqa: PLC0415 - only nodes with GPUs get here

    torch.frombuffer(dst, dtype=torch.uint8).copy_(src.reshape(-1).view(torch.uint8))
    torch.cuda.synchronize(src.device)
