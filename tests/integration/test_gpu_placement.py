"""Every GPU of a node serves (sim:8, the DGX-1 topology): functions of different models
spread over the GPUs, each computes on the GPU its record names (the reply, the events,
``GET /v1/nodes``), a workflow's consumer cold-started where its model still is reads the
intermediate over NVLink, and a function scales out to another GPU of its node and back."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from gpufaas.main import placed_on
from gpufaas.scheduler.service import SchedulerService
from gpufaas.shared.identity import FunctionRef
from gpufaas.worker.service import WorkerService
from tests.integration.conftest import (
    DEMO_BODY,
    Platform,
    PlatformFactory,
    read_events,
    text_request,
)
from tests.integration.scorer import DIM, export_scorer, scorer_body
from tests.support import eventually

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


def only_gpu(function: dict[str, Any]) -> str:
    """The GPU of a function's one instance on node-t."""
    (gpu,) = function["gpus"]["node-t"]
    return str(gpu)


async def test_functions_spread_over_the_gpus_and_run_on_theirs(
    dgx1: Platform, scorer_dirs: list[Path]
) -> None:
    c = dgx1.client
    assert (await c.post("/v1/functions", json=DEMO_BODY)).status == 201
    for i, d in enumerate(scorer_dirs):
        resp = await c.post("/v1/functions", json=scorer_body(d, f"scorer{i}"))
        assert resp.status == 201, await resp.text()
    names = ["minilm", "scorer0", "scorer1", "scorer2"]
    gpus = {n: only_gpu(await record(dgx1, n)) for n in names}
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


async def test_a_consumer_cold_started_for_a_workflow_goes_where_its_model_still_is(
    dgx1: Platform, scorer_dirs: list[Path]
) -> None:
    """Scaled to zero, a workflow's consumer is cold-started on the GPU whose model cache
    still holds its model (placement's order: that before nearness to the inputs; the
    nearness itself is ``test_placement.py``'s), and the producer's tube reaches it from
    the producer's GPU over their NVLink, never through the host."""
    c = dgx1.client
    sched = dgx1.services["scheduler"]
    assert isinstance(sched, SchedulerService)
    assert (await c.post("/v1/functions", json=DEMO_BODY)).status == 201
    resp = await c.post("/v1/functions", json=scorer_body(scorer_dirs[0]))
    assert resp.status == 201
    producer = only_gpu(await record(dgx1, "minilm"))
    cached = only_gpu(await record(dgx1, "scorer"))
    assert cached != producer  # deployed second: the idle GPU
    workflow = {
        "name": "embed-score",
        "steps": [
            {"name": "embed", "function": "minilm", "inputs": {"text": "$input.text"}},
            {"name": "score", "function": "scorer", "inputs": {"x": "embed.embedding"}},
        ],
    }
    assert (await c.post("/v1/workflows", json=workflow)).status == 201
    assert (await c.post("/v2/repository/models/scorer/unload")).status == 200
    spec = (await sched.functions.get("default", "scorer") or pytest.fail("gone")).spec

    async def listed() -> bool:
        return await sched.placer.gpu_cached(spec) == {("node-t", cached)}

    await eventually(listed, 10, "the scorer's model in its GPU's cache")
    texts = [f"sentence number {i} about a cat" for i in range(64)]  # a 96 KB tube
    resp = await c.post("/v1/workflows/embed-score/infer", json=text_request(texts))
    result = await resp.json()
    assert resp.status == 200, result
    embed, score = result["parameters"]["steps"]
    assert embed["device"] == producer
    assert embed["output_tiers"] == [producer]  # the intermediate, on the producer's GPU
    assert score["device"] == cached
    assert only_gpu(await record(dgx1, "scorer")) == cached
    (moved,) = [e["data"] for e in await read_events(dgx1, "transfer.completed")]
    assert moved["tier"] == cached
    assert moved["path"].endswith(f"{producer}>{cached} 100%"), moved


async def test_a_function_scales_out_to_another_gpu_of_its_node_and_back(dgx1: Platform) -> None:
    """The node holds the model's tensors already: the second instance goes to another GPU
    of it (cheaper than another node), requests at once spread over both, and a scale-in
    takes that instance back once drained while the first keeps serving."""
    c = dgx1.client
    assert (await c.post("/v1/functions", json=DEMO_BODY)).status == 201
    sched = dgx1.services["scheduler"]
    worker = dgx1.services["worker"]
    assert isinstance(sched, SchedulerService)
    assert isinstance(worker, WorkerService)
    ref = FunctionRef("default", "minilm")
    deployed = await sched.functions.get("default", "minilm")
    assert deployed is not None
    await sched.leadership.scale(deployed, 2, "test", time.time())
    scaled = await record(dgx1, "minilm")
    assert scaled["nodes"] == ["node-t"]
    first, second = scaled["gpus"]["node-t"]
    assert worker.loaded.devices(ref) == [first, second]
    (event,) = [e["data"] for e in await read_events(dgx1, "function.scaled")]
    assert (event["from"], event["to"], event["gpus"]) == (1, 2, {"node-t": [first, second]})

    seen: set[str] = set()

    async def both() -> bool:
        body = text_request(["requests at once"])
        replies = await asyncio.gather(
            *(c.post("/v2/models/minilm/infer", json=body) for _ in range(8))
        )
        assert all(r.status == 200 for r in replies)
        seen.update(r.headers["Gpufaas-Device"] for r in replies)
        return seen == {first, second}

    await eventually(both, 30, "requests computed on both instances")

    now = time.time()
    shrunk = await sched.functions.get("default", "minilm")
    assert shrunk is not None
    await sched.leadership.scale(shrunk, 1, "test", now)
    assert (await record(dgx1, "minilm"))["gpus"]["node-t"] == [first]
    await sched.leadership.finish_draining(now + 3600)
    assert worker.loaded.devices(ref) == [first]
    resp = await c.post("/v2/models/minilm/infer", json=text_request(["still here"]))
    assert (resp.status, resp.headers["Gpufaas-Device"]) == (200, first)
