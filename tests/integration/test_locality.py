"""Locality-aware placement across two nodes: a model goes where its tensors already are."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from gpufaas.shared import subjects
from gpufaas.shared.messages import (
    LocalityReply,
    LocalityRequest,
    ModelSource,
    RegisterReply,
    RegisterRequest,
)
from gpufaas.shared.rpc import request
from gpufaas.tensorstore.service import TensorStoreService
from tests.conftest import NatsServer
from tests.integration.conftest import DEMO_BODY, Platform, PlatformFactory, bearer, make_config
from tests.support import eventually

pytestmark = pytest.mark.integration


@pytest.fixture
async def two_nodes(platform_factory: PlatformFactory) -> Platform:
    return await platform_factory(["node-a", "node-b"])


async def node_of(client: TestClient[Any, Any], name: str) -> str:
    record = await (await client.get(f"/v1/functions/{name}")).json()
    (node,) = record["nodes"]
    return str(node)


async def test_a_model_goes_where_its_tensors_already_are(two_nodes: Platform) -> None:
    c = two_nodes.client
    assert (await c.post("/v1/functions", json=DEMO_BODY)).status == 201
    base_node = await node_of(c, "minilm")
    # A second function of the same model: θ = 1 where the first one put its tensors, so
    # it goes there although that node already has a function and the other has none.
    assert (await c.post("/v1/functions", json={**DEMO_BODY, "name": "minilm-2"})).status == 201
    assert await node_of(c, "minilm-2") == base_node
    # A tenant's private copy has nothing resident anywhere: the least loaded node.
    private = {"name": "mine", "model": {"builtin": "all-minilm-l6-v2", "private": True}}
    t2 = bearer(await two_nodes.key_for("t2"))
    assert (await c.post("/v1/functions", json=private, headers=t2)).status == 201
    record = await (await c.get("/v1/functions/mine", headers=t2)).json()
    assert record["nodes"] != [base_node]


async def test_a_store_that_never_read_a_file_knows_its_theta_from_a_peers_manifest(
    nats_server: NatsServer, tmp_path: Path, minilm_pt2: Path
) -> None:
    """node-a reads model.safetensors; node-b holds the same tensors from the exported
    program (another file); node-c holds nothing. Neither b nor c ever read the
    safetensors file, yet both tell its θ: from the manifest node-a shared."""
    export_dir = tmp_path / "export"
    export_dir.mkdir()
    shutil.copy(minilm_pt2, export_dir / "model.pt2")
    stores = {}
    for node in ("node-a", "node-b", "node-c"):
        config = make_config(
            nats_server, tmp_path, node_id=node, shm_dir=tmp_path / node, devices="cpu"
        )
        stores[node] = TensorStoreService(config)
        await stores[node].start()
    try:
        safetensors = ModelSource(builtin="all-minilm-l6-v2")
        exported = ModelSource(path=str(export_dir), architecture="torch-export")

        async def ask(node: str, verb: str, msg: Any, reply: type[Any]) -> Any:
            subject = subjects.node(node, "tensorstore", verb)
            return await request(stores["node-a"].nc, subject, msg, reply, timeout=30)

        before = await ask(
            "node-b",
            subjects.TENSORSTORE_LOCALITY,
            LocalityRequest(source=safetensors),
            LocalityReply,
        )
        assert (before.known, before.theta) == (False, 0.0)
        await ask(
            "node-a",
            subjects.TENSORSTORE_REGISTER,
            RegisterRequest(source=safetensors),
            RegisterReply,
        )
        await ask(
            "node-b", subjects.TENSORSTORE_REGISTER, RegisterRequest(source=exported), RegisterReply
        )

        async def b_knows() -> Any:
            b = await ask(
                "node-b",
                subjects.TENSORSTORE_LOCALITY,
                LocalityRequest(source=safetensors),
                LocalityReply,
            )
            return b if b.known else None

        # node-a shares its manifest after its reply
        b = await eventually(b_knows, 10, "node-b to know the file from node-a's manifest")
        a = await ask(
            "node-a",
            subjects.TENSORSTORE_LOCALITY,
            LocalityRequest(source=safetensors),
            LocalityReply,
        )
        c = await ask(
            "node-c",
            subjects.TENSORSTORE_LOCALITY,
            LocalityRequest(source=safetensors),
            LocalityReply,
        )
        assert (a.known, a.theta) == (True, 1.0)
        assert (b.known, b.theta, b.model_bytes) == (True, 1.0, a.model_bytes)
        assert (c.known, c.theta, c.bytes_to_load) == (True, 0.0, a.model_bytes)
        # A tenant's private registration shares nothing with the public manifest.
        private = LocalityRequest(
            source=ModelSource(builtin="all-minilm-l6-v2", private=True), tenant="t2"
        )
        p = await ask("node-b", subjects.TENSORSTORE_LOCALITY, private, LocalityReply)
        assert (p.known, p.theta) == (False, 0.0)
    finally:
        for store in stores.values():
            await store.stop()
