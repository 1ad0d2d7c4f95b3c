"""Locality-aware placement across two nodes: a model goes where its tensors already are."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from gpufaas.gateway.app import create_app
from gpufaas.scheduler.service import SchedulerService
from gpufaas.shared.service import Service
from tests.conftest import NatsServer
from tests.integration.conftest import DEMO_BODY, NODE_SERVICES, make_config

pytestmark = pytest.mark.integration


@pytest.fixture
async def two_nodes(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[TestClient[Any, Any]]:
    services: list[Service] = []
    for node in ("node-a", "node-b"):
        config = make_config(nats_server, tmp_path, node_id=node, shm_dir=tmp_path / node)
        for cls in NODE_SERVICES:
            services.append(cls(config))
    base = make_config(nats_server, tmp_path, node_id="node-a")
    services.append(SchedulerService(base))
    for svc in services:
        await svc.start()
    client = TestClient(TestServer(create_app(base)))
    await client.start_server()
    yield client
    await client.close()
    for svc in reversed(services):
        await svc.stop()


async def node_of(client: TestClient[Any, Any], name: str) -> str:
    record = await (await client.get(f"/v1/functions/{name}")).json()
    (node,) = record["nodes"]
    return str(node)


async def test_a_model_goes_where_its_tensors_already_are(two_nodes: TestClient[Any, Any]) -> None:
    c = two_nodes
    assert (await c.post("/v1/functions", json=DEMO_BODY)).status == 201
    base_node = await node_of(c, "minilm")
    # A second function of the same model: θ = 1 where the first one put its tensors, so
    # it goes there although that node already has a function and the other has none.
    assert (await c.post("/v1/functions", json={**DEMO_BODY, "name": "minilm-2"})).status == 201
    assert await node_of(c, "minilm-2") == base_node
    # A tenant's private copy has nothing resident anywhere: the least loaded node.
    private = {"name": "mine", "model": {"builtin": "all-minilm-l6-v2", "private": True}}
    t2 = {"X-Gpufaas-Tenant": "t2"}
    assert (await c.post("/v1/functions", json=private, headers=t2)).status == 201
    record = await (await c.get("/v1/functions/mine", headers=t2)).json()
    assert record["nodes"] != [base_node]
