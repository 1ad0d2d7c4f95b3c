"""The API fields the web console draws: a function's profile and queue in the function
list, scoped by tenant, from the profiles bucket and the scheduler replicas' load reports;
each node's topology links with the bytes each has carried, from its transfer service."""

from __future__ import annotations

from typing import Any

import pytest

from gpufaas.shared import subjects
from gpufaas.shared.messages import (
    EnsureReply,
    EnsureRequest,
    FunctionLoadReport,
    SchedulerLoad,
    encode,
    encode_json,
)
from gpufaas.shared.rpc import request
from gpufaas.shared.shm import write_tube
from tests.integration.conftest import DEMO_BODY, Platform, bearer
from tests.support import eventually

pytestmark = pytest.mark.integration


async def functions_of(p: Platform, key: str | None = None) -> list[dict[str, Any]]:
    headers = bearer(key) if key else None
    resp = await p.client.get("/v1/functions", headers=headers)
    assert resp.status == 200
    return list((await resp.json())["functions"])


async def test_the_function_list_carries_the_profile_and_the_queue(platform: Platform) -> None:
    p = platform
    assert (await p.client.post("/v1/functions", json=DEMO_BODY)).status == 201

    async def profiled() -> dict[str, Any] | None:
        (fn,) = await functions_of(p)
        return fn if "profile" in fn else None

    fn = await eventually(profiled, 60, "the function's profile in the list")
    assert fn["profile"]["batch"] >= 1
    assert fn["profile"]["concurrency"] >= 1
    assert fn["profile"]["reason"]
    assert "spec" not in fn["profile"]  # the record's own spec is the function's
    one = await (await p.client.get("/v1/functions/minilm")).json()
    assert one["profile"] == fn["profile"]

    # The replica reports every tick (nothing queued here); a second replica's report
    # (published as a scheduler does) is summed with it.
    report = SchedulerLoad(
        replica="replica-under-test",
        at=0.0,
        functions=[FunctionLoadReport("default.minilm", arrivals=5, queued=3, in_flight=2)],
    )
    nc = p.services["scheduler"].nc

    async def counted() -> dict[str, Any] | None:
        await nc.publish(subjects.SCHED_LOAD, encode(report))
        (fn,) = await functions_of(p)
        return fn["load"] if fn["load"]["replicas"] >= 2 else None

    load = await eventually(counted, 10, "both replicas' reports in the function's load")
    assert load["queued"] >= 3
    assert load["in_flight"] >= 2
    one = await (await p.client.get("/v1/functions/minilm")).json()
    assert one["load"]["queued"] >= 3

    # Another tenant's key sees neither the function nor its figures.
    acme = await p.key_for("acme")
    assert await functions_of(p, acme) == []
    resp = await p.client.get("/v1/functions/minilm", headers=bearer(acme))
    assert resp.status == 404


async def test_nodes_carry_their_topology_links_and_the_bytes_each_carried(
    platform: Platform,
) -> None:
    p = platform
    nc = p.services["scheduler"].nc

    async def links() -> dict[str, Any]:
        (node,) = (await (await p.client.get("/v1/nodes")).json())["nodes"]
        return dict(node["links"])

    before = await links()
    assert before["topology"] == "dgx1-v100"  # sim:2: its first two GPUs and their links
    assert before["simulated"] is True
    pairs = {(ln["a"], ln["b"]): ln for ln in before["links"]}
    assert pairs.keys() == {("host", "gpu:0"), ("host", "gpu:1"), ("gpu:0", "gpu:1")}
    assert pairs["host", "gpu:0"]["kind"] == "pcie3"
    assert pairs["gpu:0", "gpu:1"]["kind"] == "nvlink2"
    assert pairs["gpu:0", "gpu:1"]["gbps"] == 25.0
    assert all(ln["bytes_a_to_b"] == ln["bytes_b_to_a"] == 0 for ln in before["links"])

    # A tube copied to gpu:0 (over PCIe) and on to gpu:1 (over NVLink, or back through the
    # host: the planner may split a copy over both routes).
    data = bytes(3 * 2**20)
    tube = write_tube(
        p.config.shm_dir, "node-t", "default", datatype="UINT8", shape=[len(data)], data=data
    )
    await p.services["scheduler"].buckets.tubes.put(tube.id, encode_json(tube))
    subject = subjects.node("node-t", "transfer", subjects.TRANSFER_ENSURE)
    for tier in ("gpu:0", "gpu:1"):
        ask = EnsureRequest(tube_id=tube.id, tier=tier)
        assert (await request(nc, subject, ask, EnsureReply, timeout=30)).placement.tier == tier
    after = {(ln["a"], ln["b"]): ln for ln in (await links())["links"]}
    assert after["host", "gpu:0"]["bytes_a_to_b"] == len(data)
    into_gpu1 = after["gpu:0", "gpu:1"]["bytes_a_to_b"] + after["host", "gpu:1"]["bytes_a_to_b"]
    assert into_gpu1 == len(data)
    assert after["host", "gpu:0"]["bytes_b_to_a"] == after["gpu:0", "gpu:1"]["bytes_b_to_a"] == 0
