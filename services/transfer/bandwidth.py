"""SLO-aware bandwidth sharing across concurrent transfers (FaaSTube's ``rate_least``).

A transfer must land before its request's inference starts, so the least rate each of
its routes needs is ``remaining / (deadline - now - inference_latency - route latency)``.
Per resource, transfers are first admitted at that least rate in earliest-deadline
order while capacity lasts; what is left is then shared max-min fairly among all active
transfers (each transfer's share spread over its routes by their weights, so its parts
keep finishing together). A transfer that cannot get its least rate, or whose deadline
has passed, is reported ``at_risk`` with the reason rather than silently slowed: the
caller can shed, re-plan or tell the scheduler.

A pure function over a snapshot; the caller re-runs it when the set of transfers changes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from gpufaas.shared.errors import InvalidArgument
from gpufaas.transfer.linkmodel import FLOW_EPS_BPS, Route

RiskCause = Literal["deadline_passed", "insufficient_bandwidth"]


@dataclass(frozen=True, slots=True)
class Flow:
    """One route of one transfer: the bytes it still has to send and its weight."""

    route: Route
    remaining_nbytes: int
    weight: float = 1.0  # its part of the transfer's spare share (the planner's rate fits)


@dataclass(frozen=True, slots=True)
class Demand:
    """A transfer in flight as the allocator sees it (deadline absolute, in seconds)."""

    id: str
    flows: tuple[Flow, ...]
    deadline_s: float | None = None  # None: best effort, no least rate
    inference_latency_s: float = 0.0

    @property
    def remaining_nbytes(self) -> int:
        """Bytes still to send over all routes."""
        return sum(f.remaining_nbytes for f in self.flows)


@dataclass(frozen=True, slots=True)
class AtRisk:
    """A transfer that will miss its deadline at the rates it can get, and why."""

    transfer_id: str
    cause: RiskCause
    detail: str
    resource: str | None = None  # the resource short of capacity
    needed_bps: float = 0.0
    available_bps: float = 0.0


@dataclass(frozen=True, slots=True)
class Allocation:
    """Rates per (transfer, route): the guaranteed least part plus a fair share of the rest."""

    rates_bps: Mapping[tuple[str, Route], float]
    reserved_bps: Mapping[tuple[str, Route], float]  # the rate_least of admitted transfers
    at_risk: tuple[AtRisk, ...]

    def rate(self, transfer_id: str, route: Route) -> float:
        """The rate of one route of one transfer (0 when it has nothing left)."""
        return self.rates_bps.get((transfer_id, route), 0.0)

    def transfer_rate(self, transfer_id: str) -> float:
        """The sum of a transfer's route rates."""
        return sum(v for (t, _), v in self.rates_bps.items() if t == transfer_id)

    def at_risk_ids(self) -> set[str]:
        """Ids of the transfers reported at risk."""
        return {a.transfer_id for a in self.at_risk}


def allocate(
    now_s: float, transfers: Sequence[Demand], capacities_bps: Mapping[str, float]
) -> Allocation:
    """Rates for every route of every transfer in ``transfers`` at time ``now_s``."""
    _check(transfers, capacities_bps)
    active = [d for d in transfers if d.remaining_nbytes > 0]
    free = dict(capacities_bps)
    reserved: dict[tuple[str, Route], float] = {}
    at_risk: list[AtRisk] = []
    # 1. Least rates, earliest deadline first, while every resource on the way has room.
    timed = [d for d in active if d.deadline_s is not None]
    for d in sorted(timed, key=lambda d: (d.deadline_s, d.id)):
        least, risk = _least_rates(now_s, d, free)
        if risk is not None:
            at_risk.append(risk)
            continue
        for (_, route), rate in least.items():
            for r in route.resources:
                free[r] -= rate
        reserved.update(least)
    # 2. What is left, max-min fair among all active transfers (weighted within each).
    extra = _max_min(active, free)
    rates = {
        (d.id, f.route): reserved.get((d.id, f.route), 0.0) + extra.get((d.id, f.route), 0.0)
        for d in active
        for f in d.flows
        if f.remaining_nbytes > 0
    }
    return Allocation(rates, reserved, tuple(at_risk))


def _check(transfers: Sequence[Demand], capacities_bps: Mapping[str, float]) -> None:
    seen: set[str] = set()
    for d in transfers:
        if d.id in seen:
            raise InvalidArgument(f"transfer {d.id!r} appears twice", field="transfers")
        seen.add(d.id)
        for f in d.flows:
            if f.remaining_nbytes < 0 or not f.weight >= 0:
                raise InvalidArgument(
                    f"transfer {d.id!r}: remaining bytes and weights must be >= 0",
                    field="transfers",
                )
            missing = [r for r in f.route.resources if r not in capacities_bps]
            if missing:
                raise InvalidArgument(
                    f"transfer {d.id!r} uses {missing[0]}, which has no capacity given",
                    field="capacities",
                )


def _least_rates(
    now_s: float, d: Demand, free: Mapping[str, float]
) -> tuple[dict[tuple[str, Route], float], AtRisk | None]:
    """Each route's rate_least, or why the transfer cannot have them all."""
    assert d.deadline_s is not None  # only transfers with a deadline get here
    left_s = d.deadline_s - now_s - d.inference_latency_s
    need: dict[str, float] = {}
    least: dict[tuple[str, Route], float] = {}
    for f in d.flows:
        if f.remaining_nbytes == 0:
            continue
        budget_s = left_s - f.route.latency_s
        if budget_s <= 0:
            detail = (
                f"{-left_s * 1e3:.3f} ms past the time its bytes had to land"
                if left_s <= 0
                else f"{left_s * 1e6:.1f} us left, less than the latency of {f.route.name}"
            )
            return {}, AtRisk(d.id, "deadline_passed", detail)
        rate = f.remaining_nbytes / budget_s
        least[d.id, f.route] = rate
        for r in f.route.resources:
            need[r] = need.get(r, 0.0) + rate
    short = max(need, key=lambda r: need[r] - free[r])
    if need[short] > free[short] + FLOW_EPS_BPS:
        available = max(free[short], 0.0)
        return {}, AtRisk(
            d.id,
            "insufficient_bandwidth",
            f"needs {need[short] / 1e9:.3f} GB/s on {short}, "
            f"{available / 1e9:.3f} GB/s left after earlier deadlines",
            resource=short,
            needed_bps=need[short],
            available_bps=available,
        )
    return least, None


def _max_min(active: Sequence[Demand], free: dict[str, float]) -> dict[tuple[str, Route], float]:
    """Progressive filling: every unfrozen transfer grows at one pace until a resource fills.

    A transfer's growth is spread over its routes by weight; a transfer freezes when any
    resource one of its routes crosses is full. ``free`` is used up in place.
    """
    shares: dict[str, list[tuple[tuple[str, Route], tuple[str, ...], float]]] = {}
    for d in active:
        flows = [f for f in d.flows if f.remaining_nbytes > 0]
        total = sum(f.weight for f in flows)
        shares[d.id] = [
            ((d.id, f.route), f.route.resources, f.weight / total if total > 0 else 1 / len(flows))
            for f in flows
        ]
    level = dict.fromkeys(shares, 0.0)
    growing = set(shares)
    while growing:
        pace: dict[str, float] = {}
        for t in growing:
            for _, resources, w in shares[t]:
                for r in resources:
                    pace[r] = pace.get(r, 0.0) + w
        step, first = min((max(free[r], 0.0) / p, r) for r, p in pace.items() if p > 0)
        for t in growing:
            level[t] += step
        for r, p in pace.items():
            free[r] -= p * step
        free[first] = 0.0  # exactly full, whatever the rounding
        full = {r for r in pace if free[r] <= FLOW_EPS_BPS}
        growing = {t for t in growing if not any(full & set(res) for _, res, _ in shares[t])}
    return {key: w * level[t] for t, fl in shares.items() for key, _, w in fl}
