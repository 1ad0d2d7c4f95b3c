"""Every GPU of a node computes: one worker process drives a lane per GPU its instances
are placed on (sim:8, the DGX-1 topology). Loads and runs name the GPU; the tensor store
holds each model on its instance's GPU; a bad GPU is a typed error; a load to another
GPU moves the instance; an intermediate on one GPU is read by an instance on its NVLink
neighbour over that link, never through the host."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gpufaas.shared import subjects
from gpufaas.shared.config import Config
from gpufaas.shared.errors import InvalidArgument
from gpufaas.shared.identity import FunctionRef
from gpufaas.shared.messages import (
    DeviceTierStats,
    FunctionSpec,
    InvokeReply,
    LinksReply,
    LinksRequest,
    Msg,
    StoreStats,
    StoreStatsRequest,
    TensorPayload,
    WorkerLoadReply,
    WorkerLoadRequest,
    WorkerRunRequest,
    WorkerUnloadRequest,
)
from gpufaas.shared.rpc import request
from gpufaas.shared.tensors import encode_bytes_elements
from gpufaas.worker.service import WorkerService
from tests.conftest import NatsServer
from tests.integration.conftest import DEMO_BODY, Platform, make_config
from tests.integration.scorer import DIM, export_scorer, query, scorer_body

pytestmark = pytest.mark.integration

QUERY = query()


@pytest.fixture(scope="module")
def scorer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_scorer(tmp_path_factory.mktemp("scorer"))


@pytest.fixture
def platform_config(nats_server: NatsServer, tmp_path: Path) -> Config:
    return make_config(nats_server, tmp_path, devices="sim:8")  # dgx1-v100 by default


async def deploy(p: Platform, scorer_dir: Path) -> tuple[FunctionSpec, FunctionSpec]:
    """minilm and the scorer, deployed (placed wherever the scheduler likes)."""
    scorer = scorer_body(scorer_dir)
    for body in (DEMO_BODY, scorer):
        resp = await p.client.post("/v1/functions", json=body)
        assert resp.status == 201, await resp.text()
    kv = p.services["scheduler"].kv.functions
    specs = []
    for name in ("minilm", "scorer"):
        record = await kv.value(FunctionRef("default", name).key)
        assert record is not None
        specs.append(record.spec)
    return specs[0], specs[1]


async def ask(p: Platform, verb: str, msg: Msg, reply: type[Any]) -> Any:
    subject = subjects.worker(p.config.node_id, "default", verb)
    return await request(p.services["scheduler"].nc, subject, msg, reply, timeout=60)


async def load(p: Platform, spec: FunctionSpec, device: str | None) -> WorkerLoadReply:
    reply: WorkerLoadReply = await ask(
        p, subjects.WORKER_LOAD, WorkerLoadRequest(spec=spec, device=device), WorkerLoadReply
    )
    return reply


def texts(n: int, first: int = 0) -> TensorPayload:
    items = [f"sentence {i} about a cat on a mat".encode() for i in range(first, first + n)]
    return TensorPayload(
        name="text", datatype="BYTES", shape=[n], data=encode_bytes_elements(items)
    )


async def run(
    p: Platform,
    spec: FunctionSpec,
    inputs: list[TensorPayload],
    device: str | None = None,
    *,
    intermediate: bool = False,
) -> InvokeReply:
    req = WorkerRunRequest(
        spec=spec, request_id="r", inputs=inputs, device=device, intermediate=intermediate
    )
    reply: InvokeReply = await ask(p, subjects.WORKER_RUN, req, InvokeReply)
    return reply


async def tiers(p: Platform) -> dict[str, DeviceTierStats]:
    subject = subjects.node(p.config.node_id, "tensorstore", subjects.TENSORSTORE_STATS)
    nc = p.services["scheduler"].nc
    stats = await request(nc, subject, StoreStatsRequest(), StoreStats, timeout=10)
    return {d.device: d for d in stats.devices}


async def link_bytes(p: Platform) -> dict[tuple[str, str], int]:
    """Bytes each link has carried, per direction."""
    subject = subjects.node(p.config.node_id, "transfer", subjects.TRANSFER_LINKS)
    nc = p.services["scheduler"].nc
    reply = await request(nc, subject, LinksRequest(), LinksReply, timeout=10)
    out: dict[tuple[str, str], int] = {}
    for ln in reply.links:
        out[ln.a, ln.b] = ln.bytes_a_to_b
        out[ln.b, ln.a] = ln.bytes_b_to_a
    return out


def worker_of(p: Platform) -> WorkerService:
    worker = p.services["worker"]
    assert isinstance(worker, WorkerService)
    return worker


async def test_functions_run_on_the_gpus_they_are_loaded_on(
    platform: Platform, scorer_dir: Path
) -> None:
    minilm, scorer = await deploy(platform, scorer_dir)
    assert (await load(platform, minilm, "gpu:2")).device == "gpu:2"
    assert (await load(platform, scorer, "gpu:5")).device == "gpu:5"
    emb = await run(platform, minilm, [texts(2)], "gpu:2")
    assert emb.device == "gpu:2"
    (x,) = emb.outputs
    assert x.data is not None
    scored = TensorPayload(name="x", datatype=x.datatype, shape=x.shape, data=x.data)
    scores = await run(platform, scorer, [scored], "gpu:5")
    assert scores.device == "gpu:5"
    got = scores.outputs[0].data
    assert got is not None
    want = np.frombuffer(x.data, np.float32).reshape(2, DIM) @ QUERY
    np.testing.assert_allclose(np.frombuffer(got, np.float32), want, rtol=1e-4, atol=1e-5)
    # Each GPU's device tier holds its model, leased by its instance; a lane for each.
    by_gpu = await tiers(platform)
    assert by_gpu["gpu:2"].leases == by_gpu["gpu:5"].leases == 1
    assert by_gpu["gpu:2"].bytes_stored > 80 * 2**20  # MiniLM
    assert 0 < by_gpu["gpu:5"].bytes_stored < 2**20  # the scorer's one vector
    worker = worker_of(platform)
    assert {"gpu:2", "gpu:5"} <= set(worker.lanes.by_device)

    # A GPU the node does not have: a typed error naming the field; the worker goes on.
    with pytest.raises(InvalidArgument, match="gpu:9") as err:
        await load(platform, minilm, "gpu:9")
    assert err.value.field == "device"
    with pytest.raises(InvalidArgument, match="gpu:9") as err:
        await run(platform, minilm, [texts(1)], "gpu:9")
    assert err.value.field == "device"
    assert "gpu:9" not in worker.lanes.by_device
    assert (await run(platform, minilm, [texts(1)], "gpu:2")).device == "gpu:2"

    # A run names the GPU only for a cold start: the instance runs where it lives.
    assert (await run(platform, minilm, [texts(1)], "gpu:7")).device == "gpu:2"
    await worker.unload(WorkerUnloadRequest(function="minilm", tenant="default"))
    assert (await run(platform, minilm, [texts(1)], "gpu:6")).device == "gpu:6"


async def test_a_load_asking_another_gpu_moves_the_instance(
    platform: Platform, scorer_dir: Path
) -> None:
    minilm, _ = await deploy(platform, scorer_dir)
    await load(platform, minilm, "gpu:2")
    moved = await load(platform, minilm, "gpu:5")
    assert (moved.device, moved.cached) == ("gpu:5", False)
    worker = worker_of(platform)
    assert worker.instances[FunctionRef("default", "minilm")].device == "gpu:5"
    by_gpu = await tiers(platform)
    assert by_gpu["gpu:5"].leases == 1
    assert by_gpu["gpu:2"].leases == 0  # its lease there was given back
    assert (await run(platform, minilm, [texts(1)], "gpu:5")).device == "gpu:5"
    again = await load(platform, minilm, "gpu:5")
    assert (again.device, again.cached) == ("gpu:5", True)
    kept = await load(platform, minilm, None)  # no GPU named: where it is
    assert (kept.device, kept.cached) == ("gpu:5", True)


async def test_an_intermediate_on_one_gpu_moves_to_its_nvlink_neighbour(
    platform: Platform, scorer_dir: Path
) -> None:
    minilm, scorer = await deploy(platform, scorer_dir)
    await load(platform, minilm, "gpu:3")
    await load(platform, scorer, "gpu:1")  # gpu:1 and gpu:3 share an NVLink in a DGX-1
    emb = await run(platform, minilm, [texts(64)], "gpu:3", intermediate=True)
    (x,) = emb.outputs  # 96 KB, over the inline threshold: a tube kept on gpu:3
    assert x.tube is not None
    assert [pl.tier for pl in x.tube.placements] == ["gpu:3"]
    before = await link_bytes(platform)
    read = TensorPayload(name="x", datatype=x.datatype, shape=x.shape, tube=x.tube)
    scores = await run(platform, scorer, [read], "gpu:1")
    assert scores.device == "gpu:1"
    after = await link_bytes(platform)
    moved = {k: after[k] - before[k] for k in after if after[k] != before[k]}
    assert moved.get(("gpu:3", "gpu:1"), 0) > 0, moved  # over their link ...
    assert not [k for k in moved if "host" in k], moved  # ... never through the host
    assert sum(n for (a, _), n in moved.items() if a == "gpu:3") == x.tube.nbytes
    # The scorer read the very bytes minilm wrote (the same texts, embedded inline).
    halves = [(await run(platform, minilm, [texts(32, i)])).outputs[0].data for i in (0, 32)]
    want = np.frombuffer(b"".join(h or b"" for h in halves), np.float32).reshape(64, DIM) @ QUERY
    got = scores.outputs[0].data
    assert got is not None
    np.testing.assert_allclose(np.frombuffer(got, np.float32), want, rtol=1e-4, atol=1e-5)
