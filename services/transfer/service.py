"""The transfer service of one node: its tube directory, and copies between tiers and nodes.

``ensure(tube, tier)`` makes a tube resident on a tier of this node, a no-op when it
already is: from this node's host copy to a GPU, from another node's host copy (fetched
from that node's transfer service in chunks, a bounded window in flight), or from the
object tier. The bytes are written first and the placement is added to the tube's KV
entry after (compare-and-set), so no placement ever points at half-written bytes; a
copy that fails leaves nothing behind. Placements on nodes that left are dropped when
found. Only the tube's tenant can resolve or move it; for anyone else it does not exist.

A copy to a GPU takes its room from the node's memory service (``MemoryClient``), naming
the tube (``tube:<id>``), so the memory manager can weigh it against what queued requests
need: ``release(tube, tier)`` (the manager's) drops this node's GPU copy, swapping it to
the host tier first when the node has no host copy.

This class is the front: wiring, the endpoint table and the loops. The work is done by
``TubeDirectory`` (KV records and placements), ``LocalCopies`` (this node's copies),
``TierCopies`` and ``PeerFetch`` (the copy paths), ``Swapper`` (release) and ``Sweeper``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time

import structlog

from gpufaas.shared import subjects
from gpufaas.shared.config import Config
from gpufaas.shared.devices import parse_devices
from gpufaas.shared.errors import InvalidArgument, NotFound
from gpufaas.shared.identity import is_gpu
from gpufaas.shared.jetstream import may_reshape, stream_max_bytes
from gpufaas.shared.memory_client import MemoryClient
from gpufaas.shared.messages import (
    AdoptReply,
    AdoptRequest,
    EnsureReply,
    EnsureRequest,
    FetchReply,
    FetchRequest,
    LinksReply,
    LinksRequest,
    ResolveReply,
    ResolveRequest,
    Tube,
    TubeReleaseReply,
    TubeReleaseRequest,
)
from gpufaas.shared.objects import ensure_object_bucket
from gpufaas.shared.paths import check_root
from gpufaas.shared.registry import alive
from gpufaas.shared.service import Endpoint, Service, endpoint
from gpufaas.shared.shm import SegmentCache
from gpufaas.shared.tube_fetch import FETCH_CHUNK_BYTES, FETCH_WINDOW
from gpufaas.transfer.copies import TierCopies, deadline_met
from gpufaas.transfer.cuda_engine import CudaCopyEngine
from gpufaas.transfer.directory import TubeDirectory
from gpufaas.transfer.discovery import calibrate, discover_topology
from gpufaas.transfer.emulator import EmulatedCopies
from gpufaas.transfer.links import NodeLinks, links_reply
from gpufaas.transfer.remote import PeerFetch
from gpufaas.transfer.residency import GPU_DIR, OBJECT_BUCKET, OBJECT_NODE, LocalCopies, gpu_index
from gpufaas.transfer.swap import Swapper
from gpufaas.transfer.sweeper import SWEEP_GRACE_S, Sweeper

log = structlog.get_logger()

__all__ = [
    "FETCH_CHUNK_BYTES",
    "FETCH_WINDOW",
    "GPU_DIR",
    "OBJECT_BUCKET",
    "OBJECT_NODE",
    "SWEEP_GRACE_S",
    "TransferService",
]


class TransferService(Service):
    """Knows where this node's tubes live and makes them resident where asked."""

    name = "transfer"

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        check_root(config.shm_dir)  # ours alone (0700), or refused: exit 2 naming it
        node_devices = parse_devices(config.devices, config.topology)
        self.tiers = {d.name for d in node_devices.devices} | {"object"}  # host, gpu:N, object
        self.simulated = node_devices.backend == "sim"
        self._cuda = node_devices.backend == "cuda"
        # The link model: a simulated node's topology file now, a real one's discovered and
        # calibrated at start (on_start); none without GPUs.
        self.links = NodeLinks(node_devices.topology) if node_devices.topology else None
        # Simulated GPUs: copies emulated in real time by the simulated copy engine.
        self.emulator = (
            EmulatedCopies(self.links.model, self.links.moved)
            if self.links and self.simulated
            else None
        )
        self.memory, self.host_memory = self._memory_clients()
        self.maps = SegmentCache(config.shm_dir)
        self.directory = TubeDirectory(lambda: self.kv.tubes)
        self.local = LocalCopies(config, self.tiers, self.memory, self.maps, cuda=self._cuda)
        self.peers = PeerFetch(
            self.directory,
            self.local,
            nc=lambda: self.nc,
            js=lambda: self.js,
            alive=lambda: alive(self.kv.nodes, config.node_ttl_s),
            timeout_s=config.request_timeout_s,
        )
        self.copies = TierCopies(
            config,
            self.directory,
            self.local,
            self.peers,
            self.memory,
            js=lambda: self.js,
            emulator=self.emulator,
            simulated=self.simulated,
        )
        self.copies.links = self.links
        self.swapper = Swapper(self.directory, self.local, self.host_memory, self.emulator)
        pooled = self.emulator is not None or self._cuda  # swaps into the host pool
        self.sweeper = Sweeper(self.directory, self.local, self.host_memory if pooled else None)
        self._copying: dict[tuple[str, str], asyncio.Task[EnsureReply]] = {}
        self._releasing: dict[tuple[str, str], asyncio.Task[TubeReleaseReply]] = {}

    def _memory_clients(self) -> tuple[MemoryClient, MemoryClient]:
        """Our GPU blocks' client, and the host pool's (swapped-out copies)."""
        node, timeout_s = self.config.node_id, self.config.request_timeout_s
        # Simulated GPUs: a stable owner, the blocks of copies on disk survive our
        # restarts. Real GPUs: the directory of copies is this process's, so a new process
        # is a new owner and a dead one's blocks lapse.
        owner = f"transfer@{node}"
        if self._cuda:
            owner = f"{owner}/{os.getpid()}/{time.time():.6f}"
        memory = MemoryClient(lambda: self.nc, node, owner, timeout_s=timeout_s)
        # Swapped-out copies in the host pool outlive this process (files): a stable owner.
        host = MemoryClient(lambda: self.nc, node, f"transfer@{node}", timeout_s=timeout_s)
        return memory, host

    async def on_start(self) -> None:
        await ensure_object_bucket(
            self.js,
            OBJECT_BUCKET,
            ttl_s=self.config.tube_ttl_s,
            replicas=self.replicas,
            max_bytes=stream_max_bytes(self.config)[f"OBJ_{OBJECT_BUCKET}"],
            reshape=may_reshape(self.config),
        )
        # Staging files of copies a crash cut short (the sweeper goes on removing them).
        await asyncio.to_thread(self.sweeper.sweep_staging, time.time())
        if self._cuda:
            await self._calibrate()
        self.every(self.config.reclaim_interval_s, self._sweep, "sweeper")
        beat = self.config.heartbeat_s
        if self.emulator is not None or self._cuda:
            # Capped backoff: a renewal never waits past the lease it keeps.
            lease = self.memory.renew_step
            self.every(beat, lease, "memory-lease", first=0, backoff_cap=beat)
        if self._cuda:
            lease = self.host_memory.renew_step
            self.every(beat, lease, "host-memory-lease", first=0, backoff_cap=beat)

    async def _calibrate(self) -> None:
        """Real GPUs: topology, pinned staging rings and calibration, once, at start."""
        topology = await asyncio.to_thread(discover_topology)
        if topology is not None:
            self.links = self.copies.links = NodeLinks(await asyncio.to_thread(calibrate, topology))
        for tier in self.local.gpus:
            engine = await asyncio.to_thread(CudaCopyEngine, gpu_index(tier))
            self.copies.engines[tier] = engine
            log.info("transfer.calibrated", gpu=tier, **dataclasses.asdict(engine.calibration))

    def endpoints(self) -> list[Endpoint]:
        def own(verb: str) -> str:
            return subjects.node(self.config.node_id, self.name, verb)

        return [
            endpoint(own(subjects.TRANSFER_RESOLVE), ResolveRequest, self.resolve),
            endpoint(own(subjects.TRANSFER_ENSURE), EnsureRequest, self.ensure),
            endpoint(own(subjects.TRANSFER_FETCH), FetchRequest, self.fetch),
            endpoint(own(subjects.TRANSFER_ADOPT), AdoptRequest, self.adopt),
            endpoint(own(subjects.TRANSFER_RELEASE), TubeReleaseRequest, self.release),
            endpoint(own(subjects.TRANSFER_LINKS), LinksRequest, self.links_stats),
        ]

    async def on_stop(self) -> None:
        if self.emulator is not None:
            await self.emulator.close()

    async def sweep_once(self, now: float) -> list[str]:
        """Free the copies of tubes gone from KV; the ids swept (see ``Sweeper``)."""
        return await self.sweeper.sweep_once(now)

    async def _sweep(self) -> None:
        await self.sweeper.sweep_once(time.time())

    # --- requests --------------------------------------------------------------------------

    async def links_stats(self, _: LinksRequest) -> LinksReply:
        """This node's links and the bytes each has carried (the console's topology)."""
        return links_reply(self.links, simulated=self.simulated)

    async def resolve(self, req: ResolveRequest) -> ResolveReply:
        """The file of a tube's copy on ``tier`` of this node (host or a simulated GPU)."""
        self._check_tier(req.tier)
        tube = await self.directory.tube(req.tube_id, req.tenant)
        here = self.local.find(tube, req.tier)
        if here is None:
            raise NotFound(f"tube {req.tube_id!r} has no copy on {req.tier} here", field="tube")
        return ResolveReply(tube=tube, path=str(self.local.path(here.segment)))

    async def ensure(self, req: EnsureRequest) -> EnsureReply:
        """Make the tube resident on ``req.tier`` of this node; one copy however many ask."""
        self._check_tier(req.tier)
        key = (req.tube_id, req.tier)
        releasing = self._releasing.get(key)
        if releasing is not None:  # a copy on its way out: ask again once it is gone
            await asyncio.wait([releasing])
        tube = await self.directory.tube(req.tube_id, req.tenant)
        here = self.local.find(tube, req.tier)
        if here is not None:
            return EnsureReply(
                tube=tube,
                placement=here,
                path="resident",
                nbytes=0,
                duration_us=0,
                simulated=False,
                deadline_met=deadline_met(req, 0.0),
            )
        task = self._copying.get(key)
        if task is None:
            task = asyncio.create_task(self._copy(tube, req))
            self._copying[key] = task
            task.add_done_callback(lambda _: self._copying.pop(key, None))
        return await asyncio.shield(task)

    async def _copy(self, tube: Tube, req: EnsureRequest) -> EnsureReply:
        reply, measured_s = await self.copies.copy(tube, req)
        self.after_reply(self._completed(reply, measured_s))
        return reply

    async def adopt(self, req: AdoptRequest) -> AdoptReply:
        """Move a worker's freshly written output file onto a simulated GPU's memory (see
        ``TierCopies.adopt``); 507 when the GPU has no room."""
        self._check_tier(req.tier)
        return AdoptReply(tube=await self.copies.adopt(req))

    async def release(self, req: TubeReleaseRequest) -> TubeReleaseReply:
        """(The memory manager, making room on a GPU.) Drop this node's copy of a tube on a
        GPU tier; its bytes stay on this node's host tier, copied there first when the node
        has no host copy (the swap). Refused while a copy to that tier is under way; an
        ``ensure`` of the tier meanwhile waits for the release, then copies it back."""
        self._check_tier(req.tier)
        if not is_gpu(req.tier):
            raise InvalidArgument(f"only GPU copies are released, not {req.tier!r}", field="tier")
        key = (req.tube_id, req.tier)
        if key in self._copying or key in self._releasing:
            return TubeReleaseReply(released=False, reason="copy in flight")
        task = asyncio.create_task(self.swapper.release(req))
        self._releasing[key] = task
        task.add_done_callback(lambda _: self._releasing.pop(key, None))
        return await asyncio.shield(task)

    async def fetch(self, req: FetchRequest) -> FetchReply:
        """A chunk of this node's host copy (or simulated-GPU copy: a file too), for another
        node's transfer service."""
        tube = await self.directory.tube(req.tube_id, req.tenant)
        return self.peers.chunk(tube, req)

    def _check_tier(self, tier: str) -> None:
        if tier not in self.tiers:
            raise InvalidArgument(
                f"tier {tier!r} is not on node {self.config.node_id} "
                f"(it has {', '.join(sorted(self.tiers))})",
                field="tier",
            )

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
