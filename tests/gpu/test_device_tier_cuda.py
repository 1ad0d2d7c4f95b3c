"""The tensor store's device tier on a real GPU, through the whole in-process platform."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gpufaas.shared.config import Config
from tests.conftest import NatsServer
from tests.integration.conftest import DEMO_BODY, Platform, make_config, text_request

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine"),
]


@pytest.fixture
def platform_config(nats_server: NatsServer, tmp_path: Path) -> Config:
    return make_config(nats_server, tmp_path, devices="auto")


async def test_two_instances_hold_one_device_copy(platform: Platform) -> None:
    c = platform.client
    rec = await (await c.post("/v1/functions", json=DEMO_BODY)).json()
    assert (await c.post("/v1/functions", json={**DEMO_BODY, "name": "minilm-b"})).status == 201
    tier = (await (await c.get("/v1/nodes")).json())["nodes"][0]["tensor_store"]["gpu:0"]
    assert rec["model_bytes"] <= tier["bytes_stored"] < rec["model_bytes"] * 1.01
    assert tier["bytes_without_sharing"] == 2 * rec["model_bytes"]
    a = await (await c.post("/v2/models/minilm/infer", json=text_request(["on the GPU"]))).json()
    b = await (await c.post("/v2/models/minilm-b/infer", json=text_request(["on the GPU"]))).json()
    assert a["outputs"][0]["data"] == pytest.approx(b["outputs"][0]["data"], abs=1e-6)
