"""The tube directory: each tube's KV record and the placements of its copies.

A copy's bytes are written before its placement is recorded, and a placement is removed
before its bytes are freed, so no placement ever points at missing bytes. Every change is
one retried compare-and-set (``Bucket.update``) of a pure change of the record: the
functions below, which a racing writer's change is applied under, never over.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Collection
from typing import Final

import msgspec

from gpufaas.shared.errors import AlreadyExists, NotFound, Unavailable
from gpufaas.shared.kv import RAW, Bucket
from gpufaas.shared.messages import Placement, Tube

_KEY: Final = re.compile(r"^[-_=a-zA-Z0-9]+\Z")  # a KV key without dots (nats-py's rule)


def is_tube_key(name: str) -> bool:
    """Whether ``name`` can be a tube's id (a file named otherwise is not a tube's)."""
    return bool(_KEY.match(name))


def with_placement(tube: Tube, new: Placement) -> Tube | None:
    """``tube`` with a copy at ``new`` recorded; None when it already is."""
    if new in tube.placements:
        return None
    return msgspec.structs.replace(tube, placements=[*tube.placements, new])


def without_placement(tube: Tube, gone: Placement) -> Tube | None:
    """``tube`` without the copy at ``gone``; None when it has no such copy."""
    if gone not in tube.placements:
        return None
    return msgspec.structs.replace(tube, placements=[p for p in tube.placements if p != gone])


def without_nodes(tube: Tube, nodes: Collection[str]) -> Tube | None:
    """``tube`` without its copies on ``nodes`` (nodes that left); None when it has none."""
    kept = [p for p in tube.placements if p.node not in nodes]
    if len(kept) == len(tube.placements):
        return None
    return msgspec.structs.replace(tube, placements=kept)


def _missing(tube_id: str) -> NotFound:
    return NotFound(f"tube {tube_id!r} not found", field="tube")


def owned(tube: Tube | None, tube_id: str, tenant: str) -> Tube:
    """``tube`` if it exists and is ``tenant``'s; for anyone else it is ``NotFound``."""
    if tube is None or tube.tenant != tenant:
        raise _missing(tube_id)
    return tube


class TubeDirectory:
    """The ``tubes`` bucket as this service reads and changes it. A tube of another
    tenant than the one asking is simply 'not found'."""

    def __init__(self, bucket: Callable[[], Bucket[Tube]]) -> None:
        self._bucket = bucket  # the service's bucket, opened after this is made

    @property
    def bucket(self) -> Bucket[Tube]:
        return self._bucket()

    async def get(self, tube_id: str) -> Tube | None:
        """Any tenant's tube (platform verbs only); None when absent."""
        return await self.bucket.value(tube_id)

    async def entry(self, tube_id: str) -> Tube:
        """Any tenant's tube (platform verbs only); ``NotFound`` when absent."""
        tube = await self.get(tube_id)
        if tube is None:
            raise _missing(tube_id)
        return tube

    async def tube(self, tube_id: str, tenant: str) -> Tube:
        """The tenant's tube; anyone else's is ``NotFound``."""
        return owned(await self.get(tube_id), tube_id, tenant)

    async def listed(self, tube_id: str) -> bool:
        """Whether the tube has a record at all (readable or not): the sweeper's question,
        asked of the raw bytes so that no file is deleted for a record it cannot decode."""
        raw = Bucket(self.bucket.js, self.bucket.kv, self.bucket.name, RAW)
        return await raw.get(tube_id) is not None

    async def create(self, tube: Tube) -> None:
        """Record a new tube; ``AlreadyExists`` when its id is taken."""
        if await self.bucket.create(tube.id, tube) is None:
            raise AlreadyExists(f"tube {tube.id!r} exists", field="tube")

    async def add_placement(self, tube_id: str, tenant: str, new: Placement) -> Tube:
        """Record a copy (its bytes already written); the tube as it is now."""

        def change(tube: Tube | None) -> Tube | None:
            return with_placement(owned(tube, tube_id, tenant), new)

        entry = await self.bucket.update(tube_id, change)
        assert entry is not None  # change raises rather than leave an absent record
        return entry.value

    async def remove_placement(self, tube_id: str, gone: Placement) -> None:
        """Forget one copy (a no-op when the tube or the copy is gone already)."""
        await self.bucket.update(
            tube_id, lambda tube: None if tube is None else without_placement(tube, gone)
        )

    async def drop_nodes(self, tube_id: str, tenant: str, nodes: Collection[str]) -> None:
        """Forget copies on nodes that left (best effort: a tube changing too often keeps
        them, and they are dropped when next found)."""

        def change(tube: Tube | None) -> Tube | None:
            return without_nodes(owned(tube, tube_id, tenant), nodes)

        with contextlib.suppress(Unavailable):
            await self.bucket.update(tube_id, change)
