"""Deploy and invoke the real demo model through the gateway, over a real NATS."""

from __future__ import annotations

import ctypes
import json
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch

from gpufaas.scheduler.service import SchedulerService
from gpufaas.shared import subjects
from gpufaas.shared.catalog import resolve_model_dir
from gpufaas.shared.config import Config
from gpufaas.shared.identity import FunctionRef
from gpufaas.shared.messages import ModelSource
from gpufaas.tensorstore.service import TensorStoreService
from gpufaas.worker.models.bert import BertConfig, BertEmbedder, load_tokenizer
from gpufaas.worker.runners import BertEmbeddingRunner
from gpufaas.worker.service import WorkerService
from tests.conftest import NatsServer
from tests.integration.conftest import DEMO_BODY, Platform, make_config, text_request

pytestmark = pytest.mark.integration

TEXTS = ["The cat sits on the mat.", "A feline rests on a rug.", "Stock markets fell today."]


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    d = resolve_model_dir(ModelSource(builtin="all-minilm-l6-v2"))
    cfg = BertConfig.from_model_dir(d)
    emb = BertEmbedder(
        safetensors.torch.load_file(d / "model.safetensors"),
        cfg,
        load_tokenizer(d, cfg.max_seq_length),
    )
    return emb.embed(TEXTS).numpy()


async def test_deploy_invoke_matches_reference(platform: Platform, reference: np.ndarray) -> None:
    c = platform.client
    resp = await c.post("/v1/functions", json=DEMO_BODY)
    assert resp.status == 201, await resp.text()
    record = await resp.json()
    assert record["nodes"] == ["node-t"]
    assert record["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, 384]}]

    resp = await c.post("/v2/models/minilm/infer", json={**text_request(TEXTS), "id": "r1"})
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["id"] == "r1"
    (out,) = body["outputs"]
    assert out["shape"] == [3, 384]
    got = np.asarray(out["data"], dtype=np.float32).reshape(3, 384)
    assert np.abs(got - reference).max() <= 1e-5
    assert resp.headers["X-Request-ID"]
    assert resp.headers["Gpufaas-Node"] == "node-t"
    assert resp.headers["Gpufaas-Device"] == "gpu:0"  # sim:2: placed on the first simulated GPU
    assert int(resp.headers["Gpufaas-Compute-Us"]) > 0

    meta = await (await c.get("/v2/models/minilm")).json()
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert (await c.get("/v2/models/minilm/ready")).status == 200

    # Deploying the same spec again is idempotent; the weights are not stored twice.
    again = await c.post("/v1/functions", json=DEMO_BODY)
    assert again.status == 200


async def test_request_id_travels_and_events_are_published(platform: Platform) -> None:
    c = platform.client
    assert (await c.post("/v1/functions", json=DEMO_BODY)).status == 201
    resp = await c.post(
        "/v2/models/minilm/infer", json=text_request(["hi"]), headers={"X-Request-ID": "abc-123"}
    )
    assert resp.status == 200
    assert resp.headers["X-Request-ID"] == "abc-123"
    assert (await c.delete("/v1/functions/minilm")).status == 200

    js = platform.services["scheduler"].js
    sub = await js.subscribe(subjects.EVENTS_ALL, ordered_consumer=True)
    kinds: dict[str, dict[str, object]] = {}
    while "function.deleted" not in kinds:
        msg = await sub.next_msg(timeout=5)
        ev = json.loads(msg.data)
        kinds.setdefault(ev["kind"], ev)
    await sub.unsubscribe()
    assert {"node.joined", "function.deployed", "invocation.completed", "function.deleted"} <= set(
        kinds
    )
    done = kinds["invocation.completed"]
    assert done["request_id"] == "abc-123"
    breakdown = done["data"]["breakdown"]  # type: ignore[index]
    assert set(breakdown) >= {"queue_us", "transfer_us", "load_us", "compute_us"}


@pytest.fixture
def platform_config(nats_server: NatsServer, tmp_path: Path) -> Config:
    # A tiny inline threshold sends every input and output through host tubes.
    return make_config(nats_server, tmp_path, inline_threshold=16)


async def test_large_tensors_travel_as_tubes_and_are_cleaned_up(
    platform: Platform, reference: np.ndarray
) -> None:
    c = platform.client
    assert (await c.post("/v1/functions", json=DEMO_BODY)).status == 201
    resp = await c.post("/v2/models/minilm/infer", json=text_request(TEXTS))
    assert resp.status == 200, await resp.text()
    got = np.asarray((await resp.json())["outputs"][0]["data"], dtype=np.float32).reshape(3, 384)
    assert np.abs(got - reference).max() <= 1e-5
    tube_dir = platform.config.shm_dir / "tubes"
    assert tube_dir.is_dir()  # tubes were used ...
    assert list(tube_dir.iterdir()) == []  # ... and none is left behind
    tubes_kv = platform.services["transfer"].buckets.tubes
    from nats.js.errors import NoKeysError  # noqa: PLC0415

    with pytest.raises(NoKeysError):
        await tubes_kv.keys()


async def test_state_survives_control_plane_restart(platform: Platform) -> None:
    assert (await platform.client.post("/v1/functions", json=DEMO_BODY)).status == 201
    await platform.restart_control_plane()
    c = platform.client
    listed = await (await c.get("/v1/functions")).json()
    assert [f["spec"]["name"] for f in listed["functions"]] == ["minilm"]
    resp = await c.post("/v2/models/minilm/infer", json=text_request(["still here"]))
    assert resp.status == 200


async def test_worker_restart_cold_starts_from_resident_tensors(platform: Platform) -> None:
    assert (await platform.client.post("/v1/functions", json=DEMO_BODY)).status == 201
    await platform.services["worker"].stop()
    platform.services["worker"] = WorkerService(platform.config)
    await platform.services["worker"].start()
    resp = await platform.client.post("/v2/models/minilm/infer", json=text_request(["back"]))
    assert resp.status == 200, await resp.text()
    assert resp.headers["Gpufaas-Cold"] == "1"
    assert int(resp.headers["Gpufaas-Load-Us"]) > 0
    store = platform.services["tensorstore"]
    assert isinstance(store, TensorStoreService)
    assert store.store.bytes_requested == 2 * store.store.bytes_stored  # second load stored nothing
    assert store.store.files_read == 1  # ... and did not even open the model file


async def test_nodes_and_openapi(platform: Platform) -> None:
    c = platform.client
    nodes = (await (await c.get("/v1/nodes")).json())["nodes"]
    (node,) = nodes
    assert node["node"] == "node-t"
    assert set(node["services"]) == {"tensorstore", "transfer", "memory", "worker"}
    assert [d["name"] for d in node["devices"]] == ["host", "gpu:0", "gpu:1"]
    assert node["devices"][1]["kind"] == "sim"

    spec = await (await c.get("/openapi.json")).json()
    documented = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}
    registered = {
        (r.method, r.resource.canonical)
        for r in c.app.router.routes()
        if r.method != "HEAD" and r.resource is not None
    }
    assert documented == registered


async def test_node_services_answer_their_subjects(platform: Platform) -> None:
    from gpufaas.shared.messages import (  # noqa: PLC0415
        CapacityReply,
        CapacityRequest,
        Ping,
        Pong,
        StoreStats,
        StoreStatsRequest,
    )
    from gpufaas.shared.rpc import request  # noqa: PLC0415

    assert (await platform.client.post("/v1/functions", json=DEMO_BODY)).status == 201
    nc = platform.services["scheduler"].nc
    node = platform.config.node_id
    cap = await request(
        nc,
        subjects.node(node, "memory", subjects.MEMORY_CAPACITY),
        CapacityRequest(),
        CapacityReply,
        timeout=5,
    )
    assert [d.name for d in cap.devices] == ["host", "gpu:0", "gpu:1"]
    assert cap.devices[1].memory_bytes == 32 * 2**30  # dgx1-v100 topology: V100 32 GB
    stats = await request(
        nc,
        subjects.node(node, "tensorstore", subjects.TENSORSTORE_STATS),
        StoreStatsRequest(),
        StoreStats,
        timeout=5,
    )
    assert stats.tensors > 0
    assert stats.bytes_stored == stats.bytes_requested
    for svc in ("tensorstore", "transfer", "memory", "worker"):
        pong = await request(nc, subjects.node(node, svc, subjects.PING), Ping(), Pong, timeout=5)
        assert pong.service == svc


def _segment_ranges(worker: WorkerService) -> list[tuple[int, int]]:
    ranges = []
    for mm in worker.tensors.host._maps.values():
        base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
        ranges.append((base, base + len(mm)))
    return ranges


async def test_instances_share_the_same_pages(platform: Platform) -> None:
    c = platform.client
    assert (await c.post("/v1/functions", json=DEMO_BODY)).status == 201
    assert (await c.post("/v1/functions", json={**DEMO_BODY, "name": "minilm-b"})).status == 201
    worker = platform.services["worker"]
    store = platform.services["tensorstore"]
    assert isinstance(worker, WorkerService)
    assert isinstance(store, TensorStoreService)
    # The second deploy of the same weights stored nothing new.
    assert store.store.bytes_requested == 2 * store.store.bytes_stored
    ptrs = []
    for name in ("minilm", "minilm-b"):
        runner = worker.instances[FunctionRef("default", name)].runner
        assert isinstance(runner, BertEmbeddingRunner)
        ptrs.append(runner.model.weight_data_ptrs())
    assert ptrs[0] == ptrs[1]  # both instances use the very same weight memory ...
    nodes = (await (await c.get("/v1/nodes")).json())["nodes"]
    host = nodes[0]["tensor_store"]["host"]
    assert host["leases"] == 2
    assert host["bytes_without_sharing"] == 2 * host["bytes_stored"] == 2 * host["bytes_referenced"]
    ranges = _segment_ranges(worker)
    for ptr in ptrs[0].values():  # ... which lies inside the tensor store's shared segments
        assert any(lo <= ptr < hi for lo, hi in ranges)


async def test_node_left_when_a_worker_dies_without_leaving(platform: Platform) -> None:
    sched = platform.services["scheduler"]
    worker = platform.services["worker"]
    assert isinstance(sched, SchedulerService)
    await worker.nc.close()  # a crash: no goodbye, its heartbeat just stops
    await sched.reconcile_once(time.time() + platform.config.node_ttl_s + 1)
    assert "node-t" not in sched.workers
    sub = await sched.js.subscribe(subjects.event("node.left"), ordered_consumer=True)
    ev = json.loads((await sub.next_msg(timeout=5)).data)
    await sub.unsubscribe()
    assert ev["data"] == {"node": "node-t", "reason": "heartbeat expired"}
