"""Elastic reservations for intermediates: ``Data_size = R_size * R_con`` per function.

Over a sliding window of the last ``window_s`` seconds, ``R_con`` is the peak number of
the function's requests in flight at once, and ``R_size`` a high percentile (p95 by
default) of the intermediate sizes of the requests that held them at some time in the
window (in flight now, or ended within it). p95 and not the mean: a reservation under the typical large request
sends that request to pool growth or eviction on its critical path. p95 and not the
max: ``R_con`` is already a peak, and one outlier times the peak concurrency would pin
memory nothing else can use for a whole window; the rare larger request still runs, it
just grows the pool. With fewer than 20 samples the nearest-rank p95 is the max, which
is the cautious answer while little is known.

A function with nothing in flight and nothing in the window wants zero bytes, so an
idle platform reserves nothing. A start whose end never comes (its worker died) counts
as ended once it is older than ``max_request_s``: no request runs that long (its deadline
ends it first), so a dead worker's requests do not hold memory forever. Time is always
passed in (``now``): no clock is read.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Final

from gpufaas.shared.errors import InvalidArgument

DEFAULT_WINDOW_S: Final = 60.0
DEFAULT_SIZE_QUANTILE: Final = 0.95
DEFAULT_MAX_REQUEST_S: Final = 600.0


@dataclass(frozen=True, slots=True)
class Reservation:
    """What one function wants reserved now, and the two factors behind it."""

    function: str
    size_bytes: int  # R_size
    concurrency: int  # R_con
    desired_bytes: int  # R_size * R_con


@dataclass(slots=True)
class _Function:
    in_flight: dict[str, tuple[float, int]] = field(default_factory=dict)  # id -> (start, size)
    ended: deque[tuple[float, int]] = field(default_factory=deque)  # (end, size) by end
    levels: deque[tuple[float, int]] = field(default_factory=deque)  # (when, in flight after)
    level_before: int = 0  # in flight when the window opened (the last level dropped)

    def prune(self, horizon: float) -> None:
        ended, levels = self.ended, self.levels
        while ended and ended[0][0] < horizon:
            ended.popleft()
        while levels and levels[0][0] < horizon:
            self.level_before = levels.popleft()[1]

    def idle(self) -> bool:
        return not (self.in_flight or self.ended or self.levels or self.level_before)


def _quantile(values: list[int], q: float) -> int:
    """Nearest-rank quantile: always one of the observed values."""
    values.sort()
    return values[max(0, math.ceil(q * len(values)) - 1)]


class ReservationTracker:
    """Observed intermediate size and concurrency per function, over a sliding window."""

    def __init__(
        self,
        *,
        window_s: float = DEFAULT_WINDOW_S,
        size_quantile: float = DEFAULT_SIZE_QUANTILE,
        max_request_s: float = DEFAULT_MAX_REQUEST_S,
    ) -> None:
        if window_s <= 0:
            raise InvalidArgument("window_s must be positive", field="window_s")
        if max_request_s <= 0:
            raise InvalidArgument("max_request_s must be positive", field="max_request_s")
        self.max_request_s = max_request_s
        if not 0 < size_quantile <= 1:
            raise InvalidArgument("size_quantile must be in (0, 1]", field="size_quantile")
        self.window_s = window_s
        self.size_quantile = size_quantile
        self._functions: dict[str, _Function] = {}

    def observe_start(self, function: str, request_id: str, nbytes: int, now: float) -> bool:
        """A request began and will hold ``nbytes`` of intermediates; False if already seen."""
        if nbytes < 0:
            raise InvalidArgument(f"nbytes must not be negative, got {nbytes}", field="nbytes")
        f = self._functions.setdefault(function, _Function())
        if request_id in f.in_flight:
            return False  # a redelivered start: counting it twice would inflate R_con
        f.in_flight[request_id] = (now, nbytes)
        f.levels.append((now, len(f.in_flight)))
        return True

    def observe_end(self, function: str, request_id: str, now: float) -> bool:
        """A request finished; False if it was not in flight (ends are idempotent)."""
        f = self._functions.get(function)
        started = None if f is None else f.in_flight.pop(request_id, None)
        if f is None or started is None:
            return False
        f.ended.append((now, started[1]))
        f.levels.append((now, len(f.in_flight)))
        return True

    def reservation(self, function: str, now: float) -> Reservation:
        """``R_size``, ``R_con`` and their product for one function at ``now``."""
        f = self._functions.get(function)
        if f is None:
            return Reservation(function, 0, 0, 0)
        for rid in [r for r, (t0, _) in f.in_flight.items() if now - t0 > self.max_request_s]:
            self.observe_end(function, rid, now)  # its worker died: it will never end
        f.prune(now - self.window_s)
        # every request that held its bytes at some time in the window: in flight or ended in it
        sizes = [n for _, n in f.ended]
        sizes.extend(n for _, n in f.in_flight.values())
        size = _quantile(sizes, self.size_quantile) if sizes else 0
        concurrency = max([f.level_before, *(level for _, level in f.levels)])
        return Reservation(function, size, concurrency, size * concurrency)

    def desired(self, function: str, now: float) -> int:
        """Bytes to reserve for ``function``'s intermediates at ``now``."""
        return self.reservation(function, now).desired_bytes

    def snapshot(self, now: float) -> dict[str, Reservation]:
        """Every tracked function's reservation; functions idle for a window are dropped."""
        out: dict[str, Reservation] = {}
        for name in list(self._functions):
            r = self.reservation(name, now)
            if self._functions[name].idle():
                del self._functions[name]
            else:
                out[name] = r
        return out

    def total(self, now: float) -> int:
        """Bytes all functions want together."""
        return sum(r.desired_bytes for r in self.snapshot(now).values())

    def in_flight(self, function: str) -> int:
        """Requests of ``function`` running now (started, not ended)."""
        f = self._functions.get(function)
        return 0 if f is None else len(f.in_flight)

    def functions(self) -> list[str]:
        """Functions with state (dropped by :meth:`snapshot` once idle for a window)."""
        return sorted(self._functions)
