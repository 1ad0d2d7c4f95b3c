"""Every GPU of a node serves (sim:8, the DGX-1 topology): functions of different models
spread over the GPUs, each computes on the GPU its record names (the reply, the events,
``GET /v1/nodes``), and a workflow's consumer cold-started on its producer's GPU reads the
intermediate where it is (a consumer on an NVLink neighbour reading it over the link:
``test_worker_gpus.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gpufaas.main import placed_on
from tests.integration.conftest import (
    DEMO_BODY,
    Platform,
    PlatformFactory,
    read_events,
    text_request,
)
from tests.integration.scorer import DIM, export_scorer, scorer_body

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def scorer_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three scorers of different weights: three models, no tensor in common."""
    return [export_scorer(tmp_path_factory.mktemp(f"scorer{i}"), i + 1) for i in range(3)]


@pytest.fixture
async def dgx1(platform_factory: PlatformFactory) -> Platform:
    return await platform_factory(devices="sim:8", topology="dgx1-v100")


async def record(p: Platform, name: str) -> dict[str, Any]:
    resp = await p.client.get(f"/v1/functions/{name}")
    assert resp.status == 200
    return dict(await resp.json())


async def test_functions_spread_over_the_gpus_and_run_on_theirs(
    dgx1: Platform, scorer_dirs: list[Path]
) -> None:
    c = dgx1.client
    assert (await c.post("/v1/functions", json=DEMO_BODY)).status == 201
    for i, d in enumerate(scorer_dirs):
        resp = await c.post("/v1/functions", json=scorer_body(d, f"scorer{i}"))
        assert resp.status == 201, await resp.text()
    names = ["minilm", "scorer0", "scorer1", "scorer2"]
    gpus = {n: (await record(dgx1, n))["gpus"]["node-t"] for n in names}
    assert len(set(gpus.values())) == 4, gpus  # four models: four GPUs, the least loaded
    assert placed_on(await record(dgx1, "scorer0")) == [f"node-t/{gpus['scorer0']}"]  # status
    deployed = await read_events(dgx1, "function.deployed")
    assert {e["data"]["function"]: e["data"]["gpu"] for e in deployed} == gpus

    # Each runs on its own GPU: the reply says so, and so does its completion event.
    x = {"name": "x", "datatype": "FP32", "shape": [2, DIM], "data": [0.5] * (2 * DIM)}
    resp = await c.post("/v2/models/scorer1/infer", json={"inputs": [x]})
    assert resp.status == 200, await resp.text()
    assert resp.headers["Gpufaas-Device"] == gpus["scorer1"]
    resp = await c.post("/v2/models/minilm/infer", json=text_request(["a cat"]))
    assert resp.headers["Gpufaas-Device"] == gpus["minilm"]
    done = await read_events(dgx1, "invocation.completed")
    assert {e["data"]["function"]: e["data"]["device"] for e in done} == {
        "scorer1": gpus["scorer1"],
        "minilm": gpus["minilm"],
    }

    # GET /v1/nodes names the functions on each GPU.
    (node,) = (await (await c.get("/v1/nodes")).json())["nodes"]
    on = {d["name"]: d.get("functions", []) for d in node["devices"]}
    for name, gpu in gpus.items():
        assert f"default.{name}" in on[gpu]
    assert sum(len(v) for v in on.values()) == 4
    other = await dgx1.key_for("other")  # another tenant sees no one else's functions
    resp = await c.get("/v1/nodes", headers={"Authorization": f"Bearer {other}"})
    (node,) = (await resp.json())["nodes"]
    assert all("functions" not in d for d in node["devices"])


async def test_a_consumer_cold_started_for_a_workflow_lands_on_its_producers_gpu(
    dgx1: Platform, scorer_dirs: list[Path]
) -> None:
    c = dgx1.client
    assert (await c.post("/v1/functions", json=DEMO_BODY)).status == 201
    resp = await c.post("/v1/functions", json=scorer_body(scorer_dirs[0]))
    assert resp.status == 201
    producer = (await record(dgx1, "minilm"))["gpus"]["node-t"]
    workflow = {
        "name": "embed-score",
        "steps": [
            {"name": "embed", "function": "minilm", "inputs": {"text": "$input.text"}},
            {"name": "score", "function": "scorer", "inputs": {"x": "embed.embedding"}},
        ],
    }
    assert (await c.post("/v1/workflows", json=workflow)).status == 201
    # Scaled to zero: the step's request cold-starts it, placed by where its input is.
    assert (await c.post("/v2/repository/models/scorer/unload")).status == 200
    texts = [f"sentence number {i} about a cat" for i in range(64)]  # a 96 KB tube
    resp = await c.post("/v1/workflows/embed-score/infer", json=text_request(texts))
    result = await resp.json()
    assert resp.status == 200, result
    embed, score = result["parameters"]["steps"]
    assert embed["device"] == producer
    assert embed["output_tiers"] == [producer]  # the intermediate, on the producer's GPU
    # The consumer went to the GPU holding its input (not crowded: one instance there),
    # and read it where it was: no copy between tiers.
    assert score["device"] == producer
    assert (await record(dgx1, "scorer"))["gpus"]["node-t"] == producer
    assert await read_events(dgx1, "transfer.completed") == []
