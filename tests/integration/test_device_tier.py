"""The device tier on simulated GPUs: one copy per tensor per GPU, capacity enforced."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from gpufaas.shared.config import Config
from gpufaas.tensorstore.service import TensorStoreService
from tests.conftest import NatsServer
from tests.integration.conftest import DEMO_BODY, Platform, make_config, text_request

pytestmark = pytest.mark.integration

MIB = 2**20


async def gpu0(platform: Platform) -> dict[str, Any]:
    nodes = (await (await platform.client.get("/v1/nodes")).json())["nodes"]
    device: dict[str, Any] = next(d for d in nodes[0]["devices"] if d["name"] == "gpu:0")
    return device


async def test_instances_on_a_gpu_share_one_copy(platform: Platform) -> None:
    c = platform.client
    store = platform.services["tensorstore"]
    assert isinstance(store, TensorStoreService)
    rec = await (await c.post("/v1/functions", json=DEMO_BODY)).json()
    assert (await c.post("/v1/functions", json={**DEMO_BODY, "name": "minilm-b"})).status == 201
    await store._heartbeat_once()  # publish usage now, not in 0.2 s
    used = (await gpu0(platform))["used_bytes"]
    assert rec["model_bytes"] <= used < rec["model_bytes"] * 1.01  # once (aligned), for two
    tier = (await (await c.get("/v1/nodes")).json())["nodes"][0]["tensor_store"]["gpu:0"]
    assert tier["leases"] == 2
    assert tier["bytes_without_sharing"] == 2 * rec["model_bytes"]
    # The memory service's side: the copies are blocks of gpu:0's pool; the host tier's
    # pool holds nothing until a GPU swaps something out.
    memory = (await (await c.get("/v1/nodes")).json())["nodes"][0]["memory"]
    assert set(memory["pools"]) == {"gpu:0", "host"}
    assert memory["pools"]["gpu:0"]["allocated_bytes"] >= rec["model_bytes"]
    assert memory["pools"]["host"]["reserved_bytes"] == 0
    assert (await c.delete("/v1/functions/minilm")).status == 200
    await store._heartbeat_once()
    assert (await gpu0(platform))["used_bytes"] == used  # minilm-b still uses it
    assert (await c.delete("/v1/functions/minilm-b")).status == 200
    await store._heartbeat_once()
    # Unused now, but kept resident for the keep-alive: a new instance would not copy.
    assert (await gpu0(platform))["used_bytes"] == used
    now = time.time()
    await store.reclaim_once(now)  # idle from now
    freed = await store.reclaim_once(now + platform.config.tensor_keep_alive_s)
    assert sum(n for tier, _, n, _ in freed if tier == "gpu:0") == used
    await store._heartbeat_once()
    assert (await gpu0(platform))["used_bytes"] == 0


@pytest.fixture
def platform_config(nats_server: NatsServer, tmp_path: Path) -> Config:
    # A simulated GPU with room for one MiniLM (87 MiB) but not two different ones.
    topo = {
        "name": "tiny",
        "gpus": [{"index": 0, "model": "tiny (simulated)", "memory_bytes": 120 * MIB}],
        "links": [{"a": "host", "b": "gpu:0", "kind": "pcie4", "gbps": 25, "latency_us": 10}],
    }
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(topo))
    return make_config(nats_server, tmp_path, devices="sim:1", topology=str(path))


async def test_a_model_that_does_not_fit_is_refused_cleanly(platform: Platform) -> None:
    c = platform.client
    assert (await c.post("/v1/functions", json=DEMO_BODY)).status == 201
    await platform.services["tensorstore"]._heartbeat_once()  # the scheduler sees it full
    # A private copy has its own tensor ids: it would need a second 87 MiB on the GPU.
    private = {"name": "mine", "model": {"builtin": "all-minilm-l6-v2", "private": True}}
    resp = await c.post("/v1/functions", json=private)
    body = await resp.json()
    assert resp.status == 507, body
    assert body["code"] == "resource_exhausted"
    assert body["field"] == "model"
    assert "gpu:0" in body["error"]
    names = [f["spec"]["name"] for f in (await (await c.get("/v1/functions")).json())["functions"]]
    assert names == ["minilm"]  # nothing half-deployed
    store = (await (await c.get("/v1/nodes")).json())["nodes"][0]["tensor_store"]["host"]
    assert store["leases"] == 1  # the refused instance's lease was given back
    resp = await c.post("/v2/models/minilm/infer", json=text_request(["still fine"]))
    assert resp.status == 200


async def test_model_copies_and_tube_copies_share_one_gpu_budget(platform: Platform) -> None:
    from gpufaas.shared import subjects  # noqa: PLC0415
    from gpufaas.shared.errors import ResourceExhausted  # noqa: PLC0415
    from gpufaas.shared.messages import EnsureReply, EnsureRequest, encode_json  # noqa: PLC0415
    from gpufaas.shared.rpc import request  # noqa: PLC0415
    from gpufaas.shared.shm import write_tube  # noqa: PLC0415

    c = platform.client
    assert (await c.post("/v1/functions", json=DEMO_BODY)).status == 201  # 87 of 120 MiB
    nc = platform.services["scheduler"].nc
    data = bytes(40 * MIB)
    tube = write_tube(
        platform.config.shm_dir, "node-t", "default", datatype="UINT8", shape=[len(data)], data=data
    )
    await platform.services["scheduler"].buckets.tubes.put(tube.id, encode_json(tube))
    subject = subjects.node("node-t", "transfer", subjects.TRANSFER_ENSURE)
    ask = EnsureRequest(tube_id=tube.id, tier="gpu:0")
    with pytest.raises(ResourceExhausted, match="gpu:0"):  # the model's copies hold the room
        await request(nc, subject, ask, EnsureReply, timeout=10)
    assert (await c.delete("/v1/functions/minilm")).status == 200
    store = platform.services["tensorstore"]
    assert isinstance(store, TensorStoreService)
    now = time.time()
    await store.reclaim_once(now)
    await store.reclaim_once(now + platform.config.tensor_keep_alive_s)  # copies gone, room back
    reply = await request(nc, subject, ask, EnsureReply, timeout=10)
    assert reply.placement.tier == "gpu:0"


async def test_idle_copies_make_room_and_say_so(platform: Platform) -> None:
    c = platform.client
    store = platform.services["tensorstore"]
    sub = await store.nc.subscribe("gpufaas.v1.events.memory.evicted")
    assert (await c.post("/v1/functions", json=DEMO_BODY)).status == 201
    assert (await c.delete("/v1/functions/minilm")).status == 200  # its copies stay, idle
    await store._heartbeat_once()  # the scheduler sees the GPU as full (idle copies count)
    private = {"name": "mine", "model": {"builtin": "all-minilm-l6-v2", "private": True}}
    resp = await c.post("/v1/functions", json=private)  # 87 MiB more: only with the idle gone
    assert resp.status == 201, await resp.json()
    ev = json.loads((await sub.next_msg(timeout=5)).data)["data"]
    assert (ev["device"], ev["reason"]) == ("gpu:0", "room for a model's copies")
    assert ev["bytes"] >= 86 * MIB  # the MiniLM copies (86.6 MiB)


async def test_a_workers_requests_drive_the_reservations(platform: Platform) -> None:
    from gpufaas.memory.service import MemoryService  # noqa: PLC0415

    c = platform.client
    assert (await c.post("/v1/functions", json=DEMO_BODY)).status == 201
    resp = await c.post("/v2/models/minilm/infer", json=text_request(["reserve for me"]))
    assert resp.status == 200
    memory = platform.services["memory"]
    assert isinstance(memory, MemoryService)
    await memory.reconcile_once(time.time())
    # The worker reports the function as tenant.name (tenant/name before the switch).
    assert [(d, f.replace("/", ".")) for d, f in memory.holds.reserved] == [
        ("gpu:0", "default.minilm")
    ]
