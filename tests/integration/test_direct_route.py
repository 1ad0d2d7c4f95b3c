"""A warm function's direct route: after a scheduler grants it, the gateway sends the
function's requests straight to its worker, and falls back to a scheduler whenever the
route cannot serve (over a real NATS, the real demo model)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import safetensors.torch

from gpufaas.gateway import direct
from gpufaas.scheduler.service import SchedulerService
from gpufaas.shared import subjects
from gpufaas.shared.catalog import resolve_model_dir
from gpufaas.shared.errors import Unavailable
from gpufaas.shared.identity import FunctionRef
from gpufaas.shared.messages import (
    FunctionSpec,
    InvokeReply,
    ModelSource,
    TensorPayload,
    WorkerRunRequest,
    WorkerUnloadRequest,
)
from gpufaas.shared.rpc import request
from gpufaas.shared.tensors import encode_bytes_elements
from gpufaas.worker.models.bert import BertConfig, BertEmbedder, load_tokenizer
from gpufaas.worker.service import WorkerService
from tests.integration.conftest import DEMO_BODY, Platform, PlatformFactory, bearer, text_request

pytestmark = pytest.mark.integration

TEXTS = ["The cat sits on the mat.", "Stock markets fell today."]
KEY = FunctionRef("default", "minilm").key  # the routes' key of the demo function


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    d = resolve_model_dir(ModelSource(builtin="all-minilm-l6-v2"))
    cfg = BertConfig.from_model_dir(d)
    weights = safetensors.torch.load_file(d / "model.safetensors")
    return BertEmbedder(weights, cfg, load_tokenizer(d, cfg.max_seq_length)).embed(TEXTS).numpy()


def routes_of(p: Platform) -> direct.DirectRoutes:
    routes: direct.DirectRoutes = p.client.app[direct.ROUTES]
    return routes


async def infer(p: Platform, reference: np.ndarray) -> dict[str, Any]:
    resp = await p.client.post("/v2/models/minilm/infer", json=text_request(TEXTS))
    assert resp.status == 200, await resp.text()
    body: dict[str, Any] = await resp.json()
    got = np.asarray(body["outputs"][0]["data"], dtype=np.float32).reshape(len(TEXTS), -1)
    assert np.abs(got - reference).max() <= 1e-5
    return body


async def deployed(platform_factory: PlatformFactory, **settings: Any) -> Platform:
    p = await platform_factory(**settings)
    resp = await p.client.post("/v1/functions", json=DEMO_BODY)
    assert resp.status == 201, await resp.text()
    return p


async def test_a_warm_function_runs_direct_after_a_scheduler_grants_the_route(
    platform_factory: PlatformFactory, reference: np.ndarray
) -> None:
    p = await deployed(platform_factory, direct_route_ttl_s=30.0)
    routes = routes_of(p)
    await infer(p, reference)  # through the scheduler: it grants the route
    grant = routes.grants[KEY]
    assert grant.route.node == "node-t"
    assert grant.route.slots >= 1
    assert routes.sent == 0

    scheduler = p.services["scheduler"]
    assert isinstance(scheduler, SchedulerService)
    before = scheduler.dispatcher.queue(FunctionRef("default", "minilm")).arrivals
    for _ in range(3):
        body = await infer(p, reference)
        assert body["parameters"]["breakdown_us"]["queue"] == 0  # no scheduler queue
    assert routes.sent == 3
    assert routes.fell_back == 0
    exposition = await (await p.client.get("/metrics")).text()
    assert 'gpufaas_direct_route_requests_total{outcome="answered"} 3.0' in exposition
    assert grant.inflight == 0
    assert scheduler.dispatcher.queue(FunctionRef("default", "minilm")).arrivals == before

    # Once the grant lapses, the next request goes through a scheduler again, which counts
    # the three direct ones as arrivals (what the autoscaler sees) and renews the route.
    grant.until = 0.0
    await infer(p, reference)
    assert routes.sent == 3
    assert scheduler.dispatcher.queue(FunctionRef("default", "minilm")).arrivals >= before + 4
    assert routes.served.get(KEY, 0) == 0
    assert routes.grants[KEY].until > 0


async def test_a_route_to_a_function_no_longer_warm_there_falls_back_to_a_scheduler(
    platform_factory: PlatformFactory, reference: np.ndarray
) -> None:
    p = await deployed(platform_factory, direct_route_ttl_s=30.0)
    routes = routes_of(p)
    await infer(p, reference)
    assert KEY in routes.grants
    worker = p.services["worker"]
    assert isinstance(worker, WorkerService)
    await worker.unload(WorkerUnloadRequest(function="minilm", tenant="default"))

    await infer(p, reference)  # the worker refuses the direct send: a scheduler runs it
    assert routes.fell_back == 1
    assert routes.sent == 0


async def test_a_worker_refuses_a_direct_request_it_has_no_warm_instance_for(
    platform: Platform,
) -> None:
    worker = platform.services["worker"]
    assert isinstance(worker, WorkerService)
    spec = FunctionSpec(
        tenant="default", name="minilm", model=ModelSource(builtin="all-minilm-l6-v2")
    )
    run = WorkerRunRequest(
        spec=spec,
        request_id="r1",
        inputs=[
            TensorPayload(
                name="text", datatype="BYTES", shape=[1], data=encode_bytes_elements([b"hi"])
            )
        ],
        dispatch_id="direct-1",
        direct=True,
    )
    with pytest.raises(Unavailable, match="no warm instance"):
        await request(
            worker.nc,
            subjects.worker("node-t", "default", subjects.WORKER_RUN),
            run,
            InvokeReply,
            timeout=10,
        )
    assert not worker.instances  # nothing was cold-started for it


async def test_a_zero_ttl_sends_every_request_through_a_scheduler(
    platform_factory: PlatformFactory, reference: np.ndarray
) -> None:
    p = await deployed(platform_factory, direct_route_ttl_s=0.0)
    for _ in range(2):
        await infer(p, reference)
    routes = routes_of(p)
    assert not routes.grants
    assert routes.sent == 0


async def test_a_route_serves_only_its_tenant_and_never_a_caller_without_a_key(
    platform_factory: PlatformFactory, reference: np.ndarray
) -> None:
    """Routes are the gateway's, per function of a tenant: another tenant naming the same
    function finds none of its own (404), a caller without a key is refused (401), and
    neither reaches the worker through the route."""
    p = await deployed(platform_factory, direct_route_ttl_s=30.0)
    routes = routes_of(p)
    await infer(p, reference)
    assert KEY in routes.grants
    other = await p.key_for("other")
    body = text_request(TEXTS)
    resp = await p.client.post("/v2/models/minilm/infer", json=body, headers=bearer(other))
    assert resp.status == 404, await resp.text()
    resp = await p.client.post("/v2/models/minilm/infer", json=body, headers={"Authorization": ""})
    assert resp.status == 401, await resp.text()
    assert routes.sent == 0
    assert routes.grants[KEY].inflight == 0
