"""The node's worker pool with real worker processes: a process per tenant, from warm spares."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from gpufaas.gateway.app import create_app
from gpufaas.memory.service import MemoryService
from gpufaas.scheduler.service import SchedulerService
from gpufaas.shared import subjects
from gpufaas.shared.config import Config
from gpufaas.shared.errors import NotFound
from gpufaas.shared.messages import (
    FunctionSpec,
    InvokeReply,
    ModelSource,
    WorkerBindReply,
    WorkerBindRequest,
    WorkerRunRequest,
)
from gpufaas.shared.rpc import request
from gpufaas.shared.service import Service
from gpufaas.tensorstore.service import TensorStoreService
from gpufaas.transfer.service import TransferService
from gpufaas.worker.pool import WorkerPoolService
from tests.conftest import NatsServer
from tests.integration.conftest import DEMO_BODY, Platform, make_config, text_request

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def ready_spares(pool: WorkerPoolService, n: int, timeout_s: float = 90) -> None:
    """Until ``n`` spares are serving (their processes import torch: seconds)."""
    for _ in range(int(timeout_s * 10)):
        if sum(1 for p in pool.spares if p.ready.is_set()) >= n:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"fewer than {n} spares ready after {timeout_s:g} s")


@pytest.fixture
def pool_config(nats_server: NatsServer, tmp_path: Path) -> Config:
    return make_config(nats_server, tmp_path, devices="cpu", worker_role="pool",
                       worker_spares=1, heartbeat_s=0.2, worker_idle_s=0.5,
                       autoscale_interval_s=3600.0, instance_keep_alive_s=10.0)  # fmt: skip


@pytest.fixture
async def pooled(pool_config: Config, nats_server: NatsServer) -> AsyncIterator[Platform]:
    config = pool_config
    services: dict[str, Service] = {}
    for cls in (MemoryService, TensorStoreService, TransferService, WorkerPoolService,
                SchedulerService):  # fmt: skip
        svc = cls(config)
        await svc.start()
        services[svc.name] = svc
    client = TestClient(TestServer(create_app(config)))
    await client.start_server()
    p = Platform(config, nats_server, client, services)
    yield p
    await p.stop()


def pool_of(p: Platform) -> WorkerPoolService:
    pool = p.services["worker"]
    assert isinstance(pool, WorkerPoolService)
    return pool


async def test_each_tenant_gets_its_own_process_from_the_warm_spares(pooled: Platform) -> None:
    c, pool = pooled.client, pool_of(pooled)
    await ready_spares(pool, 1)
    assert pool.started == 1
    assert not pool.bound
    a = {"X-Gpufaas-Tenant": "a"}
    b = {"X-Gpufaas-Tenant": "b"}
    assert (await c.post("/v1/functions", json=DEMO_BODY, headers=a)).status == 201
    assert list(pool.bound) == ["a"]  # the spare, bound to a
    await ready_spares(pool, 1)  # refilled in the background
    assert (await c.post("/v1/functions", json=DEMO_BODY, headers=b)).status == 201
    second = {**DEMO_BODY, "name": "minilm-2"}
    assert (await c.post("/v1/functions", json=second, headers=a)).status == 201
    assert sorted(pool.bound) == ["a", "b"]
    assert pool.bound["a"].popen.pid != pool.bound["b"].popen.pid  # never one process
    for headers, name in ((a, "minilm"), (b, "minilm"), (a, "minilm-2")):
        resp = await c.post(f"/v2/models/{name}/infer", json=text_request(["hi"]),
                            headers=headers)  # fmt: skip
        assert resp.status == 200, await resp.text()

    # A process bound to a refuses another tenant's functions even if asked directly.
    nc = pooled.services["scheduler"].nc
    spec = FunctionSpec(name="minilm", tenant="b", model=ModelSource(builtin="all-minilm-l6-v2"))
    stray = WorkerRunRequest(spec=spec, request_id="x", inputs=[])
    with pytest.raises(NotFound):
        await request(nc, subjects.worker("node-t", "a", subjects.WORKER_RUN), stray,
                      InvokeReply, timeout=10)  # fmt: skip


async def test_with_no_spare_ready_a_process_is_started_and_the_reply_says_so(
    pooled: Platform,
) -> None:
    pool = pool_of(pooled)
    await ready_spares(pool, 1)
    nc = pooled.services["scheduler"].nc
    bind = subjects.node("node-t", "worker", subjects.WORKER_BIND)
    warm = await request(nc, bind, WorkerBindRequest(tenant="a"), WorkerBindReply, timeout=120)
    assert not warm.new_process
    again = await request(nc, bind, WorkerBindRequest(tenant="a"), WorkerBindReply, timeout=120)
    assert again.worker == warm.worker  # a tenant keeps its process
    for p in pool.spares:  # nothing ready now
        p.popen.kill()
        p.ready.clear()
    cold = await request(nc, bind, WorkerBindRequest(tenant="b"), WorkerBindReply, timeout=120)
    assert cold.new_process
    assert cold.waited_us > warm.waited_us
    assert pool.bound["b"].id == cold.worker


def test_a_pool_config_round_trips_through_the_environment(tmp_path: Path) -> None:
    config = Config(worker_role="pool", worker_spares=2, worker_idle_s=5.0, data_dir=tmp_path)
    assert Config.from_env(environ=config.to_env()).worker_spares == 2


async def test_back_from_zero_the_instance_goes_into_a_warm_spare(pooled: Platform) -> None:
    c, pool = pooled.client, pool_of(pooled)
    sched = pooled.services["scheduler"]
    assert isinstance(sched, SchedulerService)
    await ready_spares(pool, 1)
    assert (await c.post("/v1/functions", json=DEMO_BODY)).status == 201
    first = pool.bound["default"]
    now = time.time()
    await sched.autoscale_once(now)
    await sched.autoscale_once(now + 11)  # idle past keep-alive: scaled to zero
    await sched.autoscale_once(now + 11 + 3600)  # unloaded
    for _ in range(300):  # its process, left with no instance, exits (idle 0.5 s)
        if first.popen.poll() is not None:
            break
        await asyncio.sleep(0.1)
    assert first.popen.poll() == 0
    await ready_spares(pool, 1)
    resp = await c.post("/v2/models/minilm/infer", json=text_request(["back"]))
    assert resp.status == 200, await resp.text()
    assert resp.headers["Gpufaas-Cold"] == "1"
    assert resp.headers["Gpufaas-New-Process"] == "0"  # a ready spare, not a new process
    assert int(resp.headers["Gpufaas-Worker-Us"]) > 0
    assert resp.headers["Gpufaas-Loaded-Bytes"] == "0"  # its tensors were resident
    assert pool.bound["default"] is not first
