"""SLO-aware bandwidth sharing: least rates by earliest deadline, then max-min fair shares."""

from __future__ import annotations

import random

import pytest

from gpufaas.shared.errors import InvalidArgument
from gpufaas.transfer.bandwidth import Allocation, Demand, Flow, allocate
from gpufaas.transfer.linkmodel import Route

pytestmark = pytest.mark.unit

GB = 1e9


def route(*resources: str, latency_s: float = 0.0, name: str = "") -> Route:
    """A synthetic route over named resources (capacities come with each test)."""
    return Route(
        src="host",
        dst="gpu:0",
        hops=("host", name or "+".join(resources), "gpu:0"),
        resources=resources,
        latency_s=latency_s,
        capacity_bps=0.0,
        kind="relay",
    )


L = route("L")
LM = route("L", "M")
M = route("M")


def one(tid: str, r: Route, nbytes: float, deadline_s: float | None = None, **kw: float) -> Demand:
    return Demand(tid, (Flow(r, int(nbytes)),), deadline_s, **kw)


def used(alloc: Allocation, resource: str) -> float:
    return sum(v for (_, r), v in alloc.rates_bps.items() if resource in r.resources)


def test_two_deadlines_on_one_link_both_get_their_least_rate() -> None:
    caps = {"L": 10 * GB}
    a = one("a", L, 1 * GB, deadline_s=0.5, inference_latency_s=0.1)  # needs 2.5 GB/s
    b = one("b", L, 2 * GB, deadline_s=1.0, inference_latency_s=0.2)  # needs 2.5 GB/s
    alloc = allocate(0.0, [b, a], caps)
    assert alloc.at_risk == ()
    assert alloc.reserved_bps == {
        ("a", L): pytest.approx(2.5 * GB),
        ("b", L): pytest.approx(2.5 * GB),
    }
    # the 5 GB/s left is shared evenly on top: both finish well before their deadlines
    assert alloc.rate("a", L) == pytest.approx(5 * GB)
    assert alloc.rate("b", L) == pytest.approx(5 * GB)
    assert 1 * GB / alloc.rate("a", L) <= 0.5 - 0.1
    assert 2 * GB / alloc.rate("b", L) <= 1.0 - 0.2


def test_equal_transfers_without_deadlines_get_equal_shares() -> None:
    alloc = allocate(0.0, [one(t, L, GB) for t in "abcd"], {"L": 10 * GB})
    assert [alloc.rate(t, L) for t in "abcd"] == pytest.approx([2.5 * GB] * 4)


def test_leftover_is_shared_max_min_fairly() -> None:
    caps = {"L": 10 * GB, "M": 2 * GB}
    # b is held to 2 GB/s by M; a gets the rest of L, not an "equal" 5
    alloc = allocate(0.0, [one("a", L, GB), one("b", LM, GB)], caps)
    assert alloc.rate("b", LM) == pytest.approx(2 * GB)
    assert alloc.rate("a", L) == pytest.approx(8 * GB)
    # a least rate comes first, then the rest is split evenly
    alloc = allocate(0.0, [one("a", L, 4 * GB, deadline_s=1.0), one("b", L, GB)], {"L": 10 * GB})
    assert alloc.reserved_bps[("a", L)] == pytest.approx(4 * GB)
    assert alloc.rate("a", L) == pytest.approx(7 * GB)
    assert alloc.rate("b", L) == pytest.approx(3 * GB)


def test_an_infeasible_deadline_is_reported_not_hidden() -> None:
    caps = {"L": 10 * GB}
    late = one("late", L, 20 * GB, deadline_s=1.0)  # needs 20 GB/s of a 10 GB/s link
    ok = one("ok", L, 1 * GB, deadline_s=2.0)
    alloc = allocate(0.0, [late, ok], caps)
    [risk] = alloc.at_risk
    assert risk.transfer_id == "late"
    assert risk.cause == "insufficient_bandwidth"
    assert risk.resource == "L"
    assert risk.needed_bps == pytest.approx(20 * GB)
    assert risk.available_bps == pytest.approx(10 * GB)
    assert "GB/s" in risk.detail
    assert ("late", L) not in alloc.reserved_bps
    assert alloc.rate("late", L) > 0  # still moves, at a fair share
    assert alloc.rate("ok", L) >= 0.5 * GB


def test_admission_is_earliest_deadline_first() -> None:
    caps = {"L": 10 * GB}
    early = one("early", L, 6 * GB, deadline_s=1.0)
    later = one("later", L, 12 * GB, deadline_s=2.0)  # 6 GB/s too: only one fits
    for order in ([early, later], [later, early]):
        alloc = allocate(0.0, order, caps)
        assert alloc.at_risk_ids() == {"later"}
        assert alloc.reserved_bps == {("early", L): pytest.approx(6 * GB)}


def test_a_passed_deadline_or_no_time_left_is_at_risk() -> None:
    caps = {"L": 10 * GB}
    gone = one("gone", L, GB, deadline_s=1.0)
    squeezed = one(
        "squeezed", route("L", latency_s=0.2), GB, deadline_s=2.4, inference_latency_s=0.3
    )
    alloc = allocate(2.0, [gone, squeezed], caps)
    causes = {r.transfer_id: r.cause for r in alloc.at_risk}
    assert causes == {"gone": "deadline_passed", "squeezed": "deadline_passed"}
    assert alloc.transfer_rate("gone") == pytest.approx(5 * GB)  # fair share, reported


def test_route_weights_split_a_transfers_share() -> None:
    caps = {"L": 10 * GB, "M": 10 * GB, "N": 10 * GB}
    two = Demand("two", (Flow(L, 10**9, weight=3.0), Flow(M, 10**9, weight=1.0)))
    other = one("other", route("M", "N", name="mn"), GB)
    alloc = allocate(0.0, [two, other], caps)
    # both grow at one pace until M fills (`two` puts a quarter of its share there):
    # 8 GB/s each; `two` keeps its 3:1 split, so its parts still finish together
    assert alloc.transfer_rate("two") == pytest.approx(8 * GB)
    assert alloc.rate("two", L) == pytest.approx(6 * GB)
    assert alloc.rate("two", M) == pytest.approx(2 * GB)
    assert alloc.rate("other", other.flows[0].route) == pytest.approx(8 * GB)
    assert used(alloc, "M") == pytest.approx(10 * GB)


def test_a_transfer_with_two_routes_over_one_resource_counts_both() -> None:
    a, b = route("U", "P", name="a"), route("U", "Q", name="b")
    caps = {"U": 12.5 * GB, "P": 12.5 * GB, "Q": 12.5 * GB}
    alloc = allocate(0.0, [Demand("t", (Flow(a, 10**9), Flow(b, 10**9)))], caps)
    assert used(alloc, "U") == pytest.approx(12.5 * GB)
    assert alloc.transfer_rate("t") == pytest.approx(12.5 * GB)


def test_rates_never_exceed_capacity_and_reservations_hold() -> None:
    rng = random.Random(3)
    names = ["A", "B", "C", "D", "E"]
    caps = {n: rng.uniform(5, 20) * GB for n in names}
    for _ in range(50):
        demands = []
        for i in range(rng.randint(1, 8)):
            flows = tuple(
                Flow(
                    route(*rng.sample(names, rng.randint(1, 3)), name=f"r{i}.{j}"),
                    rng.randint(1, 10**9),
                )
                for j in range(rng.randint(1, 3))
            )
            deadline = rng.choice([None, rng.uniform(0.05, 1.0)])
            demands.append(Demand(f"t{i}", flows, deadline))
        alloc = allocate(0.0, demands, caps)
        for n in names:
            assert used(alloc, n) <= caps[n] * (1 + 1e-9)
        for key, least in alloc.reserved_bps.items():
            assert alloc.rates_bps[key] >= least * (1 - 1e-9)


def test_bad_snapshots_are_refused() -> None:
    with pytest.raises(InvalidArgument) as err:
        allocate(0.0, [one("a", L, 1), one("a", L, 1)], {"L": GB})
    assert err.value.field == "transfers"
    with pytest.raises(InvalidArgument) as err:
        allocate(0.0, [one("a", LM, 1)], {"L": GB})
    assert err.value.field == "capacities"
    done = allocate(0.0, [one("a", L, 0, deadline_s=1.0)], {"L": GB})
    assert done.rates_bps == {}
    assert done.at_risk == ()
