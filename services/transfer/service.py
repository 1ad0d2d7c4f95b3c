"""The transfer service of one node: its tube directory, and copies between tiers and nodes.

``ensure(tube, tier)`` makes a tube resident on a tier of this node, a no-op when it
already is: from this node's host copy to a GPU, from another node's host copy (fetched
from that node's transfer service in chunks, a bounded window in flight), or from the
object tier. The bytes are written first and the placement is added to the tube's KV
entry after (compare-and-set), so no placement ever points at half-written bytes; a
copy that fails leaves nothing behind. Placements on nodes that left are dropped when
found. Only the tube's tenant can resolve or move it; for anyone else it does not exist.

A copy to a GPU takes its room from the node's memory service (``MemoryClient``). On a
real GPU the block is a piece of a pool segment exported by CUDA IPC handle: the bytes
are written there, and the placement names the segment's handle (``ipc:<hex>``) and the
block's offset; a reader maps ``offset + nbytes`` from the handle. When no memory service
answers, the copy falls back to an allocation of its own (offset 0), unbudgeted. The
block is allocated naming the tube (``tube:<id>``), so the memory manager can weigh it
against what queued requests need: ``release(tube, tier)`` (the manager's) drops this
node's GPU copy, swapping it to the host tier first when the node has no host copy; the
placement is removed before the bytes are freed, and a worker that read the old
placement meanwhile re-reads the host copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import mmap
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import nats.js.errors
import structlog

from gpufaas.shared import subjects
from gpufaas.shared.config import Config
from gpufaas.shared.cuda_ipc import CudaSegment, open_segment
from gpufaas.shared.devices import parse_devices
from gpufaas.shared.errors import InvalidArgument, NotFound, PlatformError, Unavailable
from gpufaas.shared.memory_client import TUBE_ITEM, MemoryClient, tube_item
from gpufaas.shared.messages import (
    AdoptReply,
    AdoptRequest,
    EnsureReply,
    EnsureRequest,
    FetchReply,
    FetchRequest,
    MemAllocation,
    Placement,
    ResolveReply,
    ResolveRequest,
    Tube,
    TubeReleaseReply,
    TubeReleaseRequest,
    decode_json,
    encode_json,
)
from gpufaas.shared.objects import ensure_object_bucket, get_object, put_object
from gpufaas.shared.registry import live_nodes
from gpufaas.shared.rpc import request
from gpufaas.shared.service import Service
from gpufaas.shared.shm import TUBES_DIR, SegmentCache, host_pool_segment, release_file
from gpufaas.transfer.cuda_engine import CudaCopyEngine, multipath_host_to_device
from gpufaas.transfer.discovery import calibrate, discover_topology
from gpufaas.transfer.emulator import EmulatedCopies
from gpufaas.transfer.links import NodeLinks, describe, describe_routes
from gpufaas.transfer.simengine import TransferRecord

if TYPE_CHECKING:
    import torch

log = structlog.get_logger()

FETCH_CHUNK_BYTES = 4 * 2**20  # one fetch reply: well under the server's max payload
FETCH_WINDOW = 4  # chunks in flight per cross-node copy (flow control)
GPU_DIR = "gpu"  # simulated GPU memory: host segments under <shm>/gpu/<node>/<gpu>/
OBJECT_BUCKET = "tubes"  # the object tier: durable, readable from every node
OBJECT_NODE = "*"  # an object-tier placement belongs to no node
SWEEP_GRACE_S = 30.0  # a tube file younger than this may not be in KV yet (written first)


@dataclass(slots=True)
class _DeviceCopy:
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


def _device_copy(index: int, nbytes: int, block: MemAllocation | None) -> _DeviceCopy:
    """Room for a copy on GPU ``index``: the pool block granted (its segment opened once
    per process), or, without a handle, an allocation of our own."""
    if block is not None and block.handle is not None:
        base = open_segment(block.handle, block.offset + nbytes, index)
        view = base.narrow(0, block.offset, nbytes)
        return _DeviceCopy(view, block.handle, block.offset, block.id, None)
    own = CudaSegment(index, nbytes)
    assert own.tensor is not None
    return _DeviceCopy(own.tensor, own.handle, 0, block.id if block is not None else None, own)


class TransferService(Service):
    """Knows where this node's tubes live and makes them resident where asked."""

    name = "transfer"

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        node_devices = parse_devices(config.devices, config.topology)
        self.tiers = {d.name for d in node_devices.devices} | {"object"}  # host, gpu:N, object
        self.simulated = node_devices.backend == "sim"
        # The link model: a simulated node's topology file now, a real one's discovered and
        # calibrated at start (on_start); none without GPUs.
        self.links = NodeLinks(node_devices.topology) if node_devices.topology else None
        # Simulated GPUs: copies emulated in real time by the simulated copy engine.
        self.emulator = EmulatedCopies(self.links.model) if self.links and self.simulated else None
        self._cuda = node_devices.backend == "cuda"
        # Our GPU blocks. Simulated GPUs: a stable owner, the blocks of copies on disk survive
        # our restarts. Real GPUs: the directory of copies is this process's, so a new
        # process is a new owner and a dead one's blocks lapse.
        owner = f"transfer@{config.node_id}"
        if self._cuda:
            owner = f"{owner}/{os.getpid()}/{time.time():.6f}"
        self.memory = MemoryClient(
            lambda: self.nc, config.node_id, owner, timeout_s=config.request_timeout_s
        )
        # Swapped-out copies in the host pool outlive this process (files): a stable owner.
        self.host_memory = MemoryClient(
            lambda: self.nc,
            config.node_id,
            f"transfer@{config.node_id}",
            timeout_s=config.request_timeout_s,
        )
        self.maps = SegmentCache(config.shm_dir)
        self._copying: dict[tuple[str, str], asyncio.Task[EnsureReply]] = {}
        self.engines: dict[str, CudaCopyEngine] = {}  # real GPUs: set up once at start
        self._device_copies: dict[tuple[str, str], _DeviceCopy] = {}  # (tube, gpu) -> copy
        self._releasing: dict[tuple[str, str], asyncio.Task[TubeReleaseReply]] = {}

    async def on_start(self) -> None:
        node = self.config.node_id
        await ensure_object_bucket(self.js, OBJECT_BUCKET, ttl_s=self.config.tube_ttl_s)
        if self._cuda:  # topology, pinned staging rings and calibration: once, at start
            topology = await asyncio.to_thread(discover_topology)
            if topology is not None:
                self.links = NodeLinks(await asyncio.to_thread(calibrate, topology))
            for tier in sorted(t for t in self.tiers if t.startswith("gpu:")):
                index = int(tier.split(":")[1])
                self.engines[tier] = await asyncio.to_thread(CudaCopyEngine, index)
                log.info(
                    "transfer.calibrated",
                    gpu=tier,
                    **dataclasses.asdict(self.engines[tier].calibration),
                )
        for verb, req_type, handler in (
            (subjects.TRANSFER_RESOLVE, ResolveRequest, self.resolve),
            (subjects.TRANSFER_ENSURE, EnsureRequest, self.ensure),
            (subjects.TRANSFER_FETCH, FetchRequest, self.fetch),
            (subjects.TRANSFER_ADOPT, AdoptRequest, self.adopt),
            (subjects.TRANSFER_RELEASE, TubeReleaseRequest, self.release),
        ):
            await self.serve(subjects.node(node, self.name, verb), req_type, handler)  # type: ignore[arg-type]
        self.spawn(self._sweep_loop(), "sweeper")
        if self.emulator is not None or self._cuda:
            lease = self.memory.keep_alive(lambda: self.looping, self.config.heartbeat_s)
            self.spawn(lease, "memory-lease")
        if self._cuda:
            lease = self.host_memory.keep_alive(lambda: self.looping, self.config.heartbeat_s)
            self.spawn(lease, "host-memory-lease")

    async def on_stop(self) -> None:
        if self.emulator is not None:
            await self.emulator.close()

    # --- the sweeper -----------------------------------------------------------------------

    def _tube_files(self) -> list[Path]:
        """This node's tube files: the machine's own tubes, copies fetched here, GPU copies."""
        root, node = self.config.shm_dir, self.config.node_id
        dirs = [root / TUBES_DIR, root / TUBES_DIR / node, *(root / GPU_DIR / node).glob("*")]
        return [
            f
            for d in dirs
            if d.is_dir()
            for f in d.iterdir()
            if f.is_file() and not f.name.startswith(".")
        ]

    async def sweep_once(self, now: float) -> list[str]:
        """Delete tube files whose tube is gone from KV (it expired, or its request died).

        Files younger than SWEEP_GRACE_S are left alone: a tube's bytes are written before
        its KV entry. Returns the ids swept (also called by tests with a chosen ``now``).
        """
        files = await asyncio.to_thread(self._tube_files)
        swept: list[str] = []
        for f in files:
            tube_id = f.name.partition(".")[0]  # GPU copies: <tube>.<memory block>
            try:
                if now - f.stat().st_mtime < SWEEP_GRACE_S:
                    continue
                await self.buckets.tubes.get(tube_id)
            except FileNotFoundError:
                continue
            except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                await self._drop_file(f)
                swept.append(tube_id)
            except (ValueError, nats.js.errors.InvalidKeyError):
                continue  # not a tube's name: not ours to delete
        for tube_id, tier in list(self._device_copies):  # real GPUs: copies without files
            try:
                await self.buckets.tubes.get(tube_id)
            except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                await self._drop_device_copy(tube_id, tier)
                swept.append(tube_id)
        swept += await self._sweep_host_blocks(now)
        await asyncio.to_thread(self.maps.forget_missing)  # swept files, released segments
        if swept:
            log.info("transfer.swept", tubes=len(swept))
        return swept

    async def _sweep_host_blocks(self, now: float) -> list[str]:
        """Give back the host pool's blocks (swapped-out copies) whose tube is gone from KV
        or no longer names them. Blocks younger than SWEEP_GRACE_S are left alone."""
        if self.emulator is None and not self._cuda:
            return []
        try:
            blocks = await self.host_memory.list("host")
        except PlatformError as exc:  # no memory service: nothing of ours in its pool
            log.info("transfer.host_blocks_unknown", error=exc.message)
            return []
        swept = []
        for a in blocks:
            if not a.item.startswith(TUBE_ITEM) or now - a.at < SWEEP_GRACE_S:
                continue
            tube_id = a.item.removeprefix(TUBE_ITEM)
            here = Placement(
                node=self.config.node_id,
                tier="host",
                segment=host_pool_segment(self.config.node_id, a.segment),
                offset=a.offset,
            )
            try:
                tube, _ = await self._entry(tube_id)
                if here in tube.placements:
                    continue
            except NotFound:
                pass
            await self.host_memory.free("host", a.id)
            swept.append(tube_id)
        return swept

    async def _sweep_loop(self) -> None:
        while self.looping:
            await asyncio.sleep(self.config.reclaim_interval_s)
            try:
                await self.sweep_once(time.time())
            except PlatformError as exc:
                log.warning("transfer.sweep_failed", error=exc.message)

    # --- the directory ---------------------------------------------------------------------

    async def _tube(self, tube_id: str, tenant: str) -> tuple[Tube, int]:
        """The tenant's tube and its KV revision; anyone else's is simply 'not found'."""
        tube, revision = await self._entry(tube_id)
        if tube.tenant != tenant:
            raise NotFound(f"tube {tube_id!r} not found", field="tube")
        return tube, revision

    async def _entry(self, tube_id: str) -> tuple[Tube, int]:
        """Any tenant's tube and its KV revision (platform verbs only)."""
        missing = NotFound(f"tube {tube_id!r} not found", field="tube")
        try:
            entry = await self.buckets.tubes.get(tube_id)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            raise missing from None
        except (ValueError, nats.js.errors.InvalidKeyError):  # cannot be one of ours
            raise missing from None
        if entry.value is None or entry.revision is None:
            raise missing
        return decode_json(entry.value, Tube), entry.revision

    def _local(self, tube: Tube, tier: str) -> Placement | None:
        """This node's copy of ``tube`` on ``tier`` whose bytes are all there; for the host
        tier also another node's copy on this machine (nodes may share one), read in place."""
        if tier == "object":
            return next((p for p in tube.placements if p.tier == "object"), None)
        mine = [p for p in tube.placements if p.tier == tier and p.node == self.config.node_id]
        if tier != "host" and self._cuda:
            return mine[0] if mine and (tube.id, tier) in self._device_copies else None
        if tier == "host":
            mine += [p for p in tube.placements if p.tier == tier and p not in mine]
        for p in mine:
            path = self.config.shm_dir / p.segment
            if path.is_file() and path.stat().st_size >= p.offset + tube.nbytes:
                return p
        return None

    async def _add_placement(self, tube_id: str, tenant: str, new: Placement) -> Tube:
        """Record a copy (its bytes already written), racing other writers safely (CAS)."""
        for _ in range(10):
            tube, revision = await self._tube(tube_id, tenant)
            if new in tube.placements:
                return tube
            updated = msgspec.structs.replace(tube, placements=[*tube.placements, new])
            try:
                await self.buckets.tubes.update(tube_id, encode_json(updated), last=revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                continue
            return updated
        raise Unavailable(f"tube {tube_id!r} is changing too often to record a copy")

    async def _remove_placement(self, tube_id: str, gone: Placement) -> None:
        """Forget one copy (compare-and-set, retried: a racing writer does not undo it)."""
        for _ in range(10):
            try:
                tube, revision = await self._entry(tube_id)
            except NotFound:
                return
            if gone not in tube.placements:
                return
            kept = [p for p in tube.placements if p != gone]
            updated = msgspec.structs.replace(tube, placements=kept)
            try:
                await self.buckets.tubes.update(tube_id, encode_json(updated), last=revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                continue
            return
        raise Unavailable(f"tube {tube_id!r} is changing too often to drop a copy")

    async def _drop_placements(self, tube_id: str, tenant: str, nodes: set[str]) -> None:
        """Forget copies on nodes that left (best effort: a racing writer wins)."""
        tube, revision = await self._tube(tube_id, tenant)
        kept = [p for p in tube.placements if p.node not in nodes]
        if len(kept) != len(tube.placements):
            updated = msgspec.structs.replace(tube, placements=kept)
            with contextlib.suppress(nats.js.errors.KeyWrongLastSequenceError):
                await self.buckets.tubes.update(tube_id, encode_json(updated), last=revision)

    # --- requests --------------------------------------------------------------------------

    async def resolve(self, req: ResolveRequest) -> ResolveReply:
        """The file of a tube's copy on ``tier`` of this node (host or a simulated GPU)."""
        self._check_tier(req.tier)
        tube, _ = await self._tube(req.tube_id, req.tenant)
        here = self._local(tube, req.tier)
        if here is None:
            raise NotFound(f"tube {req.tube_id!r} has no copy on {req.tier} here", field="tube")
        return ResolveReply(tube=tube, path=str(self.config.shm_dir / here.segment))

    async def ensure(self, req: EnsureRequest) -> EnsureReply:
        """Make the tube resident on ``req.tier`` of this node; one copy however many ask."""
        self._check_tier(req.tier)
        key = (req.tube_id, req.tier)
        releasing = self._releasing.get(key)
        if releasing is not None:  # a copy on its way out: ask again once it is gone
            await asyncio.wait([releasing])
        tube, _ = await self._tube(req.tube_id, req.tenant)
        here = self._local(tube, req.tier)
        if here is not None:
            return EnsureReply(
                tube=tube,
                placement=here,
                path="resident",
                nbytes=0,
                duration_us=0,
                simulated=False,
                deadline_met=_met(req, 0.0),
            )
        task = self._copying.get(key)
        if task is None:
            task = asyncio.create_task(self._copy(tube, req))
            self._copying[key] = task
            task.add_done_callback(lambda _: self._copying.pop(key, None))
        return await asyncio.shield(task)

    async def adopt(self, req: AdoptRequest) -> AdoptReply:
        """Move a worker's freshly written output file onto a simulated GPU's memory (its
        room from the memory service, the file renamed: no bytes move) and record the tube.

        Real GPUs are not adopted this way (their outputs would be device tensors exported
        by IPC handle); the worker keeps a host tube there. Raises 507 when the GPU has no
        room, and then the file is left as it was, for the worker to record as a host tube.
        """
        self._check_tier(req.tier)
        tube = req.tube
        if self.emulator is None or not req.tier.startswith("gpu"):
            raise InvalidArgument(f"tier {req.tier!r} does not adopt files here", field="tier")
        (src,) = tube.placements
        source = self.config.shm_dir / src.segment
        if (
            src.node != self.config.node_id
            or not src.segment.startswith(f"{TUBES_DIR}/")
            or (not source.is_file())
        ):
            raise InvalidArgument("the tube's file is not a tube of this node", field="tube")
        # Its only copy from now on: moving it to the host would copy all of it.
        block = await self.memory.alloc(
            req.tier, tube.nbytes, tube_item(tube.id), swap_bytes=tube.nbytes
        )
        relpath = f"{GPU_DIR}/{self.config.node_id}/{_dir(req.tier)}/{tube.id}.{block.id}"
        final = self.config.shm_dir / relpath
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, final)
            placed = msgspec.structs.replace(
                tube,
                placements=[Placement(node=self.config.node_id, tier=req.tier, segment=relpath)],
            )
            await self.buckets.tubes.create(tube.id, encode_json(placed))
        except BaseException:
            if final.exists():
                with contextlib.suppress(OSError):
                    os.replace(final, source)
            await self.memory.free(req.tier, block.id)
            raise
        return AdoptReply(tube=placed)

    async def release(self, req: TubeReleaseRequest) -> TubeReleaseReply:
        """(The memory manager, making room on a GPU.) Drop this node's copy of a tube on a
        GPU tier; its bytes stay on this node's host tier, copied there first when the node
        has no host copy (the swap). Refused while a copy to that tier is under way; an
        ``ensure`` of the tier meanwhile waits for the release, then copies it back."""
        self._check_tier(req.tier)
        if not req.tier.startswith("gpu"):
            raise InvalidArgument(f"only GPU copies are released, not {req.tier!r}", field="tier")
        key = (req.tube_id, req.tier)
        if key in self._copying or key in self._releasing:
            return TubeReleaseReply(released=False, reason="copy in flight")
        task = asyncio.create_task(self._release(req))
        self._releasing[key] = task
        task.add_done_callback(lambda _: self._releasing.pop(key, None))
        return await asyncio.shield(task)

    async def _release(self, req: TubeReleaseRequest) -> TubeReleaseReply:
        try:
            tube, _ = await self._entry(req.tube_id)
        except NotFound:  # gone from the directory: the sweeper frees its copies
            return TubeReleaseReply(released=False, reason="unknown tube")
        gpu = self._local(tube, req.tier)
        if gpu is None:
            return TubeReleaseReply(released=False, reason="not resident")
        swapped = 0
        if self._local(tube, "host") is None:  # the swap: keep its bytes on the host tier
            host = await self._swap_out(tube, gpu)
            await self._add_placement(tube.id, tube.tenant, host)
            swapped = tube.nbytes
        await self._remove_placement(tube.id, gpu)
        await self._free_gpu_copy(tube.id, gpu)
        log.info(
            "transfer.released", tube=tube.id, tier=req.tier, bytes=tube.nbytes, swapped=swapped
        )
        return TubeReleaseReply(released=True, nbytes=tube.nbytes, swapped_bytes=swapped)

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
        relpath = host_pool_segment(self.config.node_id, block.segment)
        try:
            dst = memoryview(self.maps.map(relpath))[block.offset : block.offset + n]
            try:
                await self._copy_out(tube, gpu, dst)
            finally:
                dst.release()
        except BaseException:
            await self.host_memory.free("host", block.id)
            raise
        return Placement(
            node=self.config.node_id, tier="host", segment=relpath, offset=block.offset
        )

    async def _swap_to_file(self, tube: Tube, gpu: Placement) -> Placement:
        relpath = f"{TUBES_DIR}/{self.config.node_id}/{tube.id}"
        final = self.config.shm_dir / relpath
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        n = tube.nbytes
        try:
            f = await asyncio.to_thread(open, tmp, "wb+")
            with f:
                f.truncate(n)
                if n:
                    with mmap.mmap(f.fileno(), n) as dst:
                        await self._copy_out(tube, gpu, dst)
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return Placement(node=self.config.node_id, tier="host", segment=relpath)

    async def _copy_out(self, tube: Tube, gpu: Placement, dst: mmap.mmap | memoryview) -> None:
        n = tube.nbytes
        if self._cuda:  # untested without a GPU
            held = self._device_copies[(tube.id, gpu.tier)]
            await asyncio.to_thread(_device_to_host, held.tensor, dst)
            return
        view = memoryview(self.maps.map(gpu.segment))[gpu.offset : gpu.offset + n]
        try:
            if self.emulator is None:
                dst[:n] = view
                return

            def copy(offset: int, size: int) -> None:
                dst[offset : offset + size] = view[offset : offset + size]

            await self.emulator.copy(gpu.tier, "host", n, copy)
        finally:
            view.release()

    async def _free_gpu_copy(self, tube_id: str, gpu: Placement) -> None:
        """Delete a GPU copy this node no longer lists, and give its block back."""
        if self._cuda:
            await self._drop_device_copy(tube_id, gpu.tier)
            return
        self.maps.forget(gpu.segment)
        await self._drop_file(self.config.shm_dir / gpu.segment)

    async def _drop_file(self, path: Path) -> None:
        """Delete a tube's file (into the pool of tube files when worth keeping); a
        simulated GPU's copy, named ``<tube>.<memory block>``, gives its block back."""
        await asyncio.to_thread(release_file, path)
        block = path.name.partition(".")[2]
        if block.isdigit():
            await self.memory.free(_tier(path.parent.name), int(block))

    async def _drop_device_copy(self, tube_id: str, tier: str) -> None:
        """(Real GPUs.) Free a tube's copy on ``tier`` and give its pool block back."""
        copy = self._device_copies.pop((tube_id, tier), None)
        if copy is None:
            return
        await asyncio.to_thread(copy.free)
        if copy.block is not None:
            await self.memory.free(tier, copy.block)

    async def fetch(self, req: FetchRequest) -> FetchReply:
        """A chunk of this node's host copy (or simulated-GPU copy: a file too), for another
        node's transfer service."""
        tube, _ = await self._tube(req.tube_id, req.tenant)
        here = self._local(tube, "host") or (None if self._cuda else self._gpu_copy(tube))
        if here is None:
            raise NotFound(f"tube {req.tube_id!r} has no host copy on this node", field="tube")
        if req.nbytes > FETCH_CHUNK_BYTES or req.offset + req.nbytes > tube.nbytes:
            raise InvalidArgument("chunk out of range", field="offset")
        start = here.offset + req.offset
        return FetchReply(data=bytes(self.maps.map(here.segment)[start : start + req.nbytes]))

    def _check_tier(self, tier: str) -> None:
        if tier not in self.tiers:
            raise InvalidArgument(
                f"tier {tier!r} is not on node {self.config.node_id} "
                f"(it has {', '.join(sorted(self.tiers))})",
                field="tier",
            )

    # --- copies ----------------------------------------------------------------------------

    async def _copy(self, tube: Tube, req: EnsureRequest) -> EnsureReply:
        t0 = time.perf_counter()
        host = self._local(tube, "host")
        path = ""
        modelled_s = 0.0
        nbytes = 0
        updated = tube
        peer = self._gpu_copy(tube) if req.tier.startswith("gpu") else None
        deadline_met: bool | None = None
        at_risk: list[str] = []
        if peer is None and host is None:  # bring it to this node's host tier first
            host, path = await self._fetch_remote(tube)
            nbytes += tube.nbytes
            updated = await self._add_placement(tube.id, tube.tenant, host)
        source = peer or host
        assert source is not None
        placement = source
        if req.tier == "object":
            src = self.config.shm_dir / source.segment
            if source.offset or src.stat().st_size != tube.nbytes:
                raise InvalidArgument(
                    "only whole-file host copies go to the object tier", field="tier"
                )
            await put_object(self.js, OBJECT_BUCKET, tube.id, src)
            placement = Placement(node=OBJECT_NODE, tier="object", segment=tube.id)
            path = f"{path}, host->object" if path else "host->object"
            nbytes += tube.nbytes
        elif req.tier != "host" and self.emulator is not None:  # simulated GPUs
            placement, record = await self._emulated_copy(tube, source, req)
            modelled_s, deadline_met, at_risk = (
                record.duration_sim_s,
                record.deadline_met,
                [*record.at_risk],
            )
            parts = [(r.name, n) for r, n in zip(record.routes, record.route_nbytes, strict=True)]
            route = describe_routes(source.tier, req.tier, tube.nbytes, parts)
            path = f"{path}, {route}" if path else route
            nbytes += tube.nbytes
        elif req.tier != "host":  # from a GPU copy (over NVLink when a route exists) or host
            block = await self._device_block(req.tier, tube)
            try:
                placement, modelled_s, route = await asyncio.to_thread(
                    self._to_gpu, tube, source, req.tier, block
                )
            except BaseException:
                if block is not None:
                    await self.memory.free(req.tier, block.id)
                raise
            path = f"{path}, {route}" if path else route
            nbytes += tube.nbytes
        if placement != source:
            updated = await self._add_placement(tube.id, tube.tenant, placement)
        measured_s = time.perf_counter() - t0
        simulated = req.tier != "host" and self.simulated
        took_s = modelled_s if req.tier.startswith("gpu") else measured_s
        reply = EnsureReply(
            tube=updated,
            placement=placement,
            path=path,
            nbytes=nbytes,
            duration_us=int(took_s * 1e6),
            simulated=simulated,
            deadline_met=deadline_met if self.emulator and simulated else _met(req, took_s),
            at_risk=at_risk,
        )
        self.after_reply(self._completed(reply, measured_s))
        return reply

    async def _completed(self, reply: EnsureReply, measured_s: float) -> None:
        log.info(
            "transfer.completed",
            tube=reply.tube.id,
            path=reply.path,
            bytes=reply.nbytes,
            us=reply.duration_us,
            simulated=reply.simulated,
        )
        await self.publish_event(
            "transfer.completed",
            {
                "node": self.config.node_id,
                "tube": reply.tube.id,
                "tenant": reply.tube.tenant,
                "tier": reply.placement.tier,
                "path": reply.path,
                "bytes": reply.nbytes,
                "duration_us": reply.duration_us,
                "simulated": reply.simulated,
                "wall_us": int(measured_s * 1e6),
                "deadline_met": reply.deadline_met,
                "at_risk": reply.at_risk,
            },
        )

    async def _emulated_copy(
        self, tube: Tube, src: Placement, req: EnsureRequest
    ) -> tuple[Placement, TransferRecord]:
        """A copy to a simulated GPU: the bytes land chunk by chunk as the emulated links
        carry them, into a temporary file renamed into place once whole."""
        assert self.emulator is not None
        n = tube.nbytes
        # The GPU's budget is the memory service's: the copy's room comes from its pool,
        # and the file is named after the block, so the sweeper can give it back.
        block = await self.memory.alloc(
            req.tier, n, tube_item(tube.id), swap_bytes=self._swap_bytes(tube)
        )
        relpath = f"{GPU_DIR}/{self.config.node_id}/{_dir(req.tier)}/{tube.id}.{block.id}"
        final = self.config.shm_dir / relpath
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        view = memoryview(self.maps.map(src.segment))[src.offset : src.offset + n]
        f = await asyncio.to_thread(open, tmp, "wb+")
        try:
            f.truncate(n)
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
        return Placement(node=self.config.node_id, tier=req.tier, segment=relpath), record

    def _gpu_copy(self, tube: Tube) -> Placement | None:
        """A copy of ``tube`` on one of this node's GPUs, the source of a GPU→GPU copy."""
        for tier in sorted(self.tiers):
            if tier.startswith("gpu"):
                here = self._local(tube, tier)
                if here is not None:
                    return here
        return None

    def _swap_bytes(self, tube: Tube) -> int:
        """What moving a new GPU copy of ``tube`` to the host would copy: nothing when this
        node has a host copy already (the copy is made from it, as a rule)."""
        return 0 if self._local(tube, "host") is not None else tube.nbytes

    async def _device_block(self, tier: str, tube: Tube) -> MemAllocation | None:
        """Room on a real GPU from its budget; None when no memory service runs (the copy
        then takes an allocation of its own). No room is a 507, as on simulated GPUs."""
        nbytes = tube.nbytes
        try:
            return await self.memory.alloc(
                tier, nbytes, tube_item(tube.id), swap_bytes=self._swap_bytes(tube)
            )
        except Unavailable as exc:
            log.warning("transfer.unbudgeted_copy", tier=tier, bytes=nbytes, error=exc.message)
            return None

    def _to_gpu(
        self, tube: Tube, src: Placement, tier: str, block: MemAllocation | None
    ) -> tuple[Placement, float, str]:
        """(Off the loop; real GPUs, simulated ones go through ``_emulated_copy``.) Copy this
        node's host or GPU copy to a GPU by the planned routes into ``block`` (a pool
        segment others open by its IPC handle, at the block's offset); returns the
        placement, the measured time and the routes."""
        assert self.links is not None, "a node with GPUs has a topology"
        with self.links.copying(src.tier, tier, tube.nbytes) as plan:
            copy = _device_copy(int(tier.split(":")[1]), tube.nbytes, block)
            try:
                if src.tier == "host":  # over every route the plan chose, at once
                    view = memoryview(self.maps.map(src.segment))
                    parts = [(p.route.hops, p.offset, p.nbytes) for p in plan.parts]
                    took = multipath_host_to_device(
                        self.engines,
                        view[src.offset : src.offset + tube.nbytes],
                        copy.tensor,
                        parts,
                    )
                else:
                    peer = self._device_copies[(tube.id, src.tier)].tensor
                    took = self.engines[tier].device_to_device(peer, copy.tensor)
            except BaseException:
                copy.free()
                raise
            self._device_copies[(tube.id, tier)] = copy
        ipc = f"ipc:{copy.handle.hex()}"
        placed = Placement(node=self.config.node_id, tier=tier, segment=ipc, offset=copy.offset)
        return placed, took, describe(plan)

    async def _fetch_remote(self, tube: Tube) -> tuple[Placement, str]:
        """Copy another live node's host copy here, in chunks, a window of them in flight."""
        alive = await live_nodes(self.js, self.buckets.nodes, self.config.node_ttl_s)
        # Host copies, and on simulated GPUs their copies too (files the holder serves).
        remote = [
            p
            for p in tube.placements
            if p.node != self.config.node_id
            and (p.tier == "host" or (p.tier.startswith("gpu") and not self._cuda))
        ]
        gone = {p.node for p in remote if p.node not in alive}
        if gone:
            await self._drop_placements(tube.id, tube.tenant, gone)
        sources = [p for p in remote if p.node in alive]
        stored = any(p.tier == "object" for p in tube.placements)
        if not sources and not stored:
            raise NotFound(f"tube {tube.id!r} has no copy on a live node", field="tube")
        relpath = f"{TUBES_DIR}/{self.config.node_id}/{tube.id}"
        final = self.config.shm_dir / relpath
        final.parent.mkdir(parents=True, exist_ok=True)
        here = Placement(node=self.config.node_id, tier="host", segment=relpath)
        if not sources:  # read back from the object tier (renamed into place once checked)
            await get_object(self.js, OBJECT_BUCKET, tube.id, final)
            return here, "object->host"
        src = sources[0].node
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        try:
            await self._fetch_into(tube, src, tmp)
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return here, f"host({src})->host"

    async def _fetch_into(self, tube: Tube, src_node: str, tmp: Path) -> None:
        subject = subjects.node(src_node, self.name, subjects.TRANSFER_FETCH)
        f = await asyncio.to_thread(open, tmp, "wb+")
        with f:
            f.truncate(tube.nbytes)
            if tube.nbytes == 0:
                return
            with mmap.mmap(f.fileno(), tube.nbytes) as out:
                window = asyncio.Semaphore(FETCH_WINDOW)

                async def one(offset: int) -> None:
                    n = min(FETCH_CHUNK_BYTES, tube.nbytes - offset)
                    async with window:
                        try:
                            reply = await request(
                                self.nc,
                                subject,
                                FetchRequest(
                                    tube_id=tube.id, tenant=tube.tenant, offset=offset, nbytes=n
                                ),
                                FetchReply,
                                timeout=self.config.request_timeout_s,
                            )
                        except PlatformError as exc:
                            raise Unavailable(
                                f"copying tube {tube.id!r} from node {src_node} failed: "
                                f"{exc.message}"
                            ) from None
                    if len(reply.data) != n:
                        raise Unavailable(f"node {src_node} sent a short chunk of {tube.id!r}")
                    out[offset : offset + n] = reply.data

                chunks = range(0, tube.nbytes, FETCH_CHUNK_BYTES)
                tasks = [asyncio.create_task(one(o)) for o in chunks]
                try:
                    await asyncio.gather(*tasks)
                finally:  # on a failure, stop the rest before the mapping closes
                    for t in tasks:
                        t.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)


def _device_to_host(src: torch.Tensor, dst: mmap.mmap | memoryview) -> None:
    """(Real GPUs, off the loop.) A device copy's bytes into a host mapping."""
    import torch  # noqa: PLC0415 - only nodes with GPUs get here

    torch.frombuffer(dst, dtype=torch.uint8).copy_(src.reshape(-1).view(torch.uint8))
    torch.cuda.synchronize(src.device)


def _met(req: EnsureRequest, took_s: float) -> bool | None:
    """Whether the copy left the function its inference time within the SLO."""
    if req.slo_ms is None:
        return None
    return took_s * 1e3 + req.inference_ms <= req.slo_ms


def _dir(tier: str) -> str:
    return tier.replace(":", "")  # "gpu:0" -> "gpu0"


def _tier(directory: str) -> str:
    return f"gpu:{directory.removeprefix('gpu')}"
