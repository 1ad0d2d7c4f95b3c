"""The memory service of one node: a pool of segments per GPU, allocations, and leases.

One budget per GPU: allocations are sub-allocated from segments added as demand grows
and given back after an idle keep-alive (``pool.py``). Every change is written to the
``memory`` KV bucket before the reply (segments and allocations, one key each), so a
restarted manager rebuilds its pools exactly and loses nothing. Allocations belong to an
owner that renews them; an owner that stops (a worker that died) has its allocations
freed once its lease lapses (after the node TTL, and never during the grace period
after a restart, while owners re-announce).

On a simulated GPU the pool accounts the capacity; on a real GPU it budgets the same way
until a CUDA backend (device segments exported by IPC handle) is added.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

import nats.js.errors
import structlog

from gpufaas.memory.pool import Allocation, PoolEvent, SegmentPool, SimBackend
from gpufaas.shared import subjects
from gpufaas.shared.config import Config
from gpufaas.shared.constants import KV_MEMORY
from gpufaas.shared.devices import NodeDevices, parse_devices
from gpufaas.shared.errors import InvalidArgument, NotFound, ResourceExhausted
from gpufaas.shared.jetstream import bucket_keys
from gpufaas.shared.messages import (
    CapacityReply,
    CapacityRequest,
    DeviceInfo,
    MemAllocation,
    MemAllocRequest,
    MemFreeReply,
    MemFreeRequest,
    MemPoolStats,
    MemRenewReply,
    MemRenewRequest,
    MemStatsReply,
    MemStatsRequest,
    decode_json,
    encode_json,
)
from gpufaas.shared.service import Service

log = structlog.get_logger()


def _dev(device: str) -> str:
    return device.replace(":", "")  # "gpu:0" -> "gpu0": a KV key token


class MemoryService(Service):
    """Owns the node's device budgets: pools, allocations and their owners' leases."""

    name = "memory"

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.node_devices: NodeDevices = parse_devices(config.devices, config.topology)
        self.pools = {
            d.name: SegmentPool(d.name, d.memory_bytes, SimBackend(), clock=time.time)
            for d in self.node_devices.devices
            if d.kind != "host"
        }
        self._expiry: dict[str, float] = {}  # owner -> when its lease lapses
        self._lock = asyncio.Lock()  # pool changes and their KV writes, in order

    def devices(self) -> list[DeviceInfo]:
        return self.node_devices.devices

    async def on_start(self) -> None:
        await self._restore()
        node = self.config.node_id
        for verb, req_type, handler in (
            (subjects.MEMORY_CAPACITY, CapacityRequest, self.capacity),
            (subjects.MEMORY_ALLOC, MemAllocRequest, self.alloc),
            (subjects.MEMORY_FREE, MemFreeRequest, self.free),
            (subjects.MEMORY_RENEW, MemRenewRequest, self.renew),
            (subjects.MEMORY_STATS, MemStatsRequest, self.stats),
        ):
            await self.serve(subjects.node(node, self.name, verb), req_type, handler)  # type: ignore[arg-type]
        self.spawn(self._reconcile_loop(), "reconcile")

    async def capacity(self, _: CapacityRequest) -> CapacityReply:
        return CapacityReply(node=self.config.node_id, devices=self.node_devices.devices)

    # --- requests ----------------------------------------------------------------------------

    def _pool(self, device: str) -> SegmentPool:
        pool = self.pools.get(device)
        if pool is None:
            raise InvalidArgument(
                f"device {device!r} has no pool on node {self.config.node_id} "
                f"(it has {', '.join(sorted(self.pools)) or 'none'})",
                field="device",
            )
        return pool

    async def alloc(self, req: MemAllocRequest) -> MemAllocation:
        pool = self._pool(req.device)
        async with self._lock:
            try:
                a = pool.alloc(req.nbytes, req.owner)
            except ResourceExhausted as exc:
                self.after_reply(self.publish_event("memory.pressure", {
                    "node": self.config.node_id, "device": req.device, "bytes": req.nbytes,
                    "reason": exc.message,
                }))  # fmt: skip
                raise
            self._expiry.setdefault(req.owner, time.time() + self.config.node_ttl_s)
            await self._persist_events(pool)
            await self.buckets.memory.put(
                self._alloc_key(req.device, a), encode_json(_msg(req.device, a))
            )
        return _msg(req.device, a)

    async def free(self, req: MemFreeRequest) -> MemFreeReply:
        pool = self._pool(req.device)
        async with self._lock:
            try:
                a = pool.get(req.id)
            except NotFound:  # unknown or already freed: idempotent
                return MemFreeReply(freed=False)
            pool.free(a.id)
            await self.buckets.memory.delete(self._alloc_key(req.device, a))
            await self._persist_events(pool)
        return MemFreeReply(freed=True)

    async def renew(self, req: MemRenewRequest) -> MemRenewReply:
        self._expiry[req.owner] = time.time() + self.config.node_ttl_s
        held = sum(1 for p in self.pools.values() for a in p.allocations() if a.owner == req.owner)
        return MemRenewReply(allocations=held)

    async def stats(self, _: MemStatsRequest) -> MemStatsReply:
        return MemStatsReply(
            node=self.config.node_id,
            pools=[MemPoolStats(**dataclasses.asdict(p.stats())) for p in self.pools.values()],
        )

    # --- the reconcile loop -------------------------------------------------------------------

    async def reconcile_once(self, now: float) -> None:
        """Free lapsed owners' allocations, give back segments idle for the keep-alive.

        Tests call it with a chosen ``now``.
        """
        async with self._lock:
            lapsed = [o for o, t in self._expiry.items() if t < now]
            for owner in lapsed:
                del self._expiry[owner]
                for pool in self.pools.values():
                    gone = [a for a in pool.allocations() if a.owner == owner]
                    pool.free_owner(owner)
                    for a in gone:
                        await self.buckets.memory.delete(self._alloc_key(pool.device, a))
                log.info("memory.owner_lapsed", owner=owner)
            for pool in self.pools.values():
                pool.release_idle(now, self.config.tensor_keep_alive_s)
                await self._persist_events(pool)

    async def _reconcile_loop(self) -> None:
        while self.looping:
            await asyncio.sleep(self.config.reclaim_interval_s)
            await self.reconcile_once(time.time())

    # --- state in KV ----------------------------------------------------------------------------

    def _prefix(self, device: str) -> str:
        return f"{self.config.node_id}.{_dev(device)}"

    def _alloc_key(self, device: str, a: Allocation) -> str:
        return f"{self._prefix(device)}.a.{a.id}"

    async def _persist_events(self, pool: SegmentPool) -> None:
        for ev in pool.drain_events():
            key = f"{self._prefix(pool.device)}.s.{ev.segment}"
            if ev.kind == "grow":
                await self.buckets.memory.put(key, str(ev.segment_bytes).encode())
            else:
                await self.buckets.memory.delete(key)
            self.after_reply(self._resized(ev))

    async def _resized(self, ev: PoolEvent) -> None:
        await self.publish_event("memory.pool.resized", {
            "node": self.config.node_id, "device": ev.device, "kind": ev.kind,
            "bytes": ev.segment_bytes, "reserved_bytes": ev.reserved_bytes,
        })  # fmt: skip

    async def _restore(self) -> None:
        """Rebuild the pools from KV; owners get a grace period to renew."""
        grace = time.time() + self.config.node_ttl_s
        for device, pool in self.pools.items():
            prefix = f"{self._prefix(device)}."
            segments: dict[str, int] = {}
            allocs: list[Allocation] = []
            for key in await bucket_keys(self.js, KV_MEMORY):
                if not key.startswith(prefix):
                    continue
                try:
                    entry = await self.buckets.memory.get(key)
                except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                    continue
                if entry.value is None:
                    continue
                kind, _, rest = key[len(prefix) :].partition(".")
                if kind == "s":
                    segments[rest] = int(entry.value)
                elif kind == "a":
                    m = decode_json(entry.value, MemAllocation)
                    allocs.append(Allocation(m.id, m.segment, m.offset, m.nbytes, m.owner))
            pool.restore(segments, sorted(allocs, key=lambda a: a.id))
            for a in allocs:
                self._expiry[a.owner] = grace
            if segments:
                log.info("memory.restored", device=device, segments=len(segments),
                         allocations=len(allocs))  # fmt: skip


def _msg(device: str, a: Allocation) -> MemAllocation:
    return MemAllocation(id=a.id, device=device, segment=a.segment, offset=a.offset,
                         nbytes=a.nbytes, owner=a.owner)  # fmt: skip
