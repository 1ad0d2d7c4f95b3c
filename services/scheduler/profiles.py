"""Batch size and concurrency from a profile: Decreased Throughput Selection (DTS).

From "GPU-enabled FaaS for ML inference" (Zhao, Jha, Hong, IPDPS 2023): among the
(batch, concurrency) configurations a function was profiled at, keep those that meet its
SLO and score each by throughput per unit of latency and memory, ``(b·p) / (l·m)``, so a
configuration that buys a little throughput with a lot of memory or latency loses. Pure:
the profiler measures, this picks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from gpufaas.shared.errors import InvalidArgument
from gpufaas.shared.messages import FunctionSpec, ProfileRecord

MEMORY_FLOOR_BYTES: Final = 2**20  # so a configuration that holds no memory scores finitely
NEAR_BEST: Final = 0.95  # scores within 5% of the best count as a tie


@dataclass(frozen=True, slots=True)
class ProfilePoint:
    """One profiled configuration: ``concurrency`` batches of ``batch`` running at once.

    ``latency_s`` is the time one batch takes while the others run beside it;
    ``memory_bytes`` is the intermediate (activation) memory all of them hold together,
    model weights excluded since every configuration shares them.
    """

    batch: int
    concurrency: int
    latency_s: float
    memory_bytes: int

    def __post_init__(self) -> None:
        if self.batch < 1 or self.concurrency < 1:
            raise ValueError(
                f"batch and concurrency must be >= 1, got {self.batch}, {self.concurrency}"
            )
        if not self.latency_s > 0 or self.memory_bytes < 0:
            raise ValueError(
                f"latency_s must be > 0 and memory_bytes >= 0, got {self.latency_s}, {self.memory_bytes}"
            )

    @property
    def throughput_rps(self) -> float:
        """Requests per second this configuration serves when kept full."""
        return self.batch * self.concurrency / self.latency_s


@dataclass(frozen=True, slots=True)
class Choice:
    """The configuration chosen, its figures, its DTS score and why it won."""

    batch: int
    concurrency: int
    latency_s: float
    memory_bytes: int
    throughput_rps: float
    score: float
    reason: str


def score(point: ProfilePoint, weights_bytes: int = 0) -> float:
    """DTS score ``(b·p) / (l·m)`` (requests per second per byte held).

    ``m`` is all the memory the configuration holds: the instance's weights (held once
    however many batches run, since instances share them) plus its intermediates, floored
    at 1 MiB. Counting the weights keeps a few MiB of activations from outweighing a
    several-fold gain in throughput on a model of hundreds of MiB.
    """
    return point.throughput_rps / (weights_bytes + point.memory_bytes + MEMORY_FLOOR_BYTES)


def worst_case_latency_s(point: ProfilePoint) -> float:
    """A request's worst latency: it waits one batch's time to be batched, then runs one.

    A request may arrive just after a batch of its size has started, so it waits up to
    ``latency_s`` for the next one to form and start, then takes ``latency_s`` to run.
    """
    return 2 * point.latency_s


def choose_config(
    points: Sequence[ProfilePoint], slo_s: float | None, *, max_batch: int, weights_bytes: int = 0
) -> Choice:
    """The DTS configuration among ``points`` with batch <= ``max_batch`` that meet the SLO.

    A point meets the SLO when its worst case, ``2 * latency_s`` (batch-forming wait plus
    the batch itself, see :func:`worst_case_latency_s`), is at most ``slo_s``; with no SLO
    every point does. The highest score wins; points within 5% of it are a tie, broken by
    the least memory, then the highest throughput, then the smallest batch. Raises
    ``InvalidArgument`` naming ``options.slo_ms`` when no point meets the SLO (or
    ``options.max_batch_size`` when no point is small enough), ``ValueError`` when
    ``points`` is empty or ``max_batch`` < 1.
    """
    if not points:
        raise ValueError("no profile points to choose from")
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    if slo_s is not None and not slo_s > 0:
        raise InvalidArgument(f"slo_ms must be > 0, got {slo_s * 1e3:g}", field="options.slo_ms")
    small = [p for p in points if p.batch <= max_batch]
    if not small:
        smallest = min(p.batch for p in points)
        raise InvalidArgument(
            f"no configuration has batch <= max_batch_size={max_batch}: "
            f"the smallest profiled batch is {smallest}",
            field="options.max_batch_size",
        )
    feasible = [p for p in small if slo_s is None or worst_case_latency_s(p) <= slo_s]
    if not feasible:
        assert slo_s is not None  # with no SLO every small point is feasible
        fastest = min(small, key=lambda p: (p.latency_s, p.batch, p.concurrency))
        raise InvalidArgument(
            f"no configuration meets slo_ms={slo_s * 1e3:g}: the fastest, batch "
            f"{fastest.batch} x {fastest.concurrency}, takes {fastest.latency_s * 1e3:.1f} ms "
            f"per batch ({worst_case_latency_s(fastest) * 1e3:.1f} ms worst case)",
            field="options.slo_ms",
        )
    best_score = max(score(p, weights_bytes) for p in feasible)
    near = [p for p in feasible if score(p, weights_bytes) >= NEAR_BEST * best_score]
    pick = min(near, key=lambda p: (p.memory_bytes, -p.throughput_rps, p.batch, p.concurrency))
    return Choice(
        batch=pick.batch,
        concurrency=pick.concurrency,
        latency_s=pick.latency_s,
        memory_bytes=pick.memory_bytes,
        throughput_rps=pick.throughput_rps,
        score=score(pick, weights_bytes),
        reason=_reason(
            pick,
            pick_score=score(pick, weights_bytes),
            best=best_score,
            near=len(near),
            feasible=len(feasible),
            total=len(points),
            slo_s=slo_s,
            max_batch=max_batch,
        ),
    )


def batch_sizes(max_batch: int) -> list[int]:
    """The batch sizes a profile sweeps: powers of two up to ``max_batch``, and ``max_batch``."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    sizes = []
    b = 1
    while b <= max_batch:
        sizes.append(b)
        b *= 2
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


def _reason(
    pick: ProfilePoint,
    *,
    pick_score: float,
    best: float,
    near: int,
    feasible: int,
    total: int,
    slo_s: float | None,
    max_batch: int,
) -> str:
    limits = f"batch <= {max_batch}"
    if slo_s is not None:
        limits += f" and 2 x latency <= slo_ms={slo_s * 1e3:g}"
    what = (
        f"batch {pick.batch} x {pick.concurrency}: {pick.throughput_rps:.1f} req/s, "
        f"{pick.latency_s * 1e3:.1f} ms per batch, {pick.memory_bytes / 2**20:.1f} MiB"
    )
    if near > 1:
        why = f"least memory of {near} within 5% of the best score"
    else:
        why = "best throughput per latency and memory"
    share = pick_score / best
    return f"{what}; {why} ({share:.0%} of it; {feasible} of {total} configurations have {limits})"


@dataclass(frozen=True, slots=True)
class EffectiveConfig:
    """The batch size and concurrency a function runs with now: its complete profile's
    choice, else its spec's maximum batch at concurrency 1 (``profiled`` says which)."""

    batch: int
    concurrency: int
    profiled: bool

    @property
    def capacity(self) -> int:
        """Requests one instance holds at once (batch x concurrency)."""
        return self.batch * self.concurrency


def effective_config(profile: ProfileRecord | None, spec: FunctionSpec) -> EffectiveConfig:
    """The one rule for a function's configuration (a partial profile does not count)."""
    if profile is not None and profile.complete:
        return EffectiveConfig(profile.batch, profile.concurrency, profiled=True)
    return EffectiveConfig(spec.options.max_batch_size, 1, profiled=False)


def service_rps(profile: ProfileRecord | None, config: EffectiveConfig) -> float:
    """Requests per second one instance serves at ``config``, from its profiled point
    (0 when not profiled at that point: then the autoscaler counts only the queue)."""
    if profile is None or not config.profiled:
        return 0.0
    for p in profile.points:
        if (p.batch, p.concurrency) == (config.batch, config.concurrency):
            return p.batch * p.concurrency / p.latency_s
    return 0.0


def compute_s(profile: ProfileRecord | None) -> float | None:
    """Device seconds one request takes (its batch's time over the batch's size), at the
    chosen point, else the smallest batch measured; ``None`` without any point."""
    if profile is None or not profile.points:
        return None
    chosen = [
        p
        for p in profile.points
        if (p.batch, p.concurrency) == (profile.batch, profile.concurrency)
    ]
    point = chosen[0] if chosen else min(profile.points, key=lambda p: p.batch)
    return point.latency_s / (point.batch * point.concurrency)
