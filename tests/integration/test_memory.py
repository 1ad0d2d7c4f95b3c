"""The memory service over a real NATS: pools per GPU, leases, state in KV, events."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gpufaas.memory.service import RESERVATION_WINDOW_S, MemoryService
from gpufaas.shared import subjects
from gpufaas.shared.config import Config
from gpufaas.shared.errors import InvalidArgument, ResourceExhausted
from gpufaas.shared.messages import (
    MemAllocation,
    MemAllocRequest,
    MemFreeReply,
    MemFreeRequest,
    MemObserve,
    MemRenewReply,
    MemRenewRequest,
    MemStatsReply,
    MemStatsRequest,
    Msg,
    encode,
)
from gpufaas.shared.rpc import request
from tests.conftest import NatsServer
from tests.integration.conftest import make_config
from tests.support import eventually, handled

pytestmark = pytest.mark.integration

GIB = 2**30


@pytest.fixture
def config(nats_server: NatsServer, tmp_path: Path) -> Config:
    return make_config(nats_server, tmp_path, devices="sim:1", topology="pcie-1gpu")


@pytest.fixture
async def memory(config: Config) -> AsyncIterator[MemoryService]:
    svc = MemoryService(config)
    await svc.start()
    yield svc
    await svc.stop()


async def call(svc: MemoryService, verb: str, msg: Msg, reply: type[Msg]) -> object:
    subject = subjects.node(svc.config.node_id, "memory", verb)
    return await request(svc.nc, subject, msg, reply, timeout=5)


async def alloc(svc: MemoryService, nbytes: int, owner: str = "w1") -> MemAllocation:
    a = await call(
        svc,
        subjects.MEMORY_ALLOC,
        MemAllocRequest(device="gpu:0", nbytes=nbytes, owner=owner),
        MemAllocation,
    )
    assert isinstance(a, MemAllocation)
    return a


async def stats(svc: MemoryService) -> dict[str, int | float]:
    r = await call(svc, subjects.MEMORY_STATS, MemStatsRequest(), MemStatsReply)
    assert isinstance(r, MemStatsReply)
    (pool,) = [p for p in r.pools if p.device == "gpu:0"]
    return {k: getattr(pool, k) for k in ("reserved_bytes", "allocated_bytes", "allocations")}


async def test_allocations_grow_the_pool_and_announce_it(memory: MemoryService) -> None:
    sub = await memory.nc.subscribe(subjects.event("memory.pool.resized"))
    a = await alloc(memory, 100 * 2**20)
    b = await alloc(memory, 10)
    assert (a.device, b.device) == ("gpu:0", "gpu:0")
    assert a.segment != b.segment or a.offset != b.offset
    # 100 MiB takes a segment of its own; the 10 bytes open a 64 MiB one (256-byte aligned).
    assert await stats(memory) == {
        "reserved_bytes": 164 * 2**20,
        "allocated_bytes": 100 * 2**20 + 256,
        "allocations": 2,
    }
    ev = json.loads((await sub.next_msg(timeout=5)).data)["data"]
    assert (ev["device"], ev["kind"]) == ("gpu:0", "grow")
    freed = await call(
        memory, subjects.MEMORY_FREE, MemFreeRequest(device="gpu:0", id=a.id), MemFreeReply
    )
    assert freed == MemFreeReply(freed=True)
    again = await call(
        memory, subjects.MEMORY_FREE, MemFreeRequest(device="gpu:0", id=a.id), MemFreeReply
    )
    assert again == MemFreeReply(freed=False)  # idempotent


async def test_bad_requests_are_refused_clearly(memory: MemoryService) -> None:
    with pytest.raises(InvalidArgument, match="whole device") as err:
        await alloc(memory, 100 * GIB)  # the pcie-1gpu GPU has 40 GB
    assert err.value.field == "nbytes"
    with pytest.raises(InvalidArgument) as err:
        await call(
            memory,
            subjects.MEMORY_ALLOC,
            MemAllocRequest(device="gpu:3", nbytes=1, owner="w"),
            MemAllocation,
        )
    assert err.value.field == "device"
    sub = await memory.nc.subscribe(subjects.event("memory.pressure"))
    await alloc(memory, 30 * GIB)
    with pytest.raises(ResourceExhausted, match="gpu:0"):
        await alloc(memory, 20 * GIB)
    ev = json.loads((await sub.next_msg(timeout=5)).data)["data"]
    assert ev["bytes"] == 20 * GIB


async def test_a_restarted_manager_loses_nothing(memory: MemoryService, config: Config) -> None:
    for n in (5 * 2**20, 70 * 2**20, 3):
        await alloc(memory, n)
    before = await stats(memory)
    await memory.stop()
    restarted = MemoryService(config)
    await restarted.start()
    try:
        assert await stats(restarted) == before
        c = await alloc(restarted, 2**20)  # new blocks do not overlap the restored ones
        assert c.id > 3
        assert (await stats(restarted))["allocations"] == 4
    finally:
        await restarted.stop()


async def test_a_dead_owners_allocations_are_freed(memory: MemoryService) -> None:
    ttl = memory.config.node_ttl_s
    await alloc(memory, 2**20, owner="alive")
    await alloc(memory, 2**20, owner="dead")
    t_dead = time.time()  # "dead" never renews: its lease ends by t_dead + ttl
    # Not a wait: time passes so that "alive" renews more than 0.1 s (the margin of the
    # second reconcile below) after "dead"'s lease began.
    await asyncio.sleep(0.3)
    renewed = await call(
        memory, subjects.MEMORY_RENEW, MemRenewRequest(owner="alive"), MemRenewReply
    )
    assert renewed == MemRenewReply(allocations=1)
    await memory.reconcile_once(t_dead + ttl / 2)
    assert (await stats(memory))["allocations"] == 2  # within the lease
    await memory.reconcile_once(t_dead + ttl + 0.1)
    assert (await stats(memory))["allocations"] == 1  # "dead" lapsed; "alive" renewed


async def test_an_idle_pool_gives_its_segments_back(memory: MemoryService) -> None:
    a = await alloc(memory, 2**20)
    await call(memory, subjects.MEMORY_FREE, MemFreeRequest(device="gpu:0", id=a.id), MemFreeReply)
    assert (await stats(memory))["reserved_bytes"] > 0  # kept for the keep-alive
    await memory.reconcile_once(time.time() + memory.config.tensor_keep_alive_s + 1)
    assert (await stats(memory))["reserved_bytes"] == 0


async def test_reservations_follow_the_observed_load_and_go_when_idle(
    memory: MemoryService,
) -> None:
    subject = subjects.node(memory.config.node_id, "memory", subjects.MEMORY_OBSERVE)

    async def observe(rid: str, phase: str, nbytes: int = 0) -> None:
        msg = MemObserve(
            device="gpu:0",
            function="t/f",
            request_id=rid,
            phase=phase,  # type: ignore[arg-type]
            nbytes=nbytes,
        )
        await memory.nc.publish(subject, encode(msg))

    for i in range(3):  # three in flight at once, 4 MiB each
        await observe(f"r{i}", "start", 4 * 2**20)
    await memory.nc.flush()
    await eventually(lambda: handled(memory, subject) == 3, 10, "the three starts to be handled")
    await memory.reconcile_once(time.time())
    r = await call(memory, subjects.MEMORY_STATS, MemStatsRequest(), MemStatsReply)
    assert isinstance(r, MemStatsReply)
    assert r.reserved == {"gpu:0 t/f": 12 * 2**20}  # R_size 4 MiB x R_con 3
    (pool,) = [
        p for p in r.pools if p.device == "gpu:0"
    ]  # a hold: room of the budget, no segment (the worker allocates it)
    assert (pool.held_bytes, pool.reserved_bytes) == (12 * 2**20, 0)
    for i in range(3):
        await observe(f"r{i}", "end")
    await memory.nc.flush()
    await eventually(lambda: handled(memory, subject) == 6, 10, "the three ends to be handled")
    idle = time.time() + RESERVATION_WINDOW_S + 1  # a whole window without a request
    await memory.reconcile_once(idle)
    r = await call(memory, subjects.MEMORY_STATS, MemStatsRequest(), MemStatsReply)
    assert isinstance(r, MemStatsReply)
    assert r.reserved == {}
    await memory.reconcile_once(idle + memory.config.tensor_keep_alive_s + 1)
    assert (await stats(memory))["reserved_bytes"] == 0  # an idle node holds nothing
