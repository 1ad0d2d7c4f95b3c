"""How many instances each function wants: from its arrival rate, its queue and keep-alive.

Pure and driven by an injected clock (every call takes ``now``), so the scheduler's
reconcile loop can run it one step at a time and tests can use a fake clock. Scaling up
is immediate since a queue costs latency at once; scaling down waits until the lower
count has held for a while and then goes one instance at a time, so a burst's gaps do
not unload what the next burst needs. An idle function scales to zero after keep-alive
(the cold start it then risks is what the GPU model cache and locality are for).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class FunctionLoad:
    """What the scheduler sees of one function when it decides.

    ``capacity`` is how many requests one instance holds at once (batch x concurrency);
    ``service_rps`` how many requests per second one instance serves, from its profile
    (0 when unknown: then only the queue counts).
    """

    function: str
    instances: int
    queued: int
    in_flight: int
    capacity: int
    service_rps: float


@dataclass(frozen=True, slots=True)
class Decision:
    """Instances a function has and should have, and the rule that decided it."""

    function: str
    current: int
    desired: int
    reason: str


@dataclass(slots=True)
class _Function:
    """Arrivals of one function in one-second buckets, and its scale-down timer."""

    first_arrival: float | None = None
    last_active: float = 0.0  # last arrival, or last decide that saw work (or first seen)
    buckets: deque[list[int]] = field(default_factory=deque)  # [second, count], oldest first
    below_since: float | None = None  # when desired first fell below current, since then


class Autoscaler:
    """Desired instance counts per function from arrivals (``observe``) and loads (``decide``).

    Memory is bounded: at most ``window_s + 2`` buckets per function, and a function at
    zero instances with nothing to do is forgotten.
    """

    def __init__(
        self,
        *,
        keep_alive_s: float = 60.0,
        window_s: float = 10.0,
        target_utilization: float = 0.7,
        max_instances: int = 8,
        scale_down_delay_s: float = 5.0,
    ) -> None:
        if keep_alive_s < 0 or scale_down_delay_s < 0:
            raise ValueError("keep_alive_s and scale_down_delay_s must be >= 0")
        if window_s < 1:
            raise ValueError(f"window_s must be >= 1 (one-second buckets), got {window_s}")
        if not 0 < target_utilization <= 1:
            raise ValueError(f"target_utilization must be in (0, 1], got {target_utilization}")
        if max_instances < 1:
            raise ValueError(f"max_instances must be >= 1, got {max_instances}")
        self.keep_alive_s = keep_alive_s
        self.window_s = window_s
        self.target_utilization = target_utilization
        self.max_instances = max_instances
        self.scale_down_delay_s = scale_down_delay_s
        self._functions: dict[str, _Function] = {}

    def observe(self, function: str, now: float, n: int = 1) -> None:
        """Record ``n`` arrivals of ``function`` at ``now``."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if n == 0:
            return
        st = self._functions.setdefault(function, _Function())
        if st.first_arrival is None:
            st.first_arrival = now
        st.last_active = max(st.last_active, now)
        second = math.floor(now)
        if st.buckets and st.buckets[-1][0] >= second:
            st.buckets[-1][1] += n  # same second (or a clock that stepped back a little)
        else:
            st.buckets.append([second, n])
        self._prune(st, now)

    def rate(self, function: str, now: float) -> float:
        """Arrivals per second over the last ``window_s``.

        Until the window has filled since the first arrival, the count is divided by the
        time elapsed (at least 1 s) instead, so a fresh burst is not diluted by seconds in
        which the function did not exist yet.
        """
        st = self._functions.get(function)
        if st is None or st.first_arrival is None:
            return 0.0
        self._prune(st, now)
        elapsed = now - st.first_arrival
        if elapsed < self.window_s:
            return sum(c for _, c in st.buckets) / max(elapsed, 1.0)
        start = now - self.window_s
        total = 0.0
        for second, count in st.buckets:
            # The oldest bucket may straddle the window's start: count its share of it.
            total += count * min(1.0, max(0.0, second + 1 - start))
        return total / self.window_s

    def decide(self, now: float, loads: Sequence[FunctionLoad]) -> dict[str, Decision]:
        """The desired instance count of every function in ``loads``, with the rule behind it.

        Pass every function on each call: one left out whose last activity is older than
        keep-alive is forgotten (so arrivals of removed functions do not pile up).
        """
        decisions = {load.function: self._decide_one(now, load) for load in loads}
        seen = set(decisions)
        for name in [n for n, st in self._functions.items() if n not in seen]:
            if now - self._functions[name].last_active > self.keep_alive_s:
                del self._functions[name]  # arrivals of a function no load reports any more
        return decisions

    def forget_before(self, function: str, at: float) -> None:
        """Drop what is known of ``function`` if it was last active before ``at`` (a
        repository load or unload set its instances then): its keep-alive restarts from
        the instances it has now, and older arrivals no longer bring one back."""
        st = self._functions.get(function)
        if st is not None and st.last_active < at:
            del self._functions[function]

    def tracked(self) -> int:
        """How many functions the autoscaler holds state for (bounded-memory check)."""
        return len(self._functions)

    def _decide_one(self, now: float, load: FunctionLoad) -> Decision:
        current = load.instances
        work = load.queued + load.in_flight
        st = self._functions.get(load.function)
        if st is None:
            if current == 0 and work == 0:
                return Decision(load.function, 0, 0, "idle: no arrivals, nothing queued")
            # First sight of a running or busy function: its keep-alive starts now.
            st = self._functions[load.function] = _Function(last_active=now)
        if work > 0:
            st.last_active = max(st.last_active, now)
        idle_s = now - st.last_active

        if work == 0 and idle_s > self.keep_alive_s:
            st.below_since = None
            if current == 0:
                del self._functions[load.function]
            reason = f"idle {idle_s:.0f} s > keep-alive {self.keep_alive_s:.0f} s"
            return Decision(load.function, current, 0, reason)

        target, reason = self._target(now, load, work, idle_s)
        if target > self.max_instances:
            target = self.max_instances
            reason += f"; capped at max {self.max_instances}"

        if target >= current:
            st.below_since = None
            return Decision(load.function, current, target, reason)
        if st.below_since is None:
            st.below_since = now
        below_s = now - st.below_since
        if below_s < self.scale_down_delay_s:
            return Decision(
                load.function,
                current,
                current,
                f"{reason}; holding {current} until {target} has held "
                f"{self.scale_down_delay_s:g} s ({below_s:.1f} s so far)",
            )
        return Decision(
            load.function,
            current,
            current - 1,
            f"{reason}; one down after {below_s:.1f} s below {current}",
        )

    def _target(self, now: float, load: FunctionLoad, work: int, idle_s: float) -> tuple[int, str]:
        """The count the rate and the queue ask for (at least 1: the function is not idle)."""
        capacity = max(load.capacity, 1)
        by_queue = math.ceil(work / capacity)
        rate = self.rate(load.function, now)
        per_instance = load.service_rps * self.target_utilization
        by_rate = math.ceil(rate / per_instance) if per_instance > 0 else 0
        if by_queue >= by_rate and by_queue > 1:
            return by_queue, f"queue {work} > capacity {capacity} per instance"
        if by_rate > 1:
            return by_rate, f"rate {rate:.1f}/s over {per_instance:.1f}/s per instance"
        if work > 0:
            return 1, f"{work} queued or in flight"
        return 1, f"warm: active {idle_s:.0f} s ago <= keep-alive {self.keep_alive_s:.0f} s"

    def _prune(self, st: _Function, now: float) -> None:
        oldest = math.floor(now - self.window_s)
        while st.buckets and st.buckets[0][0] < oldest:
            st.buckets.popleft()
