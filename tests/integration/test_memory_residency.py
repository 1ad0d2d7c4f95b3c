"""Queue-aware residency on one small simulated GPU, driven step by step with a fake clock.

The memory service and the tensor store run for real over NATS; queue views are sent
straight on the memory service's subject (as a scheduler replica publishes them), and
``reconcile_once(now)`` is called with chosen times. Models are 4 MiB safetensors files
on a GPU of 13 MiB: three fit, a fourth needs room.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
import safetensors.torch
import torch
from nats.aio.subscription import Subscription

from gpufaas.memory.planner import TYPICAL_COMPUTE_S
from gpufaas.memory.policy import DEFAULT_SLACK_S
from gpufaas.memory.service import MemoryService
from gpufaas.shared import subjects
from gpufaas.shared.config import Config
from gpufaas.shared.constants import EVENTS_STREAM
from gpufaas.shared.errors import InvalidArgument, NotFound, ResourceExhausted
from gpufaas.shared.memory_client import tube_item
from gpufaas.shared.messages import (
    AdoptReply,
    AdoptRequest,
    EnsureReply,
    EnsureRequest,
    EvictModelReply,
    EvictModelRequest,
    MemAllocRequest,
    MemFreeRequest,
    MemRejection,
    MemStatsReply,
    MemStatsRequest,
    MemViewAck,
    ModelCache,
    ModelQuery,
    ModelSource,
    Msg,
    Placement,
    PrefetchReply,
    PrefetchRequest,
    QueuedTube,
    QueueEntry,
    QueueView,
    RegisterReply,
    RegisterRequest,
    ReleaseReply,
    ReleaseRequest,
    ResidencyReply,
    ResidencyRequest,
    Tube,
    TubeReleaseReply,
    TubeReleaseRequest,
    decode_json,
    encode_json,
)
from gpufaas.shared.rpc import request
from gpufaas.shared.shm import write_tube
from gpufaas.tensorstore.service import TensorStoreService
from gpufaas.transfer.service import SWEEP_GRACE_S, TransferService
from tests.conftest import NatsServer
from tests.integration.conftest import make_config

pytestmark = pytest.mark.integration

MIB = 2**20
HOUR = 3600.0
MODEL_BYTES = 4 * MIB
GBPS = 25.0
LEAD_S = MODEL_BYTES / (GBPS * 1e9) + DEFAULT_SLACK_S  # how early a 4 MiB prefetch is due
NODE = "node-t"


@pytest.fixture
def config(nats_server: NatsServer, tmp_path: Path) -> Config:
    topo = {
        "name": "small",
        "gpus": [{"index": 0, "model": "small (simulated)", "memory_bytes": 13 * MIB}],
        "links": [{"a": "host", "b": "gpu:0", "kind": "pcie4", "gbps": GBPS, "latency_us": 10}],
    }
    path = tmp_path / "small.json"
    path.write_text(json.dumps(topo))
    # No background passes (every step is taken by the test), leases that outlive the test.
    return make_config(
        nats_server,
        tmp_path,
        devices="sim:1",
        topology=str(path),
        autoscale_interval_s=HOUR,
        reclaim_interval_s=HOUR,
        node_ttl_s=60.0,
    )


@dataclass
class Node:
    """The memory service and the tensor store of one node, and model files to play with."""

    config: Config
    memory: MemoryService
    store: TensorStoreService
    models: Path

    def source(self, name: str, mib: int = 4) -> ModelSource:
        """A model of ``mib`` MiB with its own tensor (a distinct content per name)."""
        d = self.models / name
        if not d.exists():
            d.mkdir(parents=True)
            seed = float(sum(map(ord, name)))
            tensor = torch.full((mib * MIB // 4,), seed, dtype=torch.float32)
            safetensors.torch.save_file({"w": tensor}, str(d / "model.safetensors"))
        return ModelSource(path=str(d))

    async def ask(self, service: str, verb: str, msg: Msg, reply: type[Any]) -> Any:
        subject = subjects.node(NODE, service, verb)
        return await request(self.store.nc, subject, msg, reply, timeout=10)

    async def leased(self, name: str) -> RegisterReply:
        """An instance's registration: the model's copies on gpu:0, leased."""
        req = RegisterRequest(
            source=self.source(name), lease=f"l-{name}", holder="test", device="gpu:0"
        )
        reply: RegisterReply = await self.ask(
            "tensorstore", subjects.TENSORSTORE_REGISTER, req, RegisterReply
        )
        return reply

    async def idle(self, name: str) -> None:
        """A model whose instance came and went: its copies stay on gpu:0, idle."""
        await self.leased(name)
        await self.ask(
            "tensorstore",
            subjects.TENSORSTORE_RELEASE,
            ReleaseRequest(lease=f"l-{name}"),
            ReleaseReply,
        )

    async def item(self, name: str) -> str:
        """The store's item for a model (its key of the model file)."""
        ask = ResidencyRequest(models=[ModelQuery(source=self.source(name))])
        reply = await self.ask("tensorstore", subjects.TENSORSTORE_RESIDENCY, ask, ResidencyReply)
        return str(reply.models[0].item)

    async def resident(self) -> dict[str, bool]:
        """Models complete on gpu:0, by name: whether leased."""
        reply = await self.ask(
            "tensorstore", subjects.TENSORSTORE_RESIDENCY, ResidencyRequest(), ResidencyReply
        )
        (gpu,) = reply.devices
        return {Path(m.file).parent.name: m.leased for m in gpu.models}

    async def view(self, at: float, *entries: QueueEntry) -> None:
        """A scheduler replica's queue view, sent as it publishes one (asked, to know it landed)."""
        view = QueueView(replica="sched-1", node=NODE, at=at, entries=list(entries))
        ack = await self.ask("memory", subjects.MEMORY_QUEUE_VIEW, view, MemViewAck)
        assert ack == MemViewAck(accepted=True)

    def entry(
        self,
        name: str,
        *,
        queued: int = 0,
        running: int = 0,
        deadline: float | None = None,
        mib: int = 4,
    ) -> QueueEntry:
        return QueueEntry(
            function=f"default/f{name}",
            model=self.source(name, mib),
            queued=queued,
            running=running,
            next_deadline=deadline,
        )

    async def events(self, kind: str) -> int:
        """How many ``kind`` events the EVENTS stream holds."""
        subject = subjects.event(kind)
        info = await self.store.js.stream_info(EVENTS_STREAM, subjects_filter=subject)
        return (info.state.subjects or {}).get(subject, 0)


@pytest.fixture
async def node(config: Config, tmp_path: Path) -> AsyncIterator[Node]:
    memory, store = MemoryService(config), TensorStoreService(config)
    await memory.start()
    await store.start()
    n = Node(config, memory, store, tmp_path / "models")
    yield n
    await n.store.stop()
    await n.memory.stop()


async def next_data(sub: Subscription) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((await sub.next_msg(timeout=5)).data)["data"]
    return data


async def test_unneeded_copies_go_first_and_leased_ones_never(node: Node) -> None:
    evicted = await node.store.nc.subscribe(subjects.event("memory.evicted"))
    pressure = await node.store.nc.subscribe(subjects.event("memory.pressure"))
    await node.leased("a")  # a warm instance: its copies are leased
    await node.idle("b")  # least recently used, but a queued request needs it (later)
    await node.idle("c")  # used more recently, and no queued request needs it
    assert await node.resident() == {"a": True, "b": False, "c": False}  # 12 of 13 MiB
    t = time.time()

    # D is due now (head of the queue) and needs 4 MiB: C goes, not B, never A.
    await node.view(
        t,
        node.entry("a", queued=1000, running=1, deadline=t + 1),
        node.entry("d", queued=1, deadline=t + 0.5),
        node.entry("b", queued=1),
    )
    done = await node.memory.reconcile_once(t)
    assert [(e.item, e.reason) for e in done.evict] == [(await node.item("c"), "unneeded")]
    assert [p.item for p in done.prefetch] == [await node.item("d")]
    assert await node.resident() == {"a": True, "b": False, "d": False}
    ev = await next_data(evicted)
    assert (ev["device"], ev["bytes"], ev["reason"]) == ("gpu:0", MODEL_BYTES, "unneeded")
    assert (await next_data(pressure))["device"] == "gpu:0"
    again = await node.memory.reconcile_once(t)  # idempotent: nothing left to do
    assert again.empty
    assert not again.pressure

    # E is due; D right after it, B much later: B (needed latest) goes, D stays.
    t1 = t + 1
    await node.view(
        t1,
        node.entry("e", queued=1, deadline=t1 + 0.5),
        node.entry("d", queued=1, deadline=t1 + 0.6),
        node.entry("a", queued=1000, running=1, deadline=t1 + 1),
        node.entry("b", queued=1),
    )
    done = await node.memory.reconcile_once(t1)
    assert [(e.item, e.reason) for e in done.evict] == [(await node.item("b"), "needed-later")]
    assert done.evict[0].needed_at_s == pytest.approx(t1 + 1002 * TYPICAL_COMPUTE_S)
    assert [p.item for p in done.prefetch] == [await node.item("e")]
    assert await node.resident() == {"a": True, "d": False, "e": False}
    assert (await next_data(evicted))["reason"] == "needed-later"
    assert (await node.memory.reconcile_once(t1)).empty

    # F is due, but every copy is in use (A leased; D and E running): nothing is evicted,
    # the device is announced under pressure.
    t2 = t + 2
    await node.view(
        t2,
        node.entry("d", running=1),
        node.entry("e", running=1),
        node.entry("f", queued=1, deadline=t2 + 0.5),
        node.entry("a", queued=1000, running=1, deadline=t2 + 1),
    )
    done = await node.memory.reconcile_once(t2)
    assert done.empty
    assert done.pressure
    assert await node.resident() == {"a": True, "d": False, "e": False}
    ev = await next_data(pressure)
    # A, D and E: 12 MiB, and F: the size of its file (the store has not read it), of 13 MiB.
    f_bytes = (node.models / "f" / "model.safetensors").stat().st_size
    assert (ev["device"], ev["bytes"]) == ("gpu:0", 12 * MIB + f_bytes - 13 * MIB)
    # The store itself refuses to drop a leased copy.
    refused = await node.ask(
        "tensorstore",
        subjects.TENSORSTORE_EVICT,
        EvictModelRequest(device="gpu:0", item=await node.item("a")),
        EvictModelReply,
    )
    assert refused == EvictModelReply(evicted=False, nbytes=0, reason="leased")
    # The model cache, as published for placement: what gpu:0 holds now.
    entry = await node.memory.buckets.memory.get(f"{NODE}.gpu0.m")
    assert entry.value is not None
    cache = decode_json(entry.value, ModelCache)
    assert sorted(Path(m.file).parent.name for m in cache.models) == ["a", "d", "e"]


async def test_an_evicted_model_comes_back_before_its_request_starts(node: Node) -> None:
    prefetched = await node.store.nc.subscribe(subjects.event("memory.prefetched"))
    await node.leased("a")
    await node.idle("c")  # least recently used: evicted first below
    await node.idle("b")
    t = time.time()
    await node.view(
        t,
        node.entry("a", queued=1000, running=1, deadline=t + 9),
        node.entry("d", queued=1, deadline=t + 0.5),
    )
    done = await node.memory.reconcile_once(t)
    assert [e.item for e in done.evict] == [await node.item("c")]
    assert await node.resident() == {"a": True, "b": False, "d": False}
    await next_data(prefetched)  # D's

    # C is queued behind A's 1000 requests, its deadline at t + 10: it must start by
    # t + 10 - one typical compute; until its lead time before that, nothing moves.
    starts = t + 10 - TYPICAL_COMPUTE_S
    view = (
        node.entry("a", queued=1000, running=1, deadline=t + 9),
        node.entry("c", queued=1, deadline=t + 10),
    )
    await node.view(t + 5, *view)
    assert (await node.memory.reconcile_once(t + 5)).empty
    assert "c" not in await node.resident()

    now = starts - LEAD_S + 0.01  # within the lead time: the copy starts now
    await node.view(now, *view)
    done = await node.memory.reconcile_once(now)
    assert [p.item for p in done.prefetch] == [await node.item("c")]
    assert [(e.item, e.reason) for e in done.evict] == [(await node.item("b"), "unneeded")]
    assert await node.resident() == {"a": True, "c": False, "d": False}
    ev = await next_data(prefetched)
    assert (ev["device"], ev["bytes"], ev["function"]) == ("gpu:0", MODEL_BYTES, "default/fc")
    assert ev["needed_at"] == pytest.approx(starts)
    assert ev["needed_at"] > now  # resident before the request starts
    assert ev["lead_s"] == pytest.approx(LEAD_S)
    assert (await node.memory.reconcile_once(now)).empty


async def mem_stats(node: Node, memory: MemoryService) -> MemStatsReply:
    subject = subjects.node(NODE, "memory", subjects.MEMORY_STATS)
    return await request(memory.nc, subject, MemStatsRequest(), MemStatsReply, timeout=5)


async def test_a_restarted_manager_decides_as_before_and_repeats_nothing(node: Node) -> None:
    await node.leased("a")
    await node.idle("b")
    t = time.time()
    view = (
        node.entry("a", queued=1000, running=1, deadline=t + 9),
        node.entry("g", queued=1, deadline=t + 9.5, mib=16),  # can never fit: 16 > 13 MiB
        node.entry("c", queued=1, deadline=t + 10),
    )  # never registered on this node
    await node.view(t, *view)
    done = await node.memory.reconcile_once(t)
    assert [r.function for r in done.rejected] == ["default/fg"]
    assert not done.evict
    assert not done.prefetch  # C is not due yet
    counts = {k: await node.events(k) for k in ("memory.rejected", "memory.residency")}
    assert counts == {"memory.rejected": 1, "memory.residency": 1}
    before = await mem_stats(node, node.memory)

    await node.memory.stop()
    node.memory = MemoryService(node.config)
    await node.memory.start()
    assert await mem_stats(node, node.memory) == before  # the pools, the store's blocks in them
    assert (await node.memory.reconcile_once(t)).empty  # nothing decided twice...
    counts_after = {k: await node.events(k) for k in ("memory.rejected", "memory.residency")}
    assert counts_after == counts  # ...nor announced twice

    # No view arrived since the restart: the one kept in KV still brings C in on time.
    starts = t + 10 - TYPICAL_COMPUTE_S
    now = starts - LEAD_S + 0.01
    done = await node.memory.reconcile_once(now)
    assert [p.request for p in done.prefetch] == ["default/fc"]
    assert not done.evict  # A, B and C fit: 12 MiB and C's few header bytes
    assert await node.resident() == {"a": True, "b": False, "c": False}
    assert (await node.memory.reconcile_once(now)).empty


async def test_a_working_set_bigger_than_the_gpu_is_rejected_with_a_reason(node: Node) -> None:
    rejected = await node.store.nc.subscribe(subjects.event("memory.rejected"))
    await node.idle("b")
    t = time.time()
    await node.view(t, node.entry("g", queued=3, deadline=t + 0.5, mib=16))
    done = await node.memory.reconcile_once(t)
    (r,) = done.rejected
    assert (r.device, r.function, r.capacity_bytes) == ("gpu:0", "default/fg", 13 * MIB)
    assert r.working_set_bytes > 16 * MIB  # the file's size: the store never read it
    assert not done.evict  # no thrashing: B stays, nothing is copied
    assert not done.prefetch
    assert await node.resident() == {"b": False}
    ev = await next_data(rejected)
    assert (ev["device"], ev["function"], ev["tenant"]) == ("gpu:0", "default/fg", "default")
    assert "exceeds the capacity of gpu:0" in ev["reason"]
    key = f"{NODE}.gpu0.r.default-fg"
    entry = await node.memory.buckets.memory.get(key)
    assert entry.value is not None
    assert decode_json(entry.value, MemRejection).function == "default/fg"
    assert (await node.memory.reconcile_once(t)).empty
    assert await node.events("memory.rejected") == 1  # announced once

    await node.view(t + 1)  # its queue drained: the rejection is forgotten
    await node.memory.reconcile_once(t + 1)
    assert "default/fg" not in {f for _, f in node.memory.residency.book.rejected}


async def test_the_store_verbs_are_typed_and_all_or_nothing(node: Node) -> None:
    await node.leased("a")
    await node.leased("b")
    await node.leased("c")  # 12 of 13 MiB, all leased
    with pytest.raises(ResourceExhausted, match="gpu:0"):  # a prefetch never evicts
        await node.ask(
            "tensorstore",
            subjects.TENSORSTORE_PREFETCH,
            PrefetchRequest(device="gpu:0", source=node.source("d")),
            PrefetchReply,
        )
    assert await node.resident() == {"a": True, "b": True, "c": True}
    store_stats = node.store.tiers["gpu:0"].stats()
    assert store_stats.bytes_stored == 3 * MODEL_BYTES  # nothing of D left behind
    with pytest.raises(InvalidArgument) as err:
        await node.ask(
            "tensorstore",
            subjects.TENSORSTORE_PREFETCH,
            PrefetchRequest(device="gpu:7", source=node.source("d")),
            PrefetchReply,
        )
    assert err.value.field == "device"
    with pytest.raises(NotFound) as missing:
        await node.ask(
            "tensorstore",
            subjects.TENSORSTORE_EVICT,
            EvictModelRequest(device="gpu:0", item="0" * 32),
            EvictModelReply,
        )
    assert missing.value.field == "item"
    # Released, B can go; twice is a no-op; a prefetch of A (resident) copies nothing.
    await node.ask(
        "tensorstore", subjects.TENSORSTORE_RELEASE, ReleaseRequest(lease="l-b"), ReleaseReply
    )
    b = await node.item("b")
    gone = await node.ask(
        "tensorstore",
        subjects.TENSORSTORE_EVICT,
        EvictModelRequest(device="gpu:0", item=b),
        EvictModelReply,
    )
    assert gone == EvictModelReply(evicted=True, nbytes=MODEL_BYTES)
    again = await node.ask(
        "tensorstore",
        subjects.TENSORSTORE_EVICT,
        EvictModelRequest(device="gpu:0", item=b),
        EvictModelReply,
    )
    assert again == EvictModelReply(evicted=False, nbytes=0, reason="not resident")
    placed = await node.ask(
        "tensorstore",
        subjects.TENSORSTORE_PREFETCH,
        PrefetchRequest(device="gpu:0", source=node.source("a")),
        PrefetchReply,
    )
    assert (placed.item, placed.bytes_copied) == (await node.item("a"), 0)
    placed = await node.ask(
        "tensorstore",
        subjects.TENSORSTORE_PREFETCH,
        PrefetchRequest(device="gpu:0", source=node.source("d")),
        PrefetchReply,
    )
    assert placed.bytes_copied == MODEL_BYTES  # into B's room, given back to the pool
    assert await node.resident() == {"a": True, "c": True, "d": False}


# --- tube copies as items of the policy ---------------------------------------------------


@pytest.fixture
async def with_transfer(node: Node) -> AsyncIterator[TransferService]:
    """The node's transfer service too: tube copies on gpu:0 take blocks of the pool."""
    transfer = TransferService(node.config)
    await transfer.start()
    yield transfer
    await transfer.stop()


async def gpu_tube(node: Node, data: bytes, *, host_copy: bool) -> Tube:
    """A tube with a copy on gpu:0: copied there from its host file (``host_copy``), or a
    worker's output adopted onto the GPU (its only copy)."""
    tube = await asyncio.to_thread(
        write_tube,
        node.config.shm_dir,
        NODE,
        "default",
        datatype="UINT8",
        shape=[len(data)],
        data=data,
    )
    if host_copy:
        await node.store.buckets.tubes.put(tube.id, encode_json(tube))
        reply = await node.ask(
            "transfer",
            subjects.TRANSFER_ENSURE,
            EnsureRequest(tube_id=tube.id, tier="gpu:0"),
            EnsureReply,
        )
        return reply.tube  # type: ignore[no-any-return]
    adopted = await node.ask(
        "transfer", subjects.TRANSFER_ADOPT, AdoptRequest(tube=tube, tier="gpu:0"), AdoptReply
    )
    return adopted.tube  # type: ignore[no-any-return]


async def stored_tube(node: Node, tube_id: str) -> Tube:
    entry = await node.store.buckets.tubes.get(tube_id)
    assert entry.value is not None
    return decode_json(entry.value, Tube)


def read_copy(node: Node, at: Placement, nbytes: int) -> bytes:
    with (node.config.shm_dir / at.segment).open("rb") as f:
        return os.pread(f.fileno(), nbytes, at.offset)


def reading(tube: Tube, position: int = 0) -> QueuedTube:
    return QueuedTube(id=tube.id, tenant=tube.tenant, nbytes=tube.nbytes, position=position)


async def test_an_unneeded_tube_copy_is_swapped_to_the_host_before_a_needed_one(
    node: Node, with_transfer: TransferService
) -> None:
    evicted = await node.store.nc.subscribe(subjects.event("memory.evicted"))
    await node.leased("a")  # 4 MiB, leased
    x_bytes, y_bytes = os.urandom(3 * MIB), os.urandom(3 * MIB)
    y = await gpu_tube(node, y_bytes, host_copy=True)  # the input of a queued request
    x = await gpu_tube(node, x_bytes, host_copy=False)  # a finished step's output: GPU only
    x_gpu = node.config.shm_dir / x.placements[0].segment
    # What evicting each would copy to the host: all of X (its only copy), none of Y.
    swaps = {i: swap for (_, _), (i, _, swap) in node.memory.ledger.items.items()}
    assert swaps == {tube_item(x.id): len(x_bytes), tube_item(y.id): 0}
    t = time.time()
    # D (4 MiB) is due now: 4 + 3 + 3 + 4 > 13 MiB. X goes (no queued request reads it),
    # not Y (queued fb's next request reads it), never A (leased).
    await node.view(
        t,
        node.entry("a", queued=5, running=1, deadline=t + 1),
        msgspec.structs.replace(node.entry("b", queued=1, deadline=t + 2), tubes=[reading(y)]),
        node.entry("d", queued=1, deadline=t + 0.5),
    )
    done = await node.memory.reconcile_once(t)
    assert [(e.item, e.reason) for e in done.evict] == [(tube_item(x.id), "unneeded")]
    assert [p.item for p in done.prefetch] == [await node.item("d")]
    ev = await next_data(evicted)
    assert (ev["what"], ev["tube"], ev["bytes"], ev["swapped_bytes"]) == (
        "tube copy",
        x.id,
        3 * MIB,
        3 * MIB,
    )
    # Swapped: its bytes now on the node's host tier, its GPU copy and block gone.
    (host,) = (await stored_tube(node, x.id)).placements
    assert host.tier == "host"
    assert host.segment.startswith(f"hostpool/{NODE}/")  # a block of the host tier's pool
    assert read_copy(node, host, len(x_bytes)) == x_bytes
    assert not x_gpu.exists()
    items = {
        d: {i for (dev, _), (i, _, _) in node.memory.ledger.items.items() if dev == d}
        for d in ("gpu:0", "host")
    }
    assert items == {"gpu:0": {tube_item(y.id)}, "host": {tube_item(x.id)}}
    assert {p.tier for p in (await stored_tube(node, y.id)).placements} == {"host", "gpu:0"}
    assert (await node.memory.reconcile_once(t)).empty  # idempotent

    # Now a queued request reads X: it comes back to gpu:0 before the request starts.
    prefetched = await node.store.nc.subscribe(subjects.event("memory.prefetched"))
    t1 = t + 1
    await node.view(
        t1,
        node.entry("a", queued=5, running=1, deadline=t1 + 9),
        msgspec.structs.replace(
            node.entry("c", queued=2, deadline=t1 + 0.5), tubes=[reading(y, 1)]
        ),
        msgspec.structs.replace(node.entry("b", queued=1, deadline=t1 + 0.5), tubes=[reading(x)]),
    )
    done = await node.memory.reconcile_once(t1)
    assert tube_item(x.id) in [p.item for p in done.prefetch]
    ev = await next_data(prefetched)
    while ev["item"] != tube_item(x.id):
        ev = await next_data(prefetched)
    assert (ev["what"], ev["bytes_copied"]) == ("tube", 3 * MIB)
    back = await stored_tube(node, x.id)
    gpu = next(p for p in back.placements if p.tier == "gpu:0")
    assert read_copy(node, gpu, len(x_bytes)) == x_bytes


async def test_a_tube_release_is_typed_and_refused_when_there_is_nothing_to_release(
    node: Node, with_transfer: TransferService
) -> None:
    tube = await gpu_tube(node, b"x" * 1000, host_copy=True)
    release = TubeReleaseRequest(tube_id=tube.id, tier="gpu:0")
    ask = node.ask
    done = await ask("transfer", subjects.TRANSFER_RELEASE, release, TubeReleaseReply)
    # It had a host copy; the tube's tenant comes back for the memory.evicted event.
    assert done == TubeReleaseReply(released=True, nbytes=1000, swapped_bytes=0, tenant=tube.tenant)
    again = await ask("transfer", subjects.TRANSFER_RELEASE, release, TubeReleaseReply)
    assert again == TubeReleaseReply(released=False, reason="not resident")
    unknown = TubeReleaseRequest(tube_id="0" * 24, tier="gpu:0")  # well-formed, unknown
    gone = await ask("transfer", subjects.TRANSFER_RELEASE, unknown, TubeReleaseReply)
    assert gone == TubeReleaseReply(released=False, reason="unknown tube")
    for tier in ("host", "gpu:9"):
        with pytest.raises(InvalidArgument) as err:
            await ask(
                "transfer",
                subjects.TRANSFER_RELEASE,
                TubeReleaseRequest(tube_id=tube.id, tier=tier),
                TubeReleaseReply,
            )
        assert err.value.field == "tier"
    assert not node.memory.ledger.items  # its block went back to the pool


async def test_swapped_copies_live_in_the_host_pool_across_restarts_until_their_tube_goes(
    node: Node, with_transfer: TransferService
) -> None:
    data = os.urandom(3 * MIB + 7)
    x = await gpu_tube(node, data, host_copy=False)  # its only copy is on gpu:0
    release = TubeReleaseRequest(tube_id=x.id, tier="gpu:0")

    # A full host pool refuses the swap: a 507, and the GPU copy stays where it was.
    assert node.memory.host_pool is not None
    node.memory.host_pool.capacity = 4 * MIB
    filler = await node.memory.alloc(MemAllocRequest(device="host", nbytes=2 * MIB, owner="t"))
    with pytest.raises(ResourceExhausted, match="host"):
        await node.ask("transfer", subjects.TRANSFER_RELEASE, release, TubeReleaseReply)
    assert [p.tier for p in (await stored_tube(node, x.id)).placements] == ["gpu:0"]
    await node.memory.free(MemFreeRequest(device="host", id=filler.id))

    done = await node.ask("transfer", subjects.TRANSFER_RELEASE, release, TubeReleaseReply)
    assert done.swapped_bytes == len(data)
    (host,) = (await stored_tube(node, x.id)).placements

    # The memory manager restarts: the pool's segment file, and the bytes in it, stay.
    await node.memory.stop()
    node.memory = MemoryService(node.config)
    await node.memory.start()
    assert node.memory.host_pool is not None
    (block,) = node.memory.host_pool.allocations()
    assert (block.offset, block.nbytes) == (host.offset, len(data))
    assert read_copy(node, host, len(data)) == data

    # The tube leaves the directory: the sweeper gives its block back (not before).
    await with_transfer.sweep_once(time.time())  # still listed, and young: kept
    assert node.memory.host_pool.allocations()
    await node.store.buckets.tubes.delete(x.id)
    swept = await with_transfer.sweep_once(time.time() + SWEEP_GRACE_S + 1)
    assert x.id in swept
    assert node.memory.host_pool.allocations() == []
    # Its segment, empty past the keep-alive, goes back; the transfer service lets go of
    # its mapping at the next sweep (a mapping would keep the pages alive).
    later = time.time() + node.config.tensor_keep_alive_s + 1
    await node.memory.reconcile_once(later)
    assert not (node.config.shm_dir / host.segment).exists()
    await with_transfer.sweep_once(later)
    assert host.segment not in with_transfer.maps._maps
