"""Counters kept by the ``Service`` base: per endpoint and per supervised loop.

Cheap enough for the invocation path: a request adds two integers and appends one
duration to a bounded window (p50/p99 are computed only when someone asks).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from gpufaas.shared.messages import EndpointStats, LoopStats

WINDOW = 1024  # latencies kept per endpoint for its percentiles


def percentile(sorted_values: list[int], q: float) -> int:
    """The ``q`` quantile (0..1) of an already sorted list, nearest rank; 0 when empty."""
    if not sorted_values:
        return 0
    rank = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[rank]


@dataclass(slots=True)
class EndpointCounter:
    """Requests, errors and a window of recent latencies of one endpoint."""

    name: str
    subject: str
    requests: int = 0
    errors: int = 0
    window: deque[int] = field(default_factory=lambda: deque(maxlen=WINDOW))

    def record(self, elapsed_s: float, *, error: bool) -> None:
        self.requests += 1
        if error:
            self.errors += 1
        self.window.append(int(elapsed_s * 1e6))

    def snapshot(self) -> EndpointStats:
        latencies = sorted(self.window)
        return EndpointStats(
            name=self.name,
            subject=self.subject,
            requests=self.requests,
            errors=self.errors,
            p50_us=percentile(latencies, 0.5),
            p99_us=percentile(latencies, 0.99),
        )


@dataclass(slots=True)
class LoopCounter:
    """Steps and transient failures of one supervised loop; ``streak`` sets its backoff."""

    name: str
    runs: int = 0
    failures: int = 0
    skipped: int = 0
    streak: int = 0  # consecutive failures
    last_error: str | None = None

    def ok(self) -> None:
        self.runs += 1
        self.streak = 0

    def failed(self, error: BaseException) -> None:
        self.runs += 1
        self.failures += 1
        self.streak += 1
        self.last_error = repr(error)[:300]

    def backoff(self, interval: float, cap: float) -> float:
        """How long to wait after the current streak of failures: doubling, capped."""
        if self.streak == 0:
            return interval
        return min(cap, max(interval, 0.05) * 2.0 ** min(self.streak, 16))

    def snapshot(self) -> LoopStats:
        return LoopStats(
            name=self.name,
            runs=self.runs,
            failures=self.failures,
            skipped=self.skipped,
            last_error=self.last_error,
        )
