"""Path selection on the DGX-1 (the FaaSTube cases), the DGX H100 and a one-GPU PCIe node."""

from __future__ import annotations

import random
import statistics
import time
from itertools import permutations

import pytest

from gpufaas.shared.devices import load_topology
from gpufaas.shared.errors import InvalidArgument
from gpufaas.transfer.linkmodel import LinkModel, nvlink_resource, uplink_resource
from gpufaas.transfer.planner import Plan, Planner

pytestmark = pytest.mark.unit

GB = 1e9
MiB = 2**20
GiB = 2**30


@pytest.fixture(scope="module")
def dgx1() -> Planner:
    return Planner(LinkModel(load_topology("dgx1-v100")))


def check_consistent(planner: Planner, plan: Plan, load: dict[str, float] | None = None) -> None:
    """Bytes add up, parts are contiguous, finish together, and fit in what load leaves."""
    assert sum(p.nbytes for p in plan.parts) == plan.nbytes
    assert len({p.route for p in plan.parts}) == len(plan.parts)  # each route once
    offset = 0
    for p in plan.parts:
        assert p.offset == offset
        assert p.nbytes > 0
        offset += p.nbytes
        if p.rate_bps > 0:
            finish = p.route.latency_s + p.nbytes / p.rate_bps
            assert finish == pytest.approx(plan.modelled_time_s, rel=1e-6, abs=4 / p.rate_bps)
    caps = planner.model.capacities_bps
    for r, v in plan.load_bps().items():
        assert v + (load or {}).get(r, 0.0) <= caps[r] * (1 + 1e-9), r


def single_route_time(planner: Planner, src: str, dst: str, nbytes: int, kind: str) -> float:
    route = next(r for r in planner.model.routes(src, dst) if r.kind == kind)
    return route.latency_s + nbytes / route.capacity_bps


@pytest.mark.parametrize(("dst", "links"), [("gpu:3", 2), ("gpu:1", 1)])
def test_direct_nvlink_pairs_take_nvlink_only(dgx1: Planner, dst: str, links: int) -> None:
    plan = dgx1.plan("gpu:0", dst, 256 * MiB)
    check_consistent(dgx1, plan)
    assert all("host" not in p.route.hops for p in plan.parts)
    direct = [p for p in plan.parts if p.route.kind == "direct"]
    assert [p.route.capacity_bps for p in direct] == [links * 25 * GB]
    assert plan.rate_bps == pytest.approx(150 * GB)  # all of gpu:0's NVLink bandwidth
    # faster than the direct link alone, and far faster than staging through the host
    assert plan.modelled_time_s < single_route_time(dgx1, "gpu:0", dst, 256 * MiB, "direct") / 2.5
    small = dgx1.plan("gpu:0", dst, 4096)
    assert [p.route.hops for p in small.parts] == [("gpu:0", dst)]


def test_never_through_the_host_when_an_nvlink_exists(dgx1: Planner) -> None:
    rng = random.Random(7)
    model = dgx1.model
    pairs = [(a, b) for a, b in permutations(model.gpus, 2) if model.has_direct_nvlink(a, b)]
    assert len(pairs) == 32
    for i in range(200):
        src, dst = pairs[i % len(pairs)]
        load = {r: rng.uniform(0, c) for r, c in model.capacities_bps.items() if rng.random() < 0.5}
        if i % 3 == 0:  # every NVLink out of src saturated: still not the host
            load |= {
                r: c for r, c in model.capacities_bps.items() if r.startswith(f"nvlink:{src}>")
            }
        plan = dgx1.plan(src, dst, 64 * MiB, load)
        check_consistent(dgx1, plan, load)
        assert all("host" not in p.route.hops for p in plan.parts), (src, dst, plan)


def test_a_pair_without_nvlink_takes_nvlink_relays_near_the_optimum(dgx1: Planner) -> None:
    for nbytes in (64 * MiB, GiB):
        plan = dgx1.plan("gpu:0", "gpu:5", nbytes)
        check_consistent(dgx1, plan)
        hops = {p.route.hops for p in plan.parts}
        assert {("gpu:0", "gpu:1", "gpu:5"), ("gpu:0", "gpu:4", "gpu:5")} <= hops
        assert all(p.route.kind == "relay" for p in plan.parts)  # not host-staged
        optimum = dgx1.model.max_flow_time("gpu:0", "gpu:5", nbytes)
        assert optimum <= plan.modelled_time_s <= 1.10 * optimum
        staged = single_route_time(dgx1, "gpu:0", "gpu:5", nbytes, "host-staged")
        assert plan.modelled_time_s < staged / 10


def test_the_host_is_the_fallback_when_the_nvlink_routes_are_busy(dgx1: Planner) -> None:
    caps = dgx1.model.capacities_bps
    busy = {r: c for r, c in caps.items() if r.startswith("nvlink:gpu:0>")}
    plan = dgx1.plan("gpu:0", "gpu:5", 64 * MiB, busy)
    assert [p.route.kind for p in plan.parts] == ["host-staged"]
    nearly = {r: c - 1 * GB for r, c in busy.items()}  # 4 GB/s of NVLink left, 12.5 via host
    plan = dgx1.plan("gpu:0", "gpu:5", 64 * MiB, nearly)
    check_consistent(dgx1, plan, nearly)
    assert "host-staged" in {p.route.kind for p in plan.parts}


def test_host_to_gpu_spreads_over_the_switch_uplinks(dgx1: Planner) -> None:
    nbytes = GiB
    plan = dgx1.plan("host", "gpu:0", nbytes)
    check_consistent(dgx1, plan)
    uplinks = {r for p in plan.parts for r in p.route.resources if r.startswith("uplink:")}
    assert uplinks == {uplink_resource(f"switch{s}", "h2d") for s in range(4)}
    assert plan.rate_bps == pytest.approx(50 * GB)
    single = single_route_time(dgx1, "host", "gpu:0", nbytes, "direct")
    assert plan.modelled_time_s < single / 3.5
    optimum = dgx1.model.max_flow_time("host", "gpu:0", nbytes)
    assert plan.modelled_time_s == pytest.approx(optimum, rel=1e-3)  # relays add latency


def test_gpus_behind_one_switch_share_its_uplink(dgx1: Planner) -> None:
    plan = dgx1.plan("host", "gpu:0", GiB)
    switch0 = uplink_resource("switch0", "h2d")
    through = sum(p.rate_bps for p in plan.parts if switch0 in p.route.resources)
    assert through == pytest.approx(12.5 * GB)  # not 12.5 direct + 12.5 relayed by gpu:1
    # gpu:1 busy on its own PCIe link: gpu:0's direct route loses that uplink too
    loaded = {switch0: 12.5 * GB}
    plan = dgx1.plan("host", "gpu:0", GiB, loaded)
    check_consistent(dgx1, plan, loaded)
    assert all(switch0 not in p.route.resources for p in plan.parts)
    assert plan.rate_bps == pytest.approx(37.5 * GB)


def test_busy_peers_push_host_to_gpu_back_to_the_direct_link(dgx1: Planner) -> None:
    busy = {uplink_resource(f"switch{s}", "h2d"): 12.5 * GB for s in (1, 2, 3)}
    plan = dgx1.plan("host", "gpu:0", GiB, busy)
    assert [p.route.hops for p in plan.parts] == [("host", "gpu:0")]
    assert plan.modelled_time_s == pytest.approx(
        single_route_time(dgx1, "host", "gpu:0", GiB, "direct")
    )
    # partly busy: the peers still help, by what they have left
    half = {r: v / 2 for r, v in busy.items()}
    plan = dgx1.plan("host", "gpu:0", GiB, half)
    check_consistent(dgx1, plan, half)
    assert plan.rate_bps == pytest.approx(12.5 * GB + 3 * 6.25 * GB)
    # a busy NVLink from a peer reroutes that peer's uplink through another relay
    nv = {nvlink_resource("gpu:4", "gpu:0"): 50 * GB}
    plan = dgx1.plan("host", "gpu:0", GiB, nv)
    check_consistent(dgx1, plan, nv)
    assert plan.rate_bps == pytest.approx(dgx1.model.max_flow_bps("host", "gpu:0", nv))


def test_routes_that_cannot_beat_their_latency_are_skipped(dgx1: Planner) -> None:
    tiny = dgx1.plan("host", "gpu:0", 4096)
    assert [p.route.hops for p in tiny.parts] == [("host", "gpu:0")]
    assert tiny.modelled_time_s == pytest.approx(10e-6 + 4096 / (12.5 * GB))
    medium = dgx1.plan("host", "gpu:0", 256 * 1024)  # some relays pay off, not all
    big = dgx1.plan("host", "gpu:0", 64 * MiB)
    assert 1 <= len(medium.parts) <= len(big.parts)
    for plan in (tiny, medium, big):
        check_consistent(dgx1, plan)


def test_edge_cases(dgx1: Planner) -> None:
    empty = dgx1.plan("host", "gpu:3", 0)
    assert empty.parts == ()
    assert empty.modelled_time_s == 0.0
    with pytest.raises(InvalidArgument) as err:
        dgx1.plan("host", "gpu:3", -1)
    assert err.value.field == "nbytes"
    with pytest.raises(InvalidArgument) as err:
        dgx1.plan("host", "gpu:8", 1)
    assert err.value.field == "tier"
    full = dict(dgx1.model.capacities_bps)
    stuck = dgx1.plan("gpu:0", "gpu:3", MiB, full)
    assert [(p.route.hops, p.rate_bps) for p in stuck.parts] == [(("gpu:0", "gpu:3"), 0.0)]
    assert stuck.modelled_time_s == float("inf")


def test_nvswitch_and_single_gpu_plans_use_the_direct_links() -> None:
    h100 = Planner(LinkModel(load_topology("dgx-h100")))
    for src, dst in [("gpu:0", "gpu:7"), ("gpu:3", "gpu:4"), ("gpu:5", "gpu:1")]:
        plan = h100.plan(src, dst, GiB)
        check_consistent(h100, plan)
        assert [p.route.hops for p in plan.parts] == [(src, dst)]
        assert plan.rate_bps == pytest.approx(390 * GB)
    small = h100.plan("host", "gpu:2", 64 * 1024)
    assert [p.route.hops for p in small.parts] == [("host", "gpu:2")]
    big = h100.plan("host", "gpu:2", GiB)  # FaaSTube's multi-path: peers' PCIe links help
    check_consistent(h100, big)
    assert ("host", "gpu:2") in {p.route.hops for p in big.parts}
    assert big.rate_bps == pytest.approx(h100.model.max_flow_bps("host", "gpu:2"))

    one = Planner(LinkModel(load_topology("pcie-1gpu")))
    for src, dst in [("host", "gpu:0"), ("gpu:0", "host")]:
        plan = one.plan(src, dst, GiB)
        assert [p.route.hops for p in plan.parts] == [(src, dst)]
        assert plan.modelled_time_s == pytest.approx(10e-6 + GiB / (25 * GB))


def test_a_decision_takes_microseconds(dgx1: Planner) -> None:
    """A sanity bound with generous slack; bench/transfer_plans.py reports the real figure."""
    rng = random.Random(1)
    caps = dgx1.model.capacities_bps
    loads = [
        {r: rng.uniform(0, c) for r, c in caps.items() if rng.random() < 0.3} for _ in range(8)
    ]
    pairs = [("host", "gpu:0"), ("gpu:0", "gpu:3"), ("gpu:0", "gpu:5"), ("gpu:6", "host")]
    took = []
    for i in range(400):
        src, dst = pairs[i % len(pairs)]
        t0 = time.perf_counter()
        dgx1.plan(src, dst, 64 * MiB, loads[i % len(loads)])
        took.append(time.perf_counter() - t0)
    assert statistics.median(took) < 500e-6
