"""Room on a GPU for a device tier's new copies: blocks of the GPU's budget.

The node's memory service keeps one budget per GPU for model tensors and intermediates;
a tier's new copies first get a block from it. When the GPU has no room, the tier's own
idle copies are evicted (least recently used first) until it has, or there are none.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from gpufaas.shared.errors import ResourceExhausted, Unavailable
from gpufaas.shared.memory_client import MemoryClient
from gpufaas.shared.messages import DevicePlacement, MemAllocation
from gpufaas.tensorstore.device_tier import DeviceTier, NeedsRoom
from gpufaas.tensorstore.store import Registration
from gpufaas.tensorstore.store_thread import StoreThread

# Places a registration's copies into a block (or says how many more bytes they need).
Place = Callable[[Registration, MemAllocation | None], DevicePlacement | NeedsRoom]
Publish = Callable[[str, dict[str, Any]], Awaitable[None]]


class GpuRoom:
    """Reserves blocks for a tier's copies, and gives back the blocks of freed copies."""

    def __init__(
        self, memory: MemoryClient, thread: StoreThread, publish_event: Publish, node: str
    ) -> None:
        self.memory = memory
        self.thread = thread
        self.publish_event = publish_event
        self.node = node

    async def place(
        self,
        tier: DeviceTier,
        reg: Registration,
        nbytes: int,
        place: Place,
        *,
        evict: bool = True,
    ) -> DevicePlacement:
        """Get a block of the GPU's budget from the memory service, evicting this tier's idle
        copies (least recently used first) while it has none, then place the copies.

        ``evict=False`` (a prefetch): no room is a 507, nothing evicted; the memory manager,
        which asked, makes room first by its own order. On a real GPU the copies are
        written into the block (see ``device_tier``)."""
        keep = {ref.id for ref in reg.manifest.values()}
        for _ in range(3):  # a concurrent eviction may have made the need grow meanwhile
            block = await self._reserve(tier, nbytes, keep, evict=evict)
            try:
                placed = await self.thread.run(place, reg, block)
            finally:  # a failed placement gave its block back too
                await self.release_blocks(tier)
            if not isinstance(placed, NeedsRoom):
                return placed
            await self.memory.free(tier.name, block.id)
            nbytes = placed.nbytes
        raise Unavailable(f"{tier.name} kept changing while placing the model; retry")

    async def release_blocks(self, tier: DeviceTier) -> None:
        """Give the blocks of the tier's freed copies back to the GPU's budget."""
        while tier.released_blocks:
            await self.memory.free(tier.name, tier.released_blocks.pop())

    async def _reserve(
        self, tier: DeviceTier, nbytes: int, keep: set[str], *, evict: bool
    ) -> MemAllocation:
        while True:
            try:
                return await self.memory.alloc(tier.name, nbytes)
            except ResourceExhausted as full:
                if not evict:
                    raise ResourceExhausted(
                        f"{tier.name} has no room for the model's {nbytes} new bytes "
                        f"({full.message})",
                        field="device",
                    ) from None
                if not await self._evict_one(tier, keep):
                    raise ResourceExhausted(
                        f"{tier.name} has no room for the model's {nbytes} new bytes, and no "
                        f"idle copy of ours to evict ({full.message})",
                        field="model",
                    ) from None

    async def _evict_one(self, tier: DeviceTier, keep: set[str]) -> bool:
        """Evict the tier's least recently used idle copy (not one of ``keep``'s)."""
        used = tier.used
        evicted = await self.thread.run(tier.evict_one_idle, time.time(), keep)
        await self.release_blocks(tier)
        if evicted:
            await self.publish_event(
                "memory.evicted",
                {
                    "node": self.node,
                    "device": tier.name,
                    "bytes": used - tier.used,
                    "reason": "room for a model's copies",
                    "what": "idle model copies",
                },
            )
        return bool(evicted)
