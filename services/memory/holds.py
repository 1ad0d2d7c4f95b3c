"""Elastic reservations of the GPUs' pools for functions' intermediates.

Workers report each request's start and end (``observe``); every upkeep pass holds, per
function and GPU, ``R_size · R_con`` bytes (``reservations.py``), resized as the load
changes and released when the function goes idle, so an idle platform holds little.
A reservation is a *hold* of the pool, room of the budget with no memory behind it: the
worker's allocator makes the intermediates there, so they are counted once. Holds are
not kept in KV: a restarted manager sizes them again from the requests it sees.
"""

from __future__ import annotations

from collections.abc import Iterable

from gpufaas.memory.ledger import Ledger
from gpufaas.memory.reservations import Reservation, ReservationTracker
from gpufaas.shared.messages import MemObserve


class Holds:
    """Per GPU: the observed load of each function and the bytes held for it."""

    def __init__(
        self, ledger: Ledger, devices: Iterable[str], *, window_s: float, max_request_s: float
    ) -> None:
        self.ledger = ledger
        self.observed = {
            d: ReservationTracker(window_s=window_s, max_request_s=max_request_s) for d in devices
        }
        self.reserved: dict[tuple[str, str], int] = {}  # (device, fn) -> bytes held
        self.short: dict[tuple[str, str], int] = {}  # (device, fn) -> bytes the pool refused

    def observe(self, req: MemObserve, now: float) -> bool:
        """A worker's report of a request starting or ending; False for a device we lack.
        The function is an opaque key (``tenant.name``)."""
        tracker = self.observed.get(req.device)
        if tracker is None:
            return False
        if req.phase == "start":
            tracker.observe_start(req.function, req.request_id, req.nbytes, now)
        else:
            tracker.observe_end(req.function, req.request_id, now)
        return True

    async def update(self, now: float) -> None:
        """Resize every GPU's holds to the load observed up to ``now``."""
        for device, tracker in self.observed.items():
            await self._resize(device, tracker.snapshot(now))

    async def _resize(self, device: str, wanted: dict[str, Reservation]) -> None:
        """Hold R_size · R_con per function: grow at once, shrink when the want falls below
        half of what is held, release when idle. What the pool refuses is noted as short:
        announced as pressure, and counted as wanted by the residency pass (idle copies make
        way); the requests still run, growing the pool."""
        for key in [k for k in self.reserved if k[0] == device and k[1] not in wanted]:
            del self.reserved[key]
            await self.ledger.hold(device, key[1], 0)
        for key in [k for k in self.short if k[0] == device and k[1] not in wanted]:
            del self.short[key]
        for fn, r in wanted.items():
            key, held = (device, fn), self.reserved.get((device, fn))
            self.short.pop(key, None)
            if held is not None and r.desired_bytes <= held < 2 * r.desired_bytes:
                continue
            if not await self.ledger.hold(device, fn, r.desired_bytes):
                self.reserved.pop(key, None)
                self.short[key] = r.desired_bytes
            elif r.desired_bytes:
                self.reserved[key] = r.desired_bytes
            else:
                self.reserved.pop(key, None)

    def short_bytes(self, device: str) -> int:
        """Bytes the pool of ``device`` could not hold for intermediates."""
        return sum(n for (d, _), n in self.short.items() if d == device)

    def running_on(self, functions: Iterable[str]) -> dict[str, str]:
        """The GPU each of ``functions`` has requests running on (as its workers report)."""
        wanted = list(functions)
        return {
            fn: device
            for device, tracker in self.observed.items()
            for fn in wanted
            if tracker.in_flight(fn)
        }

    def by_name(self) -> dict[str, int]:
        """What the stats show: ``"<device> <function>"`` -> bytes held."""
        return {f"{d} {fn}": n for (d, fn), n in sorted(self.reserved.items())}
