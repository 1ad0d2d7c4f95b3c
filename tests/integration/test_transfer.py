"""The transfer service: ensure() across tiers and nodes, tenancy, and failures."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from gpufaas.memory.service import MemoryService
from gpufaas.shared import subjects
from gpufaas.shared.config import Config
from gpufaas.shared.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from gpufaas.shared.messages import (
    EnsureReply,
    EnsureRequest,
    FetchReply,
    FetchRequest,
    MemAllocation,
    MemAllocRequest,
    Tube,
    decode_json,
    encode_json,
)
from gpufaas.shared.rpc import request
from gpufaas.shared.shm import write_tube
from gpufaas.transfer import emulator
from gpufaas.transfer.service import FETCH_CHUNK_BYTES, SWEEP_GRACE_S, TransferService
from tests.conftest import NatsServer
from tests.integration.conftest import make_config

pytestmark = pytest.mark.integration


class Nodes:
    """Transfer services of two nodes over a real NATS, each with its own shm dir (as if
    on two machines)."""

    def __init__(self, a: TransferService, b: TransferService) -> None:
        self.a, self.b = a, b

    async def tube(self, data: bytes, tenant: str = "t1", node: str = "node-a") -> Tube:
        shm = self.a.config.shm_dir
        tube = await asyncio.to_thread(
            write_tube, shm, node, tenant, datatype="UINT8", shape=[len(data)], data=data
        )
        await self.a.buckets.tubes.put(tube.id, encode_json(tube))
        return tube

    async def ensure(self, svc: TransferService, tube_id: str, **kw: object) -> EnsureReply:
        subject = subjects.node(svc.config.node_id, "transfer", subjects.TRANSFER_ENSURE)
        req = EnsureRequest(tube_id=tube_id, **kw)  # type: ignore[arg-type]
        return await request(self.b.nc, subject, req, EnsureReply, timeout=10)

    async def stored(self, tube_id: str) -> Tube:
        entry = await self.b.buckets.tubes.get(tube_id)
        assert entry.value is not None
        return decode_json(entry.value, Tube)


def node_config(nats: NatsServer, tmp_path: Path, node: str) -> Config:
    return make_config(nats, tmp_path, node_id=node, devices="sim:2", shm_dir=tmp_path / node)


@pytest.fixture
async def memories(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[None]:
    """The memory services of node-a and node-b: GPU copies take their room from them."""
    services = [MemoryService(node_config(nats_server, tmp_path, n)) for n in ("node-a", "node-b")]
    for m in services:
        await m.start()
    yield
    for m in services:
        await m.stop()


@pytest.fixture
async def nodes(nats_server: NatsServer, tmp_path: Path, memories: None) -> AsyncIterator[Nodes]:
    a = TransferService(node_config(nats_server, tmp_path, "node-a"))
    b = TransferService(node_config(nats_server, tmp_path, "node-b"))
    await a.start()
    await b.start()
    yield Nodes(a, b)
    await b.stop()
    await a.stop()


async def test_a_host_copy_here_is_resident(nodes: Nodes) -> None:
    tube = await nodes.tube(b"abc")
    reply = await nodes.ensure(nodes.a, tube.id, tenant="t1")
    assert (reply.path, reply.nbytes, reply.placement.node) == ("resident", 0, "node-a")


async def test_host_to_a_simulated_gpu_is_byte_exact_and_recorded(nodes: Nodes) -> None:
    data = os.urandom(3 * 2**20 + 5)
    tube = await nodes.tube(data)
    sub = await nodes.a.nc.subscribe(subjects.event("transfer.completed"))
    reply = await nodes.ensure(nodes.a, tube.id, tenant="t1", tier="gpu:1", slo_ms=50.0)
    assert reply.placement.tier == "gpu:1"
    assert reply.simulated
    assert reply.nbytes == len(data)
    # dgx1-v100: GPU 1's PCIe 3.0 link, 12.5 GB/s and 10 µs.
    assert reply.duration_us == pytest.approx(10 + len(data) / 12.5e3, rel=0.01)
    assert reply.deadline_met is True
    copy = nodes.a.config.shm_dir / reply.placement.segment
    assert await asyncio.to_thread(copy.read_bytes) == data
    assert reply.placement in (await nodes.stored(tube.id)).placements
    event = json.loads((await sub.next_msg(timeout=5)).data)["data"]
    assert (event["tube"], event["tier"], event["simulated"]) == (tube.id, "gpu:1", True)
    again = await nodes.ensure(nodes.a, tube.id, tenant="t1", tier="gpu:1")
    assert (again.path, again.nbytes) == ("resident", 0)


async def test_another_tenants_or_an_unknown_tube_is_not_found(nodes: Nodes) -> None:
    tube = await nodes.tube(b"secret")
    for tube_id, tenant in ((tube.id, "t2"), ("N" * 24, "t1")):
        with pytest.raises(NotFound) as err:
            await nodes.ensure(nodes.a, tube_id, tenant=tenant)
        assert err.value.field == "tube"
        assert tenant != "t2" or "t1" not in err.value.message  # nothing revealed
    for malformed in ("no-such-tube", "bad key!", "../" + tube.id):  # not what new_id makes
        with pytest.raises(InvalidArgument) as bad:
            await nodes.ensure(nodes.a, malformed, tenant="t1")
        assert bad.value.field == "tube_id"
    subject = subjects.node("node-a", "transfer", subjects.TRANSFER_FETCH)
    with pytest.raises(NotFound):
        await request(
            nodes.b.nc,
            subject,
            FetchRequest(tube_id=tube.id, tenant="t2", offset=0, nbytes=1),
            FetchReply,
            timeout=5,
        )


async def test_a_tier_the_node_does_not_have_is_refused(nodes: Nodes) -> None:
    tube = await nodes.tube(b"x")
    for tier in ("gpu:7", "disk"):
        with pytest.raises(InvalidArgument) as err:
            await nodes.ensure(nodes.a, tube.id, tenant="t1", tier=tier)
        assert err.value.field == "tier"
    assert len((await nodes.stored(tube.id)).placements) == 1


async def test_a_tube_on_another_node_is_fetched_in_chunks(nodes: Nodes) -> None:
    data = os.urandom(2 * FETCH_CHUNK_BYTES + 123)
    tube = await nodes.tube(data)
    reply = await nodes.ensure(nodes.b, tube.id, tenant="t1", tier="gpu:0")
    assert reply.placement.node == "node-b"
    assert reply.path.startswith("host(node-a)->host")
    stored = await nodes.stored(tube.id)
    assert {(p.node, p.tier) for p in stored.placements} == {
        ("node-a", "host"),
        ("node-b", "host"),
        ("node-b", "gpu:0"),
    }
    for p in stored.placements:
        copy = (nodes.a if p.node == "node-a" else nodes.b).config.shm_dir / p.segment
        assert await asyncio.to_thread(copy.read_bytes) == data


class DiesMidCopy(TransferService):
    """A node whose transfer service stops after serving its first chunk."""

    async def fetch(self, req: FetchRequest) -> FetchReply:
        reply = await super().fetch(req)
        asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self.stop()))
        return reply


async def test_a_node_that_leaves_mid_copy_fails_it_cleanly(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    a = DiesMidCopy(node_config(nats_server, tmp_path, "node-a"))
    b = TransferService(node_config(nats_server, tmp_path, "node-b"))
    await a.start()
    await b.start()
    try:
        nodes = Nodes(a, b)
        tube = await nodes.tube(os.urandom(8 * FETCH_CHUNK_BYTES))
        with pytest.raises(Unavailable, match="node-a"):
            await nodes.ensure(b, tube.id, tenant="t1")
        placements = (await nodes.stored(tube.id)).placements
        assert [p.node for p in placements] == ["node-a"]  # nothing points at half a copy
        assert not list((tmp_path / "node-b").rglob("*.*"))  # no temporary file left
        assert not list((tmp_path / "node-b").rglob(tube.id))
    finally:
        await b.stop()
        await a.stop()


async def test_nodes_sharing_a_machine_read_each_others_host_copies(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    a = TransferService(make_config(nats_server, tmp_path, node_id="node-a"))
    b = TransferService(make_config(nats_server, tmp_path, node_id="node-b"))
    await a.start()
    await b.start()
    try:
        nodes = Nodes(a, b)
        tube = await nodes.tube(b"shared pages")
        reply = await nodes.ensure(b, tube.id, tenant="t1")
        assert (reply.path, reply.placement.node) == ("resident", "node-a")  # no copy
    finally:
        await b.stop()
        await a.stop()


async def test_the_object_tier_outlives_the_node_that_wrote_it(nodes: Nodes) -> None:
    data = os.urandom(3 * 2**20)
    tube = await nodes.tube(data)
    stored = await nodes.ensure(nodes.a, tube.id, tenant="t1", tier="object")
    assert (stored.placement.tier, stored.path) == ("object", "host->object")
    assert (await nodes.ensure(nodes.b, tube.id, tenant="t1", tier="object")).path == "resident"
    # node-a goes away with its host copy: only the object tier holds the bytes now.
    left = msgspec.structs.replace(
        await nodes.stored(tube.id),
        placements=[
            p if p.tier == "object" else msgspec.structs.replace(p, node="node-gone")
            for p in (await nodes.stored(tube.id)).placements
        ],
    )
    await nodes.b.buckets.tubes.put(tube.id, encode_json(left))
    back = await nodes.ensure(nodes.b, tube.id, tenant="t1")
    assert back.path == "object->host"
    copy = nodes.b.config.shm_dir / back.placement.segment
    assert await asyncio.to_thread(copy.read_bytes) == data
    assert "node-gone" not in {p.node for p in (await nodes.stored(tube.id)).placements}


async def test_placements_on_a_node_that_left_are_dropped(nodes: Nodes) -> None:
    tube = await nodes.tube(b"orphan", node="node-gone")
    with pytest.raises(NotFound, match="no copy on a live node"):
        await nodes.ensure(nodes.b, tube.id, tenant="t1")
    assert (await nodes.stored(tube.id)).placements == []


@contextlib.asynccontextmanager
async def simulated_dgx1(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[TransferService]:
    """The transfer and memory services of a simulated 8-GPU DGX-1, started."""
    config = make_config(nats_server, tmp_path, node_id="node-a", devices="sim:8")
    memory, svc = MemoryService(config), TransferService(config)
    await memory.start()
    await svc.start()
    try:
        yield svc
    finally:
        await svc.stop()
        await memory.stop()


@pytest.fixture
async def dgx1(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[TransferService]:
    async with simulated_dgx1(nats_server, tmp_path) as svc:
        yield svc


async def test_copies_on_a_simulated_dgx1_take_the_planned_routes(dgx1: TransferService) -> None:
    svc = dgx1
    nodes = Nodes(svc, svc)
    data = os.urandom(64 * 2**20)
    tube = await nodes.tube(data)
    # host -> GPU 0: its own PCIe uplink plus the other switches' relayed over NVLink.
    to0 = await nodes.ensure(svc, tube.id, tenant="t1", tier="gpu:0")
    assert to0.simulated
    assert "over 4 routes" in to0.path
    alone_us = len(data) / 12.5e3  # one PCIe 3.0 link
    assert to0.duration_us < alone_us / 3
    # GPU 0 -> GPU 3 (two NVLinks): from the GPU copy, never through the host.
    to3 = await nodes.ensure(svc, tube.id, tenant="t1", tier="gpu:3")
    assert to3.path.startswith("gpu:0->gpu:3")
    assert "host" not in to3.path
    # GPU 0 (the first GPU copy) -> GPU 5: no direct NVLink, relayed over NVLink instead.
    to5 = await nodes.ensure(svc, tube.id, tenant="t1", tier="gpu:5")
    assert "host" not in to5.path
    for reply in (to0, to3, to5):
        copy = svc.config.shm_dir / reply.placement.segment
        assert await asyncio.to_thread(copy.read_bytes) == data


@pytest.fixture
async def slow_dgx1(
    nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[TransferService]:
    """``dgx1`` with its emulated copies slowed 5x more against the wall clock: two copies
    sent together overlap in simulated time even when the second request is handled a
    second after the first (a loaded 2-core box)."""
    monkeypatch.setattr(emulator, "DILATION", 5 * emulator.DILATION)
    async with simulated_dgx1(nats_server, tmp_path) as svc:
        yield svc


async def test_concurrent_copies_share_links_and_slos_get_their_bandwidth_first(
    slow_dgx1: TransferService,
) -> None:
    svc = slow_dgx1
    nodes = Nodes(svc, svc)
    data = os.urandom(2**20) * 256  # 256 MiB: ~5.4 ms alone over GPU 0's four routes
    urgent, bulk, hopeless = [await nodes.tube(data) for _ in range(3)]
    a, b = await asyncio.gather(
        nodes.ensure(svc, urgent.id, tenant="t1", tier="gpu:0", slo_ms=9.0),
        nodes.ensure(svc, bulk.id, tenant="t1", tier="gpu:0"),
    )
    assert a.simulated
    assert b.simulated
    assert a.deadline_met is True  # its least rate came first ...
    assert b.deadline_met is None
    assert b.duration_us > a.duration_us  # ... the copy without an SLO got the rest
    # 256 MiB in 2 ms needs 134 GB/s; GPU 0 can take 50: reported, not silently slow.
    c = await nodes.ensure(svc, hopeless.id, tenant="t1", tier="gpu:0", slo_ms=2.0)
    assert c.deadline_met is False
    assert c.at_risk
    for reply in (a, b, c):
        copy = svc.config.shm_dir / reply.placement.segment
        assert await asyncio.to_thread(copy.read_bytes) == data


async def test_the_sweeper_deletes_files_of_tubes_gone_from_kv(nodes: Nodes) -> None:
    kept, expired, young = [await nodes.tube(b"x" * 10) for _ in range(3)]
    gpu_copy = await nodes.ensure(nodes.a, expired.id, tenant="t1", tier="gpu:0")
    for t in (expired, young):
        await nodes.a.buckets.tubes.delete(t.id)
    shm = nodes.a.config.shm_dir
    now = time.time()
    old = now - 2 * SWEEP_GRACE_S
    for t in (kept, expired):
        os.utime(shm / t.placements[0].segment, (old, old))
    os.utime(shm / gpu_copy.placement.segment, (old, old))
    swept = await nodes.a.sweep_once(now)
    assert sorted(swept) == [expired.id, expired.id]  # its host file and its GPU copy
    assert not (shm / expired.placements[0].segment).exists()
    assert not (shm / gpu_copy.placement.segment).exists()
    assert (shm / kept.placements[0].segment).exists()  # still in KV
    assert (shm / young.placements[0].segment).exists()  # may not be in KV yet


async def test_gpu_copies_take_their_room_from_the_memory_service(nodes: Nodes) -> None:
    memory = subjects.node("node-a", "memory", subjects.MEMORY_ALLOC)
    gpu = 32 * 2**30  # dgx1-v100: 32 GB per GPU
    hog = MemAllocRequest(device="gpu:0", nbytes=gpu - 2**20, owner="someone-else")
    await request(nodes.b.nc, memory, hog, MemAllocation, timeout=5)
    tube = await nodes.tube(os.urandom(4 * 2**20))
    with pytest.raises(ResourceExhausted, match="gpu:0"):
        await nodes.ensure(nodes.a, tube.id, tenant="t1", tier="gpu:0")
    assert [p.tier for p in (await nodes.stored(tube.id)).placements] == ["host"]
    assert not list((nodes.a.config.shm_dir / "gpu").rglob("*"))  # no file, not even a temp
    ok = await nodes.ensure(nodes.a, tube.id, tenant="t1", tier="gpu:1")  # another GPU has room
    assert ok.placement.segment.rsplit(".", 1)[1].isdigit()  # named after its memory block
