"""The link model: resources, shared uplinks, candidate routes and the max-flow optimum."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from gpufaas.shared.devices import Link, Topology, load_topology, parse_devices
from gpufaas.shared.errors import InvalidArgument
from gpufaas.transfer.linkmodel import (
    HOST_MEMORY_READ,
    LinkModel,
    nvlink_resource,
    nvswitch_resource,
    pcie_resource,
    uplink_resource,
)

pytestmark = pytest.mark.unit

GB = 1e9
MiB = 2**20


@pytest.fixture(scope="module")
def dgx1() -> LinkModel:
    return LinkModel(load_topology("dgx1-v100"))


@pytest.fixture(scope="module")
def h100() -> LinkModel:
    return LinkModel(load_topology("dgx-h100"))


def test_every_link_direction_is_a_resource(dgx1: LinkModel) -> None:
    caps = dgx1.capacities_bps
    for i in range(8):
        g = f"gpu:{i}"
        assert caps[pcie_resource(g, "h2d")] == caps[pcie_resource(g, "d2h")] == 12.5 * GB
    for s in range(4):
        assert caps[uplink_resource(f"switch{s}", "h2d")] == 12.5 * GB
        assert caps[uplink_resource(f"switch{s}", "d2h")] == 12.5 * GB
    # links x 25 GB/s, each direction its own resource
    assert (
        caps[nvlink_resource("gpu:0", "gpu:3")]
        == caps[nvlink_resource("gpu:3", "gpu:0")]
        == 50 * GB
    )
    assert caps[nvlink_resource("gpu:0", "gpu:1")] == 25 * GB
    assert nvlink_resource("gpu:0", "gpu:5") not in caps
    assert HOST_MEMORY_READ not in caps  # unbounded unless given
    nvlinks = [r for r in caps if r.startswith("nvlink:")]
    assert len(nvlinks) == 2 * 16  # 16 pairs in hardware.md's table


def test_shared_uplinks_follow_the_topology_files_shared_tags(dgx1: LinkModel) -> None:
    raw = json.loads((resources.files("gpufaas.shared") / "topologies/dgx1-v100.json").read_text())
    tags = {ln["b"]: ln["shared"] for ln in raw["links"] if ln["a"] == "host"}
    assert {g: dgx1.switch_of(g) for g in dgx1.gpus} == tags
    assert dgx1.switch_of("gpu:0") == dgx1.switch_of("gpu:1") == "switch0"


def test_host_to_gpu_routes_relay_through_nvlink_peers(dgx1: LinkModel) -> None:
    routes = dgx1.routes("host", "gpu:0")
    direct = routes[0]
    assert direct.kind == "direct"
    assert direct.hops == ("host", "gpu:0")
    assert direct.resources == (uplink_resource("switch0", "h2d"), pcie_resource("gpu:0", "h2d"))
    assert direct.latency_s == pytest.approx(10e-6)
    one_hop = {r.hops[1]: r for r in routes if r.relays == 1}
    assert set(one_hop) == {"gpu:1", "gpu:2", "gpu:3", "gpu:4"}  # gpu:0's NVLink peers
    via2 = one_hop["gpu:2"]
    assert via2.resources == (
        uplink_resource("switch1", "h2d"),
        pcie_resource("gpu:2", "h2d"),
        nvlink_resource("gpu:2", "gpu:0"),
    )
    assert via2.latency_s == pytest.approx(15e-6)  # PCIe 10 us + NVLink 5 us
    assert via2.capacity_bps == 12.5 * GB
    # gpu:1 sits behind the same switch: its relay shares the direct route's uplink
    assert uplink_resource("switch0", "h2d") in one_hop["gpu:1"].resources
    assert all(r.kind != "host-staged" for r in routes)


def test_gpu_to_host_mirrors_host_to_gpu(dgx1: LinkModel) -> None:
    down = {r.hops for r in dgx1.routes("host", "gpu:5")}
    up = {r.hops[::-1] for r in dgx1.routes("gpu:5", "host")}
    assert down == up
    assert dgx1.routes("gpu:5", "host")[0].resources == (
        pcie_resource("gpu:5", "d2h"),
        uplink_resource("switch2", "d2h"),
    )


def test_gpu_pairs_have_nvlink_routes_and_the_host_as_last_resort(dgx1: LinkModel) -> None:
    r03 = dgx1.routes("gpu:0", "gpu:3")
    assert r03[0].hops == ("gpu:0", "gpu:3")
    assert r03[0].capacity_bps == 50 * GB
    assert r03[-1].kind == "host-staged"
    assert dgx1.has_direct_nvlink("gpu:0", "gpu:3")
    assert not dgx1.has_direct_nvlink("gpu:0", "gpu:5")
    r05 = dgx1.routes("gpu:0", "gpu:5")
    assert {r.hops for r in r05 if r.relays == 1} == {
        ("gpu:0", "gpu:1", "gpu:5"),
        ("gpu:0", "gpu:4", "gpu:5"),
    }
    staged = r05[-1]
    assert staged.hops == ("gpu:0", "host", "gpu:5")
    assert staged.latency_s == pytest.approx(20e-6)
    assert staged.resources == (
        pcie_resource("gpu:0", "d2h"),
        uplink_resource("switch0", "d2h"),
        uplink_resource("switch2", "h2d"),
        pcie_resource("gpu:5", "h2d"),
    )
    assert max(r.relays for r in r05) <= dgx1.max_nvlink_hops - 1


def test_max_flow_counts_a_shared_uplink_once(dgx1: LinkModel) -> None:
    # four switch uplinks of 12.5 GB/s; GPUs 0 and 1 share switch0's
    assert dgx1.max_flow_bps("host", "gpu:0") == pytest.approx(50 * GB)
    assert dgx1.max_flow_bps("gpu:0", "host") == pytest.approx(50 * GB)
    nbytes = 64 * MiB
    assert dgx1.max_flow_time("host", "gpu:0", nbytes) == pytest.approx(nbytes / (50 * GB) + 10e-6)
    assert dgx1.max_flow_time("host", "gpu:0", 0) == 0.0
    busy = {uplink_resource(f"switch{s}", "h2d"): 12.5 * GB for s in (1, 2, 3)}
    assert dgx1.max_flow_bps("host", "gpu:0", busy) == pytest.approx(12.5 * GB)
    # 150 GB/s of NVLink out of gpu:0, plus its own PCIe link through the host
    assert dgx1.max_flow_bps("gpu:0", "gpu:5") == pytest.approx(162.5 * GB)


def test_host_memory_bounds_everything_from_the_host() -> None:
    m = LinkModel(load_topology("dgx1-v100"), host_memory_bps=20 * GB)
    assert m.capacities_bps[HOST_MEMORY_READ] == 20 * GB
    assert HOST_MEMORY_READ in m.routes("host", "gpu:3")[0].resources
    assert m.max_flow_bps("host", "gpu:0") == pytest.approx(20 * GB)


def test_nvswitch_gives_each_gpu_one_port_per_direction(h100: LinkModel) -> None:
    caps = h100.capacities_bps
    assert caps[nvswitch_resource("gpu:0", "out")] == 390 * GB
    assert not any(r.startswith("nvlink:") for r in caps)
    assert not any(r.startswith("uplink:") for r in caps)  # one GPU per PCIe switch
    routes = h100.routes("gpu:0", "gpu:5")
    assert [r.hops for r in routes] == [("gpu:0", "gpu:5"), ("gpu:0", "host", "gpu:5")]
    assert routes[0].resources == (
        nvswitch_resource("gpu:0", "out"),
        nvswitch_resource("gpu:5", "in"),
    )
    assert routes[0].latency_s == pytest.approx(3e-6)
    # the port, not the pair, is the limit: relaying through a third GPU adds nothing
    assert h100.max_flow_bps("gpu:0", "gpu:5") == pytest.approx((390 + 55) * GB)
    assert len(h100.routes("host", "gpu:0")) == 8  # direct + one relay per peer


def test_single_gpu_pcie_node() -> None:
    m = LinkModel(load_topology("pcie-1gpu"))
    [route] = m.routes("host", "gpu:0")
    assert route.resources == (pcie_resource("gpu:0", "h2d"),)
    assert route.capacity_bps == 25 * GB
    assert m.max_flow_bps("gpu:0", "host") == pytest.approx(25 * GB)


def test_a_simulated_subset_of_the_dgx1() -> None:
    sub = parse_devices("sim:2", "dgx1-v100").topology
    assert sub is not None
    m = LinkModel(sub)
    assert m.devices == ("host", "gpu:0", "gpu:1")
    assert m.max_flow_bps("host", "gpu:0") == pytest.approx(12.5 * GB)  # one shared uplink
    assert m.max_flow_bps("gpu:0", "gpu:1") == pytest.approx(25 * GB + 12.5 * GB)


@pytest.mark.parametrize(("src", "dst"), [("gpu:9", "host"), ("host", "cpu"), ("gpu:0", "gpu:0")])
def test_bad_devices_name_the_tier_field(dgx1: LinkModel, src: str, dst: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        dgx1.routes(src, dst)
    assert err.value.field == "tier"
    with pytest.raises(InvalidArgument):
        dgx1.max_flow_time(src, dst, 1)


def test_a_link_to_an_unlisted_device_is_refused() -> None:
    topo = Topology(
        name="broken",
        gpus=[{"index": 0, "model": "x", "memory_bytes": 1}],
        links=[Link(a="host", b="gpu:1", kind="pcie4", gbps=25.0, latency_us=10.0)],
    )
    with pytest.raises(InvalidArgument) as err:
        LinkModel(topo)
    assert err.value.field == "topology"
