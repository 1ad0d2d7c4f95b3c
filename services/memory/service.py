"""The memory service of one node: a pool of segments per GPU, allocations, and leases.

One budget per GPU: allocations are sub-allocated from segments added as demand grows
and given back after an idle keep-alive (``pool.py``). Every change is written to the
``memory`` KV bucket before the reply (segments and allocations, one key each), so a
restarted manager rebuilds its pools exactly and loses nothing. Allocations belong to an
owner that renews them; an owner that stops (a worker that died) has its allocations
freed once its lease lapses (after the node TTL, and never during the grace period
after a restart, while owners re-announce).

Intermediates get elastic reservations: workers report each request's start and end
(``observe``), and every reconcile pass holds, per function and GPU, ``R_size · R_con``
bytes (p95 size times peak concurrency over a sliding window; ``reservations.py``), resized
as the load changes and released when the function goes idle, so an idle platform holds
little memory.

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
from gpufaas.memory.reservations import Reservation, ReservationTracker
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
    MemObserve,
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

RESERVATION_OWNER = "reservation:"  # blocks the manager holds for a function's intermediates
RESERVATION_WINDOW_S = 60.0


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
        self.observed = {d: ReservationTracker(window_s=RESERVATION_WINDOW_S) for d in self.pools}
        self._reserved: dict[tuple[str, str], tuple[int, int]] = {}  # (device, fn) -> block
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
            (subjects.MEMORY_OBSERVE, MemObserve, self.observe),
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
            a = await self._alloc(pool, req.nbytes, req.owner)
            self._expiry.setdefault(req.owner, time.time() + self.config.node_ttl_s)
        return _msg(req.device, a)

    async def _alloc(self, pool: SegmentPool, nbytes: int, owner: str) -> Allocation:
        """(Under the lock.) Allocate and record it in KV; pressure is announced."""
        try:
            a = pool.alloc(nbytes, owner)
        except ResourceExhausted as exc:
            self.after_reply(self.publish_event("memory.pressure", {
                "node": self.config.node_id, "device": pool.device, "bytes": nbytes,
                "reason": exc.message,
            }))  # fmt: skip
            raise
        await self._persist_events(pool)
        key, value = self._alloc_key(pool.device, a), encode_json(_msg(pool.device, a))
        await self.buckets.memory.put(key, value)
        return a

    async def _free(self, pool: SegmentPool, alloc_id: int) -> None:
        """(Under the lock.) Free and forget it in KV."""
        a = pool.get(alloc_id)
        pool.free(alloc_id)
        await self.buckets.memory.delete(self._alloc_key(pool.device, a))
        await self._persist_events(pool)

    async def observe(self, req: MemObserve) -> MemFreeReply:
        """A worker's report of a request starting or ending (fed to the reservations)."""
        tracker = self.observed.get(req.device)
        if tracker is None:
            return MemFreeReply(freed=False)
        if req.phase == "start":
            tracker.observe_start(req.function, req.request_id, req.nbytes, time.time())
        else:
            tracker.observe_end(req.function, req.request_id, time.time())
        return MemFreeReply(freed=True)

    async def free(self, req: MemFreeRequest) -> MemFreeReply:
        pool = self._pool(req.device)
        async with self._lock:
            try:
                await self._free(pool, req.id)
            except NotFound:  # unknown or already freed: idempotent
                return MemFreeReply(freed=False)
        return MemFreeReply(freed=True)

    async def renew(self, req: MemRenewRequest) -> MemRenewReply:
        self._expiry[req.owner] = time.time() + self.config.node_ttl_s
        held = sum(1 for p in self.pools.values() for a in p.allocations() if a.owner == req.owner)
        return MemRenewReply(allocations=held)

    async def stats(self, _: MemStatsRequest) -> MemStatsReply:
        return MemStatsReply(
            node=self.config.node_id,
            pools=[MemPoolStats(**dataclasses.asdict(p.stats())) for p in self.pools.values()],
            reserved={f"{d} {fn}": n for (d, fn), (_, n) in sorted(self._reserved.items())},
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
            for device, pool in self.pools.items():
                await self._resize_reservations(pool, self.observed[device].snapshot(now))
                pool.release_idle(now, self.config.tensor_keep_alive_s)
                await self._persist_events(pool)

    async def _resize_reservations(self, pool: SegmentPool, wanted: dict[str, Reservation]) -> None:
        """(Under the lock.) Hold R_size · R_con per function: grow at once, shrink when the
        want falls below half of what is held, release when idle."""
        for key in [k for k in self._reserved if k[0] == pool.device and k[1] not in wanted]:
            await self._free(pool, self._reserved.pop(key)[0])
        for fn, r in wanted.items():
            key, held = (pool.device, fn), self._reserved.get((pool.device, fn))
            if held is not None and r.desired_bytes <= held[1] < 2 * r.desired_bytes:
                continue
            if held is not None:
                await self._free(pool, self._reserved.pop(key)[0])
            if r.desired_bytes:
                try:
                    a = await self._alloc(pool, r.desired_bytes, f"{RESERVATION_OWNER}{fn}")
                except ResourceExhausted:
                    continue  # announced as pressure; requests still run, growing the pool
                self._reserved[key] = (a.id, r.desired_bytes)

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
                if a.owner.startswith(RESERVATION_OWNER):  # ours: re-sized by the next pass
                    fn = a.owner.removeprefix(RESERVATION_OWNER)
                    self._reserved[(device, fn)] = (a.id, a.nbytes)
                else:
                    self._expiry[a.owner] = grace
            if segments:
                log.info("memory.restored", device=device, segments=len(segments),
                         allocations=len(allocs))  # fmt: skip


def _msg(device: str, a: Allocation) -> MemAllocation:
    return MemAllocation(id=a.id, device=device, segment=a.segment, offset=a.offset,
                         nbytes=a.nbytes, owner=a.owner)  # fmt: skip
