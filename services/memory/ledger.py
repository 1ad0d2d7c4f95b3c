"""The allocations of the node's pools, their owners' leases, and their records in KV.

Every change is written to the ``memory`` bucket before the caller hears of it (segments
and allocations, one key each), so a restarted manager rebuilds its pools exactly and
loses nothing. An allocation belongs to an owner that renews it; an owner that stops (a
worker that died) has its allocations freed once its lease lapses, and never during the
grace period after a restart, while owners re-announce.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import structlog

from gpufaas.memory.devices import NodePools
from gpufaas.memory.pool import Allocation, PoolEvent, SegmentPool
from gpufaas.memory.records import SEGMENT_ID, MemoryKeys, Store
from gpufaas.shared.errors import NotFound, ResourceExhausted
from gpufaas.shared.messages import MemAllocation, MemPoolStats

log = structlog.get_logger()

# The owner of an older manager's reservation blocks (reservations are holds now, see
# holds.py): freed when found in KV on restore.
RESERVATION_OWNER = "reservation:"

# An event to publish after the reply: (kind, data).
Announce = Callable[[str, dict[str, Any]], None]


class Movable(NamedTuple):
    """What a block holds when the residency pass may move it (a tube's copy)."""

    item: str
    at: float  # when it was made
    swap_bytes: int  # what moving it to the host tier would copy


class Leases:
    """When each owner's lease lapses; renewed by the owner, lapsed ones collected."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self.expiry: dict[str, float] = {}  # owner -> when its lease lapses

    def first(self, owner: str, now: float) -> None:
        """An owner's first allocation starts its lease (a renewal does not shorten it)."""
        self.expiry.setdefault(owner, now + self.ttl_s)

    def renew(self, owner: str, now: float) -> None:
        self.expiry[owner] = now + self.ttl_s

    def grace(self, owner: str, until: float) -> None:
        self.expiry[owner] = until

    def lapsed(self, now: float) -> list[str]:
        """The owners whose lease lapsed before ``now``, forgotten."""
        gone = [o for o, t in self.expiry.items() if t < now]
        for owner in gone:
            del self.expiry[owner]
        return gone


class Ledger:
    """The pools' allocations and segments, persisted; the owners' leases; the movable
    items. Changes run under one lock, each with its KV writes, in order."""

    def __init__(
        self,
        pools: NodePools,
        keys: MemoryKeys,
        allocs: Store[MemAllocation],
        segments: Store[int],
        *,
        lease_s: float,
        announce: Announce,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.pools = pools
        self.keys = keys
        self.allocs = allocs
        self.segments = segments
        self.leases = Leases(lease_s)
        self.announce = announce
        self.clock = clock
        self.items: dict[tuple[str, int], Movable] = {}  # (device, block) -> what it holds
        self.lock = asyncio.Lock()

    # --- requests ----------------------------------------------------------------------

    async def alloc(
        self, device: str, nbytes: int, owner: str, item: str = "", swap_bytes: int = 0
    ) -> MemAllocation:
        """Allocate and record it; the owner's lease starts with its first block."""
        pool = self.pools.get(device)
        async with self.lock:
            a = await self._alloc(pool, nbytes, owner, item, swap_bytes)
            self.leases.first(owner, self.clock())
        return self.message(device, a)

    async def _alloc(
        self, pool: SegmentPool, nbytes: int, owner: str, item: str, swap_bytes: int
    ) -> Allocation:
        try:
            if pool.fits(nbytes):  # the common case: bookkeeping only, inline
                a = pool.alloc(nbytes, owner)
            else:
                a = await self.pools.run(pool, pool.alloc, nbytes, owner)
        except ResourceExhausted as exc:
            await self._persist_events(pool)  # idle segments it gave back trying to grow
            self.announce(
                "memory.pressure",
                {
                    "node": self.keys.node,
                    "device": pool.device,
                    "bytes": nbytes,
                    "reason": exc.message,
                },
            )
            raise
        await self._persist_events(pool)
        if item:
            self.items[(pool.device, a.id)] = Movable(item, self.clock(), swap_bytes)
        await self.allocs.put(self.keys.alloc(pool.device, a.id), self.message(pool.device, a))
        return a

    async def free(self, device: str, alloc_id: int) -> bool:
        """Free a block; False when unknown or already freed (idempotent)."""
        pool = self.pools.get(device)
        async with self.lock:
            try:
                await self._free(pool, alloc_id)
            except NotFound:
                return False
        return True

    async def _free(self, pool: SegmentPool, alloc_id: int) -> None:
        """(Under the lock.) Free and forget it in KV."""
        pool.get(alloc_id)  # NotFound when unknown
        pool.free(alloc_id)
        self.items.pop((pool.device, alloc_id), None)
        await self.allocs.delete(self.keys.alloc(pool.device, alloc_id))
        await self._persist_events(pool)

    def renew(self, owner: str) -> int:
        """Renew an owner's lease; how many blocks it holds."""
        self.leases.renew(owner, self.clock())
        return sum(
            1 for p in self.pools.all().values() for a in p.allocations() if a.owner == owner
        )

    def owned(self, device: str, owner: str) -> list[MemAllocation]:
        pool = self.pools.get(device)
        return [self.message(device, a) for a in pool.allocations() if a.owner == owner]

    def stats(self) -> list[MemPoolStats]:
        return [MemPoolStats(**dataclasses.asdict(p.stats())) for p in self.pools.all().values()]

    async def hold(self, device: str, key: str, nbytes: int) -> bool:
        """Set a hold of ``device``'s pool (see ``SegmentPool.hold``); False, and the hold
        let go, when the pool cannot keep it."""
        pool = self.pools.get(device)
        async with self.lock:
            try:
                await self.pools.run(pool, pool.hold, key, nbytes)
            except ResourceExhausted:
                pool.hold(key, 0)
                return False
            finally:
                await self._persist_events(pool)  # empty segments it gave back
        return True

    # --- upkeep ------------------------------------------------------------------------

    async def lapse(self, now: float) -> list[str]:
        """Free the blocks of owners whose lease lapsed before ``now``; returns them."""
        async with self.lock:
            lapsed = self.leases.lapsed(now)
            for owner in lapsed:
                for pool in self.pools.all().values():
                    for a in [a for a in pool.allocations() if a.owner == owner]:
                        await self._free(pool, a.id)
                log.info("memory.owner_lapsed", owner=owner)
        return lapsed

    async def release_idle(self, now: float, keep_alive_s: float) -> None:
        """Give back segments empty for the keep-alive."""
        async with self.lock:
            for pool in self.pools.all().values():
                await self.pools.run(pool, pool.release_idle, now, keep_alive_s)
                await self._persist_events(pool)

    async def close(self, *, release_gpus: bool) -> None:
        async with self.lock:
            await self.pools.close(release_gpus=release_gpus)

    # --- records -----------------------------------------------------------------------

    def message(self, device: str, a: Allocation) -> MemAllocation:
        item, at, swap = self.items.get((device, a.id), Movable("", 0.0, 0))
        return MemAllocation(
            id=a.id,
            device=device,
            segment=a.segment,
            offset=a.offset,
            nbytes=a.nbytes,
            owner=a.owner,
            handle=a.handle,
            item=item,
            at=at,
            swap_bytes=swap,
        )

    async def _persist_events(self, pool: SegmentPool) -> None:
        for ev in pool.drain_events():
            key = self.keys.segment(pool.device, ev.segment)
            if ev.kind == "grow":
                await self.segments.put(key, ev.segment_bytes)
            else:
                await self.segments.delete(key)
            self.announce("memory.pool.resized", self._resized(ev))

    def _resized(self, ev: PoolEvent) -> dict[str, Any]:
        return {
            "node": self.keys.node,
            "device": ev.device,
            "kind": ev.kind,
            "bytes": ev.segment_bytes,
            "reserved_bytes": ev.reserved_bytes,
        }

    async def restore(self, keys: list[str], now: float) -> None:
        """Rebuild the pools from their records (``keys``: the node's, listed once); owners
        get a lease's grace to renew; an older manager's reservation blocks are freed."""
        grace = now + self.leases.ttl_s
        for device, pool in self.pools.all().items():
            segments, allocs = await self._read(device, keys)
            await self.pools.run(pool, pool.restore, segments, sorted(allocs, key=lambda a: a.id))
            for a in allocs:
                if a.owner.startswith(RESERVATION_OWNER):  # an older manager's: holds now
                    async with self.lock:
                        await self._free(pool, a.id)
                else:
                    self.leases.grace(a.owner, grace)
            if segments:
                log.info(
                    "memory.restored",
                    device=device,
                    segments=len(segments),
                    allocations=len(allocs),
                )
        await asyncio.to_thread(self.pools.remove_orphans)

    async def _read(self, device: str, keys: list[str]) -> tuple[dict[str, int], list[Allocation]]:
        """A device's segments and allocations as recorded (their items noted)."""
        segments: dict[str, int] = {}
        allocs: list[Allocation] = []
        for key in keys:
            kind, rest = self.keys.kind(device, key) or ("", "")
            if kind == "s" and (size := await self.segments.value(key)) is not None:
                if not rest or not SEGMENT_ID.match(rest):  # a forged key: never a file name
                    log.warning("memory.segment_record_refused", key=key[:200])
                    continue
                segments[rest] = size
            elif kind == "a" and (m := await self.allocs.value(key)) is not None:
                if m.item:
                    self.items[(device, m.id)] = Movable(m.item, m.at, m.swap_bytes)
                allocs.append(Allocation(m.id, m.segment, m.offset, m.nbytes, m.owner))
        return segments, allocs
