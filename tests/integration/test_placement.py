"""Two nodes on one NATS: placement spreads functions, invocations follow them."""

from __future__ import annotations

import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gpufaas.scheduler.service import SchedulerService
from gpufaas.shared.catalog import resolve_model_dir
from gpufaas.shared.messages import ModelSource
from gpufaas.shared.service import Service
from tests.integration.conftest import DEMO_BODY, NODE_SERVICES, Platform, text_request

pytestmark = pytest.mark.integration


@pytest.fixture
async def second_node(platform: Platform) -> AsyncIterator[list[Service]]:
    config = platform.config.replace(node_id="node-u")
    services: list[Service] = [cls(config) for cls in NODE_SERVICES]
    for svc in services:
        await svc.start()
    scheduler = platform.services["scheduler"]
    assert isinstance(scheduler, SchedulerService)
    await scheduler.reconcile_once(time.time(), announce=False)  # see the new node at once
    yield services
    for svc in reversed(services):
        await svc.stop()


async def test_functions_spread_over_nodes_and_run_where_placed(
    platform: Platform, second_node: list[Service], tmp_path: Path
) -> None:
    c = platform.client
    # The second function is the same model from a directory: its tensors are content
    # addressed, so its node stores them once whatever the source.
    model_dir = tmp_path / "copy"
    shutil.copytree(resolve_model_dir(ModelSource(builtin="all-minilm-l6-v2")), model_dir)
    first = await (await c.post("/v1/functions", json=DEMO_BODY)).json()
    resp = await c.post("/v1/functions", json={"name": "copy", "model": {"path": str(model_dir)}})
    assert resp.status == 201, await resp.text()
    second = await resp.json()
    assert {first["nodes"][0], second["nodes"][0]} == {"node-t", "node-u"}
    for rec in (first, second):
        name = rec["spec"]["name"]
        resp = await c.post(f"/v2/models/{name}/infer", json=text_request(["where am I"]))
        assert resp.status == 200, await resp.text()
        assert resp.headers["Gpufaas-Node"] == rec["nodes"][0]
        assert resp.headers["Gpufaas-Cold"] == "0"
    nodes = (await (await c.get("/v1/nodes")).json())["nodes"]
    assert [n["node"] for n in nodes] == ["node-t", "node-u"]


async def test_a_second_scheduler_replica_takes_over(platform: Platform) -> None:
    c = platform.client
    assert (await c.post("/v1/functions", json=DEMO_BODY)).status == 201
    replica = SchedulerService(platform.config)
    await replica.start()
    try:
        await platform.services["scheduler"].stop()  # the first replica goes away
        for _ in range(3):
            resp = await c.post("/v2/models/minilm/infer", json=text_request(["still served"]))
            assert resp.status == 200, await resp.text()
        assert (await c.delete("/v1/functions/minilm")).status == 200
    finally:
        await replica.stop()
