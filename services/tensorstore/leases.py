"""References to stored tensors, held by the instances that use them.

A worker takes one lease per instance (its tensors) and renews all of its leases
periodically; a lease that is not renewed lapses, so the tensors of a worker that
died are released without anyone telling us. A renewal carries the whole lease, so
a restarted tensor store rebuilds its table from the renewals alone.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Lease:
    holder: str
    tensors: frozenset[str]
    expires_at: float


class LeaseTable:
    """Leases by id and, derived from them, a reference count per tensor."""

    def __init__(self) -> None:
        self.leases: dict[str, Lease] = {}
        self._refs: Counter[str] = Counter()

    def put(self, lease_id: str, holder: str, tensors: Iterable[str], expires_at: float) -> None:
        """Take or renew a lease (idempotent: the same lease twice counts once)."""
        self.drop(lease_id)
        lease = Lease(holder, frozenset(tensors), expires_at)
        self.leases[lease_id] = lease
        self._refs.update(lease.tensors)

    def drop(self, lease_id: str) -> bool:
        """Release a lease; returns whether it existed."""
        lease = self.leases.pop(lease_id, None)
        if lease is None:
            return False
        self._refs.subtract(lease.tensors)
        for tid in lease.tensors:
            if self._refs[tid] <= 0:
                del self._refs[tid]
        return True

    def expire(self, now: float) -> list[str]:
        """Drop leases whose holder stopped renewing them; returns their ids."""
        lapsed = [lid for lid, lease in self.leases.items() if lease.expires_at < now]
        for lid in lapsed:
            self.drop(lid)
        return lapsed

    def refcount(self, tensor_id: str) -> int:
        return self._refs.get(tensor_id, 0)

    def referenced(self, tensor_ids: Iterable[str]) -> bool:
        return any(self._refs.get(t, 0) > 0 for t in tensor_ids)
