"""Workflows through the gateway: two steps whose small intermediate travels inline and
whose big one stays on the GPU tiers (moved GPU to GPU over NVLink), bad definitions refused at deploy, an intermediate
lost with its node recomputed, and a consumer brought to its producer's node."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp.test_utils import TestClient

from gpufaas.scheduler.service import SchedulerService
from gpufaas.shared.service import Service
from gpufaas.worker.service import WorkerService
from tests.integration.conftest import (
    DEMO_BODY,
    Platform,
    PlatformFactory,
    read_events,
    text_request,
)
from tests.integration.scorer import DIM, export_scorer, query, scorer_body
from tests.support import eventually

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def scorer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_scorer(tmp_path_factory.mktemp("scorer"))


WORKFLOW = {
    "name": "embed-score",
    "steps": [
        {"name": "embed", "function": "minilm", "inputs": {"text": "$input.text"}},
        {"name": "score", "function": "scorer", "inputs": {"x": "embed.embedding"}},
    ],
}


async def expected_scores(c: TestClient[Any, Any], texts: list[str]) -> np.ndarray[Any, Any]:
    resp = await c.post("/v2/models/minilm/infer", json=text_request(texts))
    emb = np.array((await resp.json())["outputs"][0]["data"], dtype=np.float32).reshape(-1, DIM)
    scores: np.ndarray[Any, Any] = emb @ query()
    return scores


def served(svc: Service, verb: str) -> int:
    """Requests ``svc`` has answered on ``verb`` since it started."""
    return sum(e.requests for e in svc.service_stats().endpoints if e.name == verb)


async def test_two_steps_pass_a_small_intermediate_inline_and_a_big_one_on_the_gpu_tier(
    platform: Platform, scorer_dir: Path
) -> None:
    c = platform.client
    assert (await c.post("/v1/functions", json=DEMO_BODY)).status == 201
    assert (await c.post("/v1/functions", json=scorer_body(scorer_dir))).status == 201
    resp = await c.post("/v1/workflows", json=WORKFLOW)
    body = await resp.json()
    assert resp.status == 201, body
    assert body["order"] == ["embed", "score"]
    assert body["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    again = await c.post("/v1/workflows", json=WORKFLOW)  # the same spec: idempotent
    assert again.status == 200
    listed = await (await c.get("/v1/workflows")).json()
    assert [w["spec"]["name"] for w in listed["workflows"]] == ["embed-score"]

    # One embedding (1.5 KB): inline in the reply and the next dispatch, no tube at all.
    transfer = platform.services["transfer"]
    texts = ["a cat sits on the mat"]
    resp = await c.post("/v1/workflows/embed-score/infer", json=text_request(texts))
    result = await resp.json()
    assert resp.status == 200, result
    (out,) = result["outputs"]
    assert out["name"] == "scores"
    assert out["shape"] == [1]
    np.testing.assert_allclose(out["data"], await expected_scores(c, texts), rtol=1e-4)
    embed, score = result["parameters"]["steps"]
    assert embed["step"] == "embed"
    assert embed["output_tiers"] == ["inline"]
    assert embed["node"] == score["node"] == "node-t"
    assert served(transfer, "adopt") == served(transfer, "ensure") == 0
    assert await platform.services["scheduler"].kv.tubes.keys() == []

    # 64 embeddings (96 KB, over the inline threshold): a tube on the GPU tier, read there.
    texts = [f"sentence number {i} about a cat" for i in range(64)]
    resp = await c.post("/v1/workflows/embed-score/infer", json=text_request(texts))
    result = await resp.json()
    assert resp.status == 200, result
    np.testing.assert_allclose(
        result["outputs"][0]["data"], await expected_scores(c, texts), rtol=1e-4
    )
    embed, score = result["parameters"]["steps"]
    assert embed["output_tiers"] == ["gpu:0"]  # the intermediate: a tube on the GPU tier
    assert embed["node"] == score["node"] == "node-t"
    # Deployed second, the scorer went to the idle GPU (placement is per GPU): the tube
    # went from the producer's GPU to it over their NVLink, never through the host.
    assert (embed["device"], score["device"]) == ("gpu:0", "gpu:1")
    assert served(transfer, "adopt") == 1
    (moved,) = [e["data"] for e in await read_events(platform, "transfer.completed")]
    assert moved["tier"] == "gpu:1"
    assert moved["path"].endswith("over 1 route: gpu:0>gpu:1 100%"), moved

    assert (await c.delete("/v1/workflows/embed-score")).status == 200
    assert (await c.get("/v1/workflows/embed-score")).status == 404


async def test_bad_workflows_are_refused_at_deploy_naming_the_field(
    platform: Platform, scorer_dir: Path
) -> None:
    c = platform.client
    assert (await c.post("/v1/functions", json=DEMO_BODY)).status == 201
    assert (await c.post("/v1/functions", json=scorer_body(scorer_dir))).status == 201

    async def refused(body: dict[str, Any], status: int, field: str, words: str) -> None:
        resp = await c.post("/v1/workflows", json=body)
        err = await resp.json()
        assert resp.status == status, err
        assert err["field"] == field
        assert words in err["error"]

    cycle = {
        "name": "loop",
        "steps": [
            {"name": "a", "function": "scorer", "inputs": {"x": "b.scores"}},
            {"name": "b", "function": "scorer", "inputs": {"x": "a.scores"}},
        ],
    }
    await refused(cycle, 400, "steps", "cycle")
    unknown = {
        "name": "w",
        "steps": [
            {"name": "embed", "function": "minilm", "inputs": {"text": "$input.text"}},
            {"name": "rank", "function": "reranker", "inputs": {"x": "embed.embedding"}},
        ],
    }
    await refused(unknown, 404, "steps[1].function", "'reranker', which is not deployed")
    mismatched = {
        "name": "w",
        "steps": [
            {"name": "embed", "function": "minilm", "inputs": {"text": "$input.text"}},
            {"name": "again", "function": "minilm", "inputs": {"text": "embed.embedding"}},
        ],
    }
    await refused(mismatched, 400, "steps[1].inputs.text", "BYTES")
    await refused({**WORKFLOW, "slo_ms": 0.001}, 400, "slo_ms", "no configuration meets")
    await refused({**WORKFLOW, "retries": 3}, 400, "retries", "")
    assert (await c.get("/v1/workflows")).status == 200
    assert (await (await c.get("/v1/workflows")).json())["workflows"] == []  # nothing written


@pytest.fixture
async def two_nodes(platform_factory: PlatformFactory) -> Platform:
    """node-a and node-b; the scheduler and the gateway run with node-b's config. An
    intermediate over 1 KB is a tube (one embedding is 1.5 KB); the gateway reads only
    node-b's tubes, so an expected embedding is not asked of minilm (it may be on node-a)."""
    return await platform_factory(["node-a", "node-b"], control="node-b", inline_threshold=1024)


async def scores_of(c: TestClient[Any, Any], texts: list[str]) -> tuple[list[float], Any, Any]:
    """The embed-score workflow's scores of ``texts``, with its embed and score steps."""
    resp = await c.post("/v1/workflows/embed-score/infer", json=text_request(texts))
    result = await resp.json()
    assert resp.status == 200, result
    embed, score = result["parameters"]["steps"]
    return result["outputs"][0]["data"], embed, score


async def test_an_intermediate_lost_with_its_node_is_recomputed(
    two_nodes: Platform, scorer_dir: Path
) -> None:
    c, p = two_nodes.client, two_nodes
    assert (await c.post("/v1/functions", json=DEMO_BODY)).status == 201
    assert (await c.post("/v1/functions", json=scorer_body(scorer_dir))).status == 201
    nodes = {
        n: (await (await c.get(f"/v1/functions/{n}")).json())["nodes"] for n in ("minilm", "scorer")
    }
    assert nodes == {"minilm": ["node-a"], "scorer": ["node-b"]}  # least loaded, then the other
    assert (await c.post("/v1/workflows", json=WORKFLOW)).status == 201
    texts = ["a dog runs in the park"]
    want, embed, _ = await scores_of(c, texts)  # both nodes up
    assert embed["output_tiers"] == ["gpu:0"]

    sched = p.services["scheduler"]
    assert isinstance(sched, SchedulerService)

    async def kill_node_a(step: str) -> None:
        if step == "embed" and sched.step_done is not None:
            sched.step_done = None  # once
            for name, svc in p.services.items():
                if name.endswith("@node-a"):
                    await svc.stop()

    sched.step_done = kill_node_a
    got, embed, score = await scores_of(c, texts)
    np.testing.assert_allclose(got, want, rtol=1e-4)
    assert embed["runs"] == 2  # recomputed from its step, on the node that is left
    assert embed["node"] == score["node"] == "node-b"
    assert score["runs"] == 1


async def test_a_workflow_whose_replica_dies_is_answered_by_another_without_rerunning_steps(
    platform_factory: PlatformFactory, scorer_dir: Path
) -> None:
    """The replica running a workflow dies (before its first tick: it made itself known on
    start) while the first step computes; a new replica runs the workflow again under the
    same dispatch id: the step already sent is answered from the worker's memory."""
    p = await platform_factory(autoscale_interval_s=3600.0)
    survivor: SchedulerService | None = None
    try:
        c, first = p.client, p.services["scheduler"]
        worker = p.services["worker"]
        assert isinstance(first, SchedulerService)
        assert isinstance(worker, WorkerService)
        assert (await c.post("/v1/functions", json=DEMO_BODY)).status == 201
        assert (await c.post("/v1/functions", json=scorer_body(scorer_dir))).status == 201
        assert (await c.post("/v1/workflows", json=WORKFLOW)).status == 201
        texts = ["a longer sentence for the encoder to chew on " * 8] * 64
        call = asyncio.create_task(
            c.post("/v1/workflows/embed-score/infer", json=text_request(texts))
        )
        await eventually(lambda: worker._answering, 20, "the worker to run the first step")
        await first.nc.close()  # dies: no reply, no clean-up
        for task in [*first._background, *first._inflight]:
            task.cancel()
        survivor = SchedulerService(p.config.replace(autoscale_interval_s=0.2))
        await survivor.start()
        done, _ = await asyncio.wait([call], timeout=60)
        assert done, f"adopted={survivor.failover.adopted} answering={list(worker._answering)}"
        resp = call.result()
        result = await resp.json()
        assert resp.status == 200, result
        assert result["outputs"][0]["shape"] == [64]
        assert worker.repeats >= 1  # the embed step: sent twice, run once
        np.testing.assert_allclose(
            result["outputs"][0]["data"], await expected_scores(c, texts), rtol=1e-4
        )
    finally:
        if survivor is not None:
            p.services["scheduler"] = survivor  # stopped with the platform


async def test_a_consumer_is_brought_to_its_producers_node_once_copies_cost_a_cold_start(
    two_nodes: Platform, scorer_dir: Path
) -> None:
    c, p = two_nodes.client, two_nodes
    assert (await c.post("/v1/functions", json=DEMO_BODY)).status == 201
    assert (await c.post("/v1/functions", json=scorer_body(scorer_dir))).status == 201
    assert (await (await c.get("/v1/functions/scorer")).json())["nodes"] == ["node-b"]
    assert (await c.post("/v1/workflows", json=WORKFLOW)).status == 201
    sched = p.services["scheduler"]
    assert isinstance(sched, SchedulerService)
    texts = ["a bird sings at dawn"]

    # A copy of 1.5 KB costs far less than a cold start: the scorer stays where it is.
    want, embed, score = await scores_of(c, texts)
    assert (embed["node"], score["node"]) == ("node-a", "node-b")
    locality = sched.workflows.locality
    paid = locality.paid[("default.scorer", "node-a")]
    assert 0 < paid < locality.cold_s.get("default.scorer", 1.0)
    # Once the copies paid reach a cold start, the scorer is scaled out to the producer's
    # node and the step reads its input where it is.
    locality.cold_s["default.scorer"] = paid
    got, embed, score = await scores_of(c, texts)
    np.testing.assert_allclose(got, want, rtol=1e-4)
    assert embed["node"] == score["node"] == "node-a"
    assert (await (await c.get("/v1/functions/scorer")).json())["nodes"] == ["node-b", "node-a"]
    (scaled,) = await read_events(p, "function.scaled")
    assert scaled["data"]["nodes"] == ["node-b", "node-a"]
    assert "workflow inputs on node-a" in scaled["data"]["reason"]
    assert ("default.scorer", "node-a") not in locality.paid
