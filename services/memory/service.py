"""The memory service of one node: a pool of segments per GPU, allocations, and leases.

A thin front over state objects, each with one concern and its own tests:

* ``NodePools`` (``devices.py``): the pools, one per GPU and the host tier's, and the
  thread each device's calls run on (``pool.py``: segments sub-allocated, given back
  after an idle keep-alive);
* ``Ledger`` (``ledger.py``): allocations and segments, written to the ``memory`` KV
  bucket before the reply, so a restarted manager loses nothing; owners' leases, whose
  lapsed owners' blocks are freed;
* ``Holds`` (``holds.py``): elastic reservations for intermediates, ``R_size · R_con``
  per function and GPU from the requests workers report (``observe``);
* ``ResidencyBook`` and ``ResidencyPass`` (``residency.py``, ``residency_pass.py``): the
  queue-aware residency of model copies and tube copies, from the scheduler's queue
  views (``queue_view``), with its views, rejections and model caches kept in KV.

The service wires them, serves its endpoint table, and runs one supervised loop: the
residency pass at the queue views' pace and the upkeep (:meth:`reconcile_once`: each
manager's step in its own error boundary) every reclaim interval.

On a real GPU the segments are ``cudaMalloc`` allocations and every allocation reply
carries the segment's CUDA IPC handle with the block's offset. A manager restarted on a
real GPU cannot take over the old process's memory: restored segments are new memory with
new handles (same ids, sizes and blocks), and what holders had written there is gone.
"""

from __future__ import annotations

import time
from typing import Final, TypeVar

import structlog

from gpufaas.memory import policy
from gpufaas.memory.devices import NodePools
from gpufaas.memory.holds import Holds
from gpufaas.memory.ledger import RESERVATION_OWNER, Ledger
from gpufaas.memory.pool import SegmentPool
from gpufaas.memory.records import SEGMENT_BYTES, MemoryKeys
from gpufaas.memory.residency import ResidencyBook
from gpufaas.memory.residency_pass import NodePeers, ResidencyPass
from gpufaas.shared import subjects
from gpufaas.shared.config import Config
from gpufaas.shared.devices import NodeDevices, parse_devices
from gpufaas.shared.kv import Codec
from gpufaas.shared.messages import (
    CapacityReply,
    CapacityRequest,
    DeviceInfo,
    MemAllocation,
    MemAllocRequest,
    MemFreeReply,
    MemFreeRequest,
    MemListReply,
    MemListRequest,
    MemObserve,
    MemRejection,
    MemRenewReply,
    MemRenewRequest,
    MemStatsReply,
    MemStatsRequest,
    MemViewAck,
    ModelCache,
    QueueView,
)
from gpufaas.shared.paths import check_root
from gpufaas.shared.service import Endpoint, Service, endpoint

log = structlog.get_logger()
T = TypeVar("T")

__all__ = ["RESERVATION_OWNER", "RESERVATION_WINDOW_S", "MemoryService"]

RESERVATION_WINDOW_S: Final = 60.0
DEFAULT_H2D_BPS: Final = 12e9  # host->GPU rate when the topology names no link (PCIe 3 x16)
VIEW_TICKS: Final = 3  # a replica's queue view older than this many ticks is dropped


class MemoryService(Service):
    """Owns the node's device budgets: pools, allocations and their owners' leases."""

    name = "memory"

    def __init__(self, config: Config, *, cuda_segment_bytes: int | None = None) -> None:
        super().__init__(config)
        check_root(config.shm_dir)  # ours alone (0700), or refused: exit 2 naming it
        self.node_devices: NodeDevices = parse_devices(config.devices, config.topology)
        self.cuda = self.node_devices.backend == "cuda"
        self.node_pools = NodePools.from_config(
            config, self.node_devices, cuda_segment_bytes=cuda_segment_bytes
        )
        self.keys = MemoryKeys(config.node_id)
        self._upkeep_at = 0.0
        # The state objects are made at start, when the KV buckets are there.
        self._ledger: Ledger | None = None
        self._holds: Holds | None = None
        self._residency: ResidencyPass | None = None

    @property
    def pools(self) -> dict[str, SegmentPool]:
        """The GPUs' pools by device name."""
        return self.node_pools.gpus

    @property
    def host_pool(self) -> SegmentPool | None:
        """The host tier's pool (a node with GPUs only)."""
        return self.node_pools.host

    @property
    def ledger(self) -> Ledger:
        assert self._ledger is not None, "memory service not started"
        return self._ledger

    @property
    def holds(self) -> Holds:
        assert self._holds is not None, "memory service not started"
        return self._holds

    @property
    def residency(self) -> ResidencyPass:
        assert self._residency is not None, "memory service not started"
        return self._residency

    def devices(self) -> list[DeviceInfo]:
        return self.node_devices.devices

    # --- wiring ------------------------------------------------------------------------

    async def on_start(self) -> None:
        self._wire()
        keys = await self.kv.memory.keys(self.keys.node_prefix)  # listed once, for all
        await self.ledger.restore(keys, time.time())
        await self.residency.book.restore(keys, self.node_pools.all())
        tick = min(self.config.reclaim_interval_s, self.config.autoscale_interval_s)
        self._upkeep_at = time.time() + self.config.reclaim_interval_s
        self.every(tick, lambda: self._tick(time.time(), tick), "reconcile")

    def _wire(self) -> None:
        cfg, kv = self.config, self.kv
        self._ledger = Ledger(
            self.node_pools,
            self.keys,
            kv.view(kv.memory, Codec.json(MemAllocation)),
            kv.view(kv.memory, SEGMENT_BYTES),
            lease_s=cfg.node_ttl_s,
            announce=lambda kind, data: self.after_reply(self.publish_event(kind, data)),
        )
        # A request lasts until its deadline at most (request_timeout_s): one that never
        # reports its end (a dead worker) stops counting after twice that.
        self._holds = Holds(
            self._ledger,
            self.pools,
            window_s=RESERVATION_WINDOW_S,
            max_request_s=2 * cfg.request_timeout_s,
        )
        book = ResidencyBook(
            self.keys,
            kv.view(kv.memory, Codec.json(QueueView)),
            kv.view(kv.memory, Codec.json(MemRejection)),
            kv.view(kv.memory, Codec.json(ModelCache)),
            max_view_age_s=VIEW_TICKS * cfg.autoscale_interval_s + 1.0,
        )
        peers = NodePeers(
            lambda: self.nc,
            cfg.node_id,
            request_timeout_s=cfg.request_timeout_s,
            deploy_timeout_s=cfg.deploy_timeout_s,
        )
        self._residency = ResidencyPass(
            self._ledger, self._holds, book, peers, self.publish_event, h2d_bps=self._h2d_bps()
        )

    def _h2d_bps(self) -> dict[str, float]:
        topo = self.node_devices.topology
        return {
            d: (ln.gbps * 1e9 if (ln := topo.link("host", d)) else DEFAULT_H2D_BPS)
            if topo is not None
            else DEFAULT_H2D_BPS
            for d in self.pools
        }

    def endpoints(self) -> list[Endpoint]:
        def own(verb: str) -> str:
            return subjects.node(self.config.node_id, self.name, verb)

        return [
            endpoint(own(subjects.MEMORY_CAPACITY), CapacityRequest, self.capacity),
            endpoint(own(subjects.MEMORY_ALLOC), MemAllocRequest, self.alloc),
            endpoint(own(subjects.MEMORY_FREE), MemFreeRequest, self.free),
            endpoint(own(subjects.MEMORY_RENEW), MemRenewRequest, self.renew),
            endpoint(own(subjects.MEMORY_STATS), MemStatsRequest, self.stats),
            endpoint(own(subjects.MEMORY_LIST), MemListRequest, self.list_allocations),
            endpoint(own(subjects.MEMORY_OBSERVE), MemObserve, self.observe),
            endpoint(own(subjects.MEMORY_QUEUE_VIEW), QueueView, self.queue_view),
        ]

    async def on_stop(self) -> None:
        """A real GPU's segments go back to the driver (a restart re-creates them from KV);
        the host pool's files stay, with what was swapped into them (a restart adopts them)."""
        if self._ledger is not None:
            await self._ledger.close(release_gpus=self.cuda)
        else:
            await self.node_pools.close(release_gpus=False)

    # --- requests ----------------------------------------------------------------------

    async def capacity(self, _: CapacityRequest) -> CapacityReply:
        return CapacityReply(node=self.config.node_id, devices=self.node_devices.devices)

    async def alloc(self, req: MemAllocRequest) -> MemAllocation:
        return await self.ledger.alloc(req.device, req.nbytes, req.owner, req.item, req.swap_bytes)

    async def free(self, req: MemFreeRequest) -> MemFreeReply:
        return MemFreeReply(freed=await self.ledger.free(req.device, req.id))

    async def renew(self, req: MemRenewRequest) -> MemRenewReply:
        return MemRenewReply(allocations=self.ledger.renew(req.owner))

    async def list_allocations(self, req: MemListRequest) -> MemListReply:
        return MemListReply(allocations=self.ledger.owned(req.device, req.owner))

    async def stats(self, _: MemStatsRequest) -> MemStatsReply:
        return MemStatsReply(
            node=self.config.node_id, pools=self.ledger.stats(), reserved=self.holds.by_name()
        )

    async def observe(self, req: MemObserve) -> MemFreeReply:
        """A worker's report of a request starting or ending (fed to the reservations)."""
        return MemFreeReply(freed=self.holds.observe(req, time.time()))

    async def queue_view(self, view: QueueView) -> MemViewAck:
        """A scheduler replica's view of this node's queued and running work (each tick).

        The latest per replica is kept, in KV too: a restarted manager still knows what the
        queued requests need before the next tick."""
        if view.node != self.config.node_id:
            return MemViewAck(accepted=False)
        return MemViewAck(accepted=await self.residency.book.accept(view))

    # --- the reconcile loop ------------------------------------------------------------

    async def _tick(self, now: float, tick: float) -> None:
        """The residency pass at the queue views' pace, the upkeep every reclaim interval.
        Each pass prefetches what falls due before the next one (``horizon_s``)."""
        if now >= self._upkeep_at:
            self._upkeep_at = now + self.config.reclaim_interval_s
            await self.reconcile_once(now, horizon_s=tick)
        else:
            await self.policy_once(now, horizon_s=tick)

    async def reconcile_once(self, now: float, *, horizon_s: float = 0.0) -> policy.Actions:
        """Free lapsed owners' allocations, resize the reservations, give back segments idle
        for the keep-alive; then the queue-aware residency pass (:meth:`policy_once`).

        Each step runs in its own error boundary. Tests call it with a chosen ``now``.
        Returns the residency actions carried out.
        """
        nobody: list[str] = []
        await self.bounded("reconcile.leases", lambda: self.ledger.lapse(now), nobody)
        await self.bounded("reconcile.holds", lambda: self.holds.update(now), None)
        keep_alive = self.config.tensor_keep_alive_s
        await self.bounded(
            "reconcile.segments", lambda: self.ledger.release_idle(now, keep_alive), None
        )
        return await self.policy_once(now, horizon_s=horizon_s)

    async def policy_once(self, now: float, *, horizon_s: float = 0.0) -> policy.Actions:
        """One queue-aware residency pass at ``now`` (see ``ResidencyPass.run``); a pass
        that fails (no tensor store yet, the bus away) does nothing."""
        return await self.bounded(
            "reconcile.residency", lambda: self.residency.run(now, horizon_s), policy.Actions()
        )
