"""This node's copies of tubes: which of a tube's placements it can read, where a new copy's
file goes, and freeing a copy (its file, or a real GPU's device copy, and its pool block).

A copy's file is written under a staging name and renamed into place once whole, so a
reader never sees half of one. A simulated GPU's copy is a file named after the memory
block it takes (``gpu/<node>/<gpu token>/<tube>.<block>``), so whoever deletes it can give
the block back; a real GPU's copy is a device allocation this process holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from gpufaas.shared import constants as c
from gpufaas.shared.config import Config
from gpufaas.shared.cuda_ipc import CudaSegment, open_segment
from gpufaas.shared.errors import InvalidArgument
from gpufaas.shared.identity import Device, is_gpu
from gpufaas.shared.memory_client import MemoryClient
from gpufaas.shared.messages import MemAllocation, Placement, Tube
from gpufaas.shared.paths import create_new, make_dirs, regular_size, staging_name, under
from gpufaas.shared.shm import TUBES_DIR, SegmentCache, placement_file, release_file

if TYPE_CHECKING:
    import torch

GPU_DIR = "gpu"  # simulated GPU memory: host segments under <shm>/gpu/<node>/<gpu>/
OBJECT_BUCKET = c.TUBES_OBJECT_BUCKET  # the object tier: durable, readable from every node
OBJECT_NODE = c.OBJECT_NODE  # an object-tier placement belongs to no node


@dataclass(slots=True)
class DeviceCopy:
    """A tube's copy on a real GPU: its bytes, and the allocation and offset they lie at."""

    tensor: torch.Tensor  # the copy's bytes: a view of a pool segment, or of ``own``
    handle: bytes  # the allocation's CUDA IPC handle
    offset: int  # the block's offset in it
    block: int | None  # the memory service's block (None: no memory service answered)
    own: CudaSegment | None  # the fall-back: an allocation of our own

    def free(self) -> None:
        """Free our own allocation (a pool block goes back to the memory service)."""
        if self.own is not None:
            self.own.free()


def device_copy(index: int, nbytes: int, block: MemAllocation | None) -> DeviceCopy:
    """Room for a copy on GPU ``index``: the pool block granted (its segment opened once
    per process), or, without a handle, an allocation of our own."""
    if block is not None and block.handle is not None:
        base = open_segment(block.handle, block.offset + nbytes, index)
        view = base.narrow(0, block.offset, nbytes)
        return DeviceCopy(view, block.handle, block.offset, block.id, None)
    own = CudaSegment(index, nbytes)
    assert own.tensor is not None
    return DeviceCopy(own.tensor, own.handle, 0, block.id if block is not None else None, own)


def gpu_index(tier: str) -> int:
    """The CUDA index of a GPU tier (``gpu:1`` -> 1)."""
    index = Device.parse(tier, "tier").index
    assert index is not None, tier
    return index


def gpu_block(path: Path) -> tuple[str, int] | None:
    """The GPU and memory block a simulated GPU's copy is named after
    (``<gpu token>/<tube>.<block>``); None for any other file."""
    block = path.name.partition(".")[2]
    if not block.isdigit():
        return None
    with contextlib.suppress(InvalidArgument):
        gpu = Device.from_token(path.parent.name)
        if gpu.is_gpu:
            return gpu.name, int(block)
    return None


def staging(final: Path) -> Path:
    """Where a file is written before it is renamed to ``final`` (hidden: never swept; a
    fresh name each time, since it is created with ``O_EXCL``)."""
    return staging_name(final)


def create_staging(final: Path) -> tuple[Path, BinaryIO]:
    """A new private file (0600, ``O_EXCL``, never through a link) at ``staging(final)``,
    its directories made 0700: its name, and the file opened read-write."""
    make_dirs(final.parent)
    tmp = staging(final)
    return tmp, os.fdopen(create_new(tmp), "wb+")


class LocalCopies:
    """The copies of tubes this node holds or can read in place, and their release."""

    def __init__(
        self,
        config: Config,
        tiers: set[str],
        memory: MemoryClient,
        maps: SegmentCache,
        *,
        cuda: bool,
    ) -> None:
        self.config = config
        self.gpus = sorted(filter(is_gpu, tiers))  # this node's GPU tiers
        self.node = config.node_id
        self.memory = memory  # GPU blocks (the copies' room)
        self.maps = maps
        self.cuda = cuda
        self.devices: dict[tuple[str, str], DeviceCopy] = {}  # (tube, gpu) -> a real GPU's copy

    def path(self, relpath: str) -> Path:
        """``relpath`` under the shared-memory root, checked (``paths.under``): it may come
        from a tube's record."""
        return under(self.config.shm_dir, relpath)

    def file(self, tube_id: str, p: Placement) -> Path:
        """The file of a tube's placement on this machine, in its tier's directory and named
        after the tube (a forged one is ``InvalidArgument``; a real GPU's or the object
        tier's copy has none)."""
        path = placement_file(self.config.shm_dir, p, tube_id)
        if path is None:
            raise InvalidArgument(f"a copy on {p.tier} is not a file", field="segment")
        return path

    def host_relpath(self, tube_id: str) -> str:
        """Where this node's own host copy of a tube goes (fetched or swapped here)."""
        return f"{TUBES_DIR}/{self.node}/{tube_id}"

    def gpu_relpath(self, tier: str, tube_id: str, block: int) -> str:
        """Where a simulated GPU's copy goes, named after the memory block it takes."""
        return f"{GPU_DIR}/{self.node}/{Device.parse(tier, 'tier').token}/{tube_id}.{block}"

    def find(self, tube: Tube, tier: str) -> Placement | None:
        """This node's copy of ``tube`` on ``tier`` whose bytes are all there; for the host
        tier also another node's copy on this machine (nodes may share one), read in place."""
        if tier == "object":
            return next((p for p in tube.placements if p.tier == "object"), None)
        mine = [p for p in tube.placements if p.tier == tier and p.node == self.node]
        if tier != "host" and self.cuda:
            return mine[0] if mine and (tube.id, tier) in self.devices else None
        if tier == "host":
            mine += [p for p in tube.placements if p.tier == tier and p not in mine]
        for p in mine:
            size = regular_size(self.file(tube.id, p))  # a link is no copy
            if size is not None and size >= p.offset + tube.nbytes:
                return p
        return None

    def on_gpu(self, tube: Tube) -> Placement | None:
        """A copy of ``tube`` on one of this node's GPUs, the source of a GPU→GPU copy."""
        for tier in self.gpus:
            here = self.find(tube, tier)
            if here is not None:
                return here
        return None

    def swap_bytes(self, tube: Tube) -> int:
        """What moving a new GPU copy of ``tube`` to the host would copy: nothing when this
        node has a host copy already (the copy is made from it, as a rule)."""
        return 0 if self.find(tube, "host") is not None else tube.nbytes

    async def free_gpu_copy(self, tube_id: str, gpu: Placement) -> None:
        """Delete a GPU copy this node no longer lists, and give its block back."""
        if self.cuda:
            await self.drop_device_copy(tube_id, gpu.tier)
            return
        self.maps.forget(gpu.segment)
        await self.drop_file(self.file(tube_id, gpu))

    async def drop_file(self, path: Path) -> None:
        """Delete a tube's file (into the pool of tube files when worth keeping); a
        simulated GPU's copy, named ``<tube>.<memory block>``, gives its block back."""
        await asyncio.to_thread(release_file, path)
        named = gpu_block(path)
        if named is not None:
            await self.memory.free(*named)

    async def drop_device_copy(self, tube_id: str, tier: str) -> None:
        """(Real GPUs.) Free a tube's copy on ``tier`` and give its pool block back."""
        copy = self.devices.pop((tube_id, tier), None)
        if copy is None:
            return
        await asyncio.to_thread(copy.free)
        if copy.block is not None:
            await self.memory.free(tier, copy.block)
