"""What the queue-aware residency pass remembers, across passes and restarts.

The latest queue view of each scheduler replica, the working sets rejected (announced
once), the model cache published per GPU and the GPUs whose pressure was announced. The
first three are kept in KV too, so a restarted manager decides as before and repeats
no announcement.
"""

from __future__ import annotations

from collections.abc import Iterable

from gpufaas.memory import policy
from gpufaas.memory.records import MemoryKeys, Store
from gpufaas.shared.messages import CachedModel, MemRejection, ModelCache, QueueView


class ResidencyBook:
    """The residency pass's state: views, rejections, model caches, pressure."""

    def __init__(
        self,
        keys: MemoryKeys,
        views: Store[QueueView],
        rejections: Store[MemRejection],
        caches: Store[ModelCache],
        *,
        max_view_age_s: float,
    ) -> None:
        self.keys = keys
        self.view_records = views
        self.rejection_records = rejections
        self.cache_records = caches
        self.max_view_age_s = max_view_age_s  # a replica's view older than this is dropped
        self.views: dict[str, QueueView] = {}  # scheduler replica -> its latest view of us
        self.rejected: dict[tuple[str, str], MemRejection] = {}  # (device, fn) -> announced
        self.cache: dict[str, list[CachedModel]] = {}  # device -> the published model cache
        self.pressed: set[str] = set()  # devices whose pressure was announced

    # --- queue views -------------------------------------------------------------------

    async def accept(self, view: QueueView) -> bool:
        """Keep a replica's view (in KV too) unless an newer one is held."""
        held = self.views.get(view.replica)
        if held is not None and held.at > view.at:
            return False  # arrived out of order
        self.views[view.replica] = view
        await self.view_records.put(self.keys.view(view.replica), view)
        return True

    async def fresh_views(self, now: float) -> list[QueueView]:
        """The views young enough to go by; older ones are forgotten (KV first, so a failed
        delete is tried again next pass)."""
        for replica in [r for r, v in self.views.items() if now - v.at > self.max_view_age_s]:
            await self.view_records.delete(self.keys.view(replica))
            del self.views[replica]
        return list(self.views.values())

    # --- announcements -----------------------------------------------------------------

    async def settle_rejections(
        self, rejected: Iterable[policy.Rejected], now: float
    ) -> list[policy.Rejected]:
        """Record the working sets that can never fit, forget the others; returns the ones
        new (or changed in size) since the last pass: those to announce."""
        current = {(r.device, r.function): r for r in rejected}
        for key in [k for k in self.rejected if k not in current]:
            await self.rejection_records.delete(self.keys.rejection(*key))
            del self.rejected[key]
        new = []
        for key, r in current.items():
            held = self.rejected.get(key)
            if held is not None and held.working_set_bytes == r.working_set_bytes:
                continue
            record = MemRejection(
                device=r.device,
                function=r.function,
                working_set_bytes=r.working_set_bytes,
                capacity_bytes=r.capacity_bytes,
                reason=r.reason,
                at=now,
            )
            await self.rejection_records.put(self.keys.rejection(*key), record)
            self.rejected[key] = record
            new.append(r)
        return new

    async def publish_cache(self, cache: ModelCache) -> bool:
        """Record a GPU's model cache; False when it is the one already published."""
        if self.cache.get(cache.device) == cache.models:
            return False
        await self.cache_records.put(self.keys.cache(cache.device), cache)
        self.cache[cache.device] = cache.models
        return True

    def press(self, device: str, pressure: bool) -> bool:
        """Note whether ``device`` is short of memory; True when it just became so."""
        if not pressure:
            self.pressed.discard(device)
            return False
        if device in self.pressed:
            return False
        self.pressed.add(device)
        return True

    # --- restart -----------------------------------------------------------------------

    async def restore(self, keys: list[str], devices: Iterable[str]) -> None:
        """Read back the views, rejections and model caches (``keys``: the node's)."""
        for key in keys:
            if key.startswith(self.keys.views_prefix):
                view = await self.view_records.value(key)
                if view is not None:
                    self.views[view.replica] = view
        for device in devices:
            for key in keys:
                kind, _ = self.keys.kind(device, key) or ("", "")
                if kind == "r" and (r := await self.rejection_records.value(key)) is not None:
                    self.rejected[(r.device, r.function)] = r
                elif kind == "m" and (m := await self.cache_records.value(key)) is not None:
                    self.cache[device] = m.models
