"""The node's worker pool with real worker processes: a process per tenant, from warm spares."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gpufaas.gateway import direct
from gpufaas.memory.service import MemoryService
from gpufaas.scheduler.service import SchedulerService
from gpufaas.shared import subjects
from gpufaas.shared.config import Config
from gpufaas.shared.errors import NotFound, Overloaded
from gpufaas.shared.messages import (
    FunctionSpec,
    InvokeReply,
    ModelSource,
    WorkerBindReply,
    WorkerBindRequest,
    WorkerRetireReply,
    WorkerRetireRequest,
    WorkerRunRequest,
)
from gpufaas.shared.rpc import request
from gpufaas.tensorstore.service import TensorStoreService
from gpufaas.transfer.service import TransferService
from gpufaas.worker.pool import RETIRE_GRACE_S, WorkerPoolService, WorkerProcess
from tests.conftest import NatsServer
from tests.integration.conftest import (
    DEMO_BODY,
    Platform,
    PlatformFactory,
    bearer,
    make_config,
    read_events,
    text_request,
)
from tests.support import eventually, eventually_blocking

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def ready_spares(pool: WorkerPoolService, n: int, timeout_s: float = 90) -> None:
    """Until ``n`` spares are serving (their processes import torch: seconds)."""
    await eventually(
        lambda: sum(1 for p in pool.spares if p.ready.is_set()) >= n,
        timeout_s,
        f"{n} spares to be ready",
    )


@pytest.fixture
def pool_config(nats_server: NatsServer, tmp_path: Path) -> Config:
    return make_config(
        nats_server,
        tmp_path,
        devices="cpu",
        worker_role="pool",
        worker_spares=1,
        heartbeat_s=0.2,
        worker_idle_s=0.5,
        autoscale_interval_s=3600.0,
        instance_keep_alive_s=10.0,
    )


@pytest.fixture
async def pooled(pool_config: Config, platform_factory: PlatformFactory) -> Platform:
    """One node whose worker is the pool."""
    node_services = (MemoryService, TensorStoreService, TransferService, WorkerPoolService)
    return await platform_factory(config=pool_config, node_services=node_services)


def pool_of(p: Platform) -> WorkerPoolService:
    pool = p.services["worker"]
    assert isinstance(pool, WorkerPoolService)
    return pool


async def test_each_tenant_gets_its_own_process_from_the_warm_spares(pooled: Platform) -> None:
    c, pool = pooled.client, pool_of(pooled)
    await ready_spares(pool, 1)
    assert pool.started == 1
    assert not pool.bound
    a = bearer(await pooled.key_for("a"))
    b = bearer(await pooled.key_for("b"))
    assert (await c.post("/v1/functions", json=DEMO_BODY, headers=a)).status == 201
    assert list(pool.bound) == ["a"]  # the spare, bound to a
    await ready_spares(pool, 1)  # refilled in the background
    assert (await c.post("/v1/functions", json=DEMO_BODY, headers=b)).status == 201
    second = {**DEMO_BODY, "name": "minilm-2"}
    assert (await c.post("/v1/functions", json=second, headers=a)).status == 201
    assert sorted(pool.bound) == ["a", "b"]
    assert pool.bound["a"].popen.pid != pool.bound["b"].popen.pid  # never one process
    for headers, name in ((a, "minilm"), (b, "minilm"), (a, "minilm-2")):
        resp = await c.post(f"/v2/models/{name}/infer", json=text_request(["hi"]), headers=headers)
        assert resp.status == 200, await resp.text()

    # A process bound to a refuses another tenant's functions even if asked directly.
    nc = pooled.services["scheduler"].nc
    spec = FunctionSpec(name="minilm", tenant="b", model=ModelSource(builtin="all-minilm-l6-v2"))
    stray = WorkerRunRequest(spec=spec, request_id="x", inputs=[])
    with pytest.raises(NotFound):
        await request(
            nc, subjects.worker("node-t", "a", subjects.WORKER_RUN), stray, InvokeReply, timeout=10
        )


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


async def deploy_then_scale_to_zero(pooled: Platform, *, refilled: bool = False) -> WorkerProcess:
    """Deploy the demo into a ready spare, then let the autoscaler scale it to zero and
    unload it (idle past keep-alive); returns the tenant's process, left with no instance.
    ``refilled``: wait for the replacement spare before scaling down."""
    c, pool = pooled.client, pool_of(pooled)
    sched = pooled.services["scheduler"]
    assert isinstance(sched, SchedulerService)
    await ready_spares(pool, 1)
    assert (await c.post("/v1/functions", json=DEMO_BODY)).status == 201
    first = pool.bound["default"]
    if refilled:
        await ready_spares(pool, 1)
    now = time.time()
    for later in (0, 11, 11 + 3600):  # idle past keep-alive: scaled to zero, then unloaded
        await sched.autoscale_once(now + later)
    return first


async def test_back_from_zero_the_instance_goes_into_a_warm_spare(pooled: Platform) -> None:
    c, pool = pooled.client, pool_of(pooled)
    first = await deploy_then_scale_to_zero(pooled)
    await eventually(
        lambda: first.popen.poll() is not None,
        30,
        "its process, left with no instance, to exit (idle 0.5 s)",
    )
    assert first.popen.poll() == 0
    await ready_spares(pool, 1)
    resp = await c.post("/v2/models/minilm/infer", json=text_request(["back"]))
    assert resp.status == 200, await resp.text()
    assert resp.headers["Gpufaas-Cold"] == "1"
    assert resp.headers["Gpufaas-New-Process"] == "0"  # a ready spare, not a new process
    assert int(resp.headers["Gpufaas-Worker-Us"]) > 0
    assert resp.headers["Gpufaas-Loaded-Bytes"] == "0"  # its tensors were resident
    assert pool.bound["default"] is not first


def reaped(pid: int) -> bool:
    """Gone from the process table (a zombie still has its /proc entry)."""
    return not Path(f"/proc/{pid}").exists()


async def test_an_idle_exit_loses_no_request(pooled: Platform) -> None:
    """The 503 race: a request right after the tenant's process decided to exit is served
    (by a spare: the pool stopped counting the dying process before it stopped serving)."""
    c, pool = pooled.client, pool_of(pooled)
    first = await deploy_then_scale_to_zero(pooled, refilled=True)
    await eventually(
        lambda: first.retired, 60, "the idle process asked to exit and the pool agreed"
    )
    assert "default" not in pool.bound  # counted out before it stops serving
    assert first.alive  # and still exiting: the request below meets the old race's window
    resp = await c.post("/v2/models/minilm/infer", json=text_request(["right after"]))
    assert resp.status == 200, await resp.text()
    assert resp.headers["Gpufaas-New-Process"] == "0"  # a ready spare, bound to the tenant
    assert pool.bound["default"] is not first
    await eventually(
        lambda: first not in pool.exiting and reaped(first.popen.pid),
        60,
        "the exited process is reaped",
    )
    assert first.popen.returncode == 0


async def test_a_process_just_bound_is_not_let_go(pooled: Platform) -> None:
    """The pool refuses a retirement while a bind of the tenant is under way or has just
    returned the process; once it agrees, a bind gets another process."""
    pool = pool_of(pooled)
    await ready_spares(pool, 1)
    nc = pooled.services["scheduler"].nc
    bind = subjects.node("node-t", "worker", subjects.WORKER_BIND)
    retire = subjects.node("node-t", "worker", subjects.WORKER_RETIRE)
    a = await request(nc, bind, WorkerBindRequest(tenant="a"), WorkerBindReply, timeout=120)
    proc = pool.bound["a"]
    ask = WorkerRetireRequest(worker=a.worker, tenant="a")
    early = await request(nc, retire, ask, WorkerRetireReply, timeout=10)
    assert not early.retire  # within RETIRE_GRACE_S of the bind: its request is on its way
    proc.returned_at -= RETIRE_GRACE_S
    assert (await request(nc, retire, ask, WorkerRetireReply, timeout=10)).retire
    assert (await request(nc, retire, ask, WorkerRetireReply, timeout=10)).retire  # asked again
    assert proc.alive
    assert proc in pool.exiting
    assert "a" not in pool.bound
    await ready_spares(pool, 1)
    again = await request(nc, bind, WorkerBindRequest(tenant="a"), WorkerBindReply, timeout=120)
    assert again.worker != a.worker  # never the retiring process


async def test_the_bind_answers_before_the_replacement_spare_starts(pooled: Platform) -> None:
    pool = pool_of(pooled)
    await ready_spares(pool, 1)
    await eventually(lambda: pool.started == 1 and not pool.exiting, 60, "the pool is quiet")
    nc = pooled.services["scheduler"].nc
    bind = subjects.node("node-t", "worker", subjects.WORKER_BIND)
    reply = await request(nc, bind, WorkerBindRequest(tenant="a"), WorkerBindReply, timeout=120)
    assert not reply.new_process
    assert pool.started == 1  # nothing started inside the bind
    await eventually(lambda: pool.started > 1, 60, "the replacement spare is started")
    await ready_spares(pool, 1)


async def test_stopped_spares_are_reaped(pooled: Platform) -> None:
    pool = pool_of(pooled)
    await ready_spares(pool, 1)
    extra = pool._start(None)  # one more than wanted: the next refill stops it
    pool.spares.append(extra)
    pool._refill()
    assert extra.retired
    assert extra in pool.exiting
    await eventually(
        lambda: extra not in pool.exiting and reaped(extra.popen.pid),
        60,
        "the stopped spare is reaped",
    )


def children(pid: int) -> set[int]:
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            out |= {int(c) for c in (task / "children").read_text().split()}
    return out


def gone(pid: int) -> bool:
    """Exited: no /proc entry, or a zombie its new parent has not reaped."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


def test_a_killed_pool_leaves_no_worker_behind(pool_config: Config, tmp_path: Path) -> None:
    """The pool's processes are started without a preexec_fn; each asks for its parent's
    death signal itself (``--parent-pid``)."""
    env = {**os.environ, **pool_config.to_env(), "GPUFAAS_LOG_FORMAT": "json"}
    with (tmp_path / "pool.log").open("wb") as out:
        manager = subprocess.Popen(
            [sys.executable, "-m", "gpufaas.worker"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        eventually_blocking(lambda: bool(children(manager.pid)), 60, "the pool to start a spare")
        spares = children(manager.pid)
        manager.kill()
        manager.wait(10)
        eventually_blocking(lambda: all(gone(pid) for pid in spares), 30, "its spares to exit")
    finally:
        if manager.poll() is None:
            manager.kill()
            manager.wait(10)


async def test_a_crashed_process_is_replaced_on_the_next_request(pooled: Platform) -> None:
    c, pool = pooled.client, pool_of(pooled)
    await ready_spares(pool, 1)
    assert (await c.post("/v1/functions", json=DEMO_BODY)).status == 201
    crashed = pool.bound["default"]
    await ready_spares(pool, 1)
    crashed.popen.kill()
    await asyncio.to_thread(crashed.popen.wait, 10)
    resp = await c.post("/v2/models/minilm/infer", json=text_request(["after a crash"]))
    assert resp.status == 200, await resp.text()
    assert resp.headers["Gpufaas-Cold"] == "1"  # built again, in the spare now bound
    assert pool.bound["default"] is not crashed
    await eventually(
        lambda: crashed not in pool.exiting and crashed.id not in pool._by_id,
        60,
        "the crashed process is forgotten",
    )


def embeddings(body: dict[str, Any]) -> np.ndarray:
    out = body["outputs"][0]
    return np.array(out["data"], dtype=np.float32).reshape(out["shape"])


@pytest.mark.parametrize("route", ["scheduler", "direct"])
async def test_a_worker_killed_with_requests_in_flight_loses_none(
    pool_config: Config, platform_factory: PlatformFactory, route: str
) -> None:
    """SIGKILL of a tenant's process with requests in flight: the pool announces it at once
    (``worker.exited``) and the scheduler sends each unanswered request again, under its
    dispatch id, to the spare the pool binds; every caller gets the right embedding. On a
    gateway's direct route the gateway hears it too and sends them through a scheduler."""
    node_services = (MemoryService, TensorStoreService, TransferService, WorkerPoolService)
    ttl = 30.0 if route == "direct" else 0.0
    pooled = await platform_factory(
        config=pool_config.replace(direct_route_ttl_s=ttl), node_services=node_services
    )
    c, pool = pooled.client, pool_of(pooled)
    sched = pooled.services["scheduler"]
    assert isinstance(sched, SchedulerService)
    routes: direct.DirectRoutes = c.app[direct.ROUTES]
    await ready_spares(pool, 1)
    assert (await c.post("/v1/functions", json=DEMO_BODY)).status == 201
    texts = [[f"request {i}", f"and its second row {i}"] for i in range(6)]
    infer = "/v2/models/minilm/infer"
    want = [embeddings(await (await c.post(infer, json=text_request(t))).json()) for t in texts]
    await ready_spares(pool, 1)
    victim = pool.bound["default"]
    victim.popen.send_signal(signal.SIGSTOP)  # holds every request in flight, unanswered
    calls = [asyncio.create_task(c.post(infer, json=text_request(t))) for t in texts]

    def in_flight() -> int:
        both = [sched.worker_client.deaths._sends, routes.deaths._sends]
        return sum(len(s) for sends in both for s in sends.values())

    await eventually(lambda: in_flight() >= len(texts), 30, "all sent to it")
    direct_sends = sum(len(s) for s in routes.deaths._sends.values())
    assert (direct_sends > 0) == (route == "direct")
    killed = time.monotonic()
    victim.popen.kill()
    resps = await asyncio.gather(*calls)
    stall = time.monotonic() - killed
    for resp, expected in zip(resps, want, strict=True):
        assert resp.status == 200, await resp.text()
        np.testing.assert_allclose(embeddings(await resp.json()), expected, rtol=1e-4, atol=1e-5)
    # each sent again, none lost
    assert sched.worker_client.resent + routes.fell_back >= len(texts)
    assert routes.fell_back == direct_sends
    assert pool.bound["default"] is not victim
    assert stall < 5, f"the callers waited {stall:.2f} s after the kill"
    print(f"worst stall after the kill: {stall:.3f} s")
    event = (await read_events(pooled, "worker.exited"))[-1]["data"]
    assert event["worker"] == victim.id
    assert event["tenant"] == "default"


async def test_a_request_answered_before_the_kill_is_not_sent_again(pooled: Platform) -> None:
    c, pool = pooled.client, pool_of(pooled)
    sched = pooled.services["scheduler"]
    assert isinstance(sched, SchedulerService)
    await ready_spares(pool, 1)
    assert (await c.post("/v1/functions", json=DEMO_BODY)).status == 201
    resp = await c.post("/v2/models/minilm/infer", json=text_request(["answered"]))
    assert resp.status == 200
    victim = pool.bound["default"]
    victim.popen.kill()
    await eventually(lambda: "default" not in pool.bound, 10, "the pool to see it exit")
    assert sched.worker_client.resent == 0
    resp = await c.post("/v2/models/minilm/infer", json=text_request(["after"]))
    assert resp.status == 200, await resp.text()


async def test_no_process_beyond_the_nodes_cap(
    pool_config: Config, platform_factory: PlatformFactory
) -> None:
    """A cap of one process (its spare): the first tenant takes it, no spare is started
    again, and a second tenant's bind is refused with the reason, not run out of memory."""
    node_services = (MemoryService, TensorStoreService, TransferService, WorkerPoolService)
    p = await platform_factory(
        config=pool_config.replace(max_worker_processes=1), node_services=node_services
    )
    pool = pool_of(p)
    await ready_spares(pool, 1)
    a = bearer(await p.key_for("a"))
    assert (await p.client.post("/v1/functions", json=DEMO_BODY, headers=a)).status == 201
    assert pool.want_spares == 0  # the cap is taken by a tenant: no spare
    b = bearer(await p.key_for("b"))
    resp = await p.client.post("/v1/functions", json=DEMO_BODY, headers=b)
    assert resp.status == 429, await resp.text()
    assert "GPUFAAS_MAX_WORKER_PROCESSES" in (await resp.json())["error"]
    nc = p.services["scheduler"].nc
    bind = subjects.node("node-t", "worker", subjects.WORKER_BIND)
    with pytest.raises(Overloaded, match="GPUFAAS_MAX_WORKER_PROCESSES") as refused:
        await request(nc, bind, WorkerBindRequest(tenant="b"), WorkerBindReply, timeout=120)
    assert refused.value.retry_after_s is not None
    assert list(pool.bound) == ["a"]
    assert pool.started == 1
