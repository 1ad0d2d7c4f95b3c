"""The residency pass's state and its carrying out, with in-process stores and fake peers
(no NATS): views, rejections announced once, the model cache, pressure, and the order
evictions and prefetches run in."""

from __future__ import annotations

from typing import Any

import pytest

from gpufaas.memory import planner, policy
from gpufaas.memory.holds import Holds
from gpufaas.memory.records import DictStore, MemoryKeys
from gpufaas.memory.residency import ResidencyBook
from gpufaas.memory.residency_pass import ResidencyPass
from gpufaas.shared.errors import Unavailable
from gpufaas.shared.messages import (
    CachedModel,
    DeviceResidency,
    EnsureReply,
    EnsureRequest,
    EvictModelReply,
    EvictModelRequest,
    MemRejection,
    ModelCache,
    ModelSource,
    PrefetchReply,
    PrefetchRequest,
    QueueView,
    ResidencyReply,
    ResidencyRequest,
    ResidentModel,
    TubeReleaseReply,
    TubeReleaseRequest,
)
from tests.unit.test_memory_ledger import MIB, NODE, Node

pytestmark = pytest.mark.unit


def book() -> ResidencyBook:
    return ResidencyBook(
        MemoryKeys(NODE), DictStore(), DictStore(), DictStore(), max_view_age_s=10.0
    )


def view(replica: str, at: float) -> QueueView:
    return QueueView(replica=replica, node=NODE, at=at, entries=[])


def rejected(fn: str, nbytes: int) -> policy.Rejected:
    return policy.Rejected("gpu:0", fn, fn, nbytes, 64 * MIB, "too big")


async def test_views_keep_the_latest_per_replica_and_age_out() -> None:
    b = book()
    assert await b.accept(view("s1", 5.0))
    assert not await b.accept(view("s1", 4.0))  # out of order
    assert await b.accept(view("s2", 1.0))
    assert await b.view_records.keys() == [f"{NODE}.v.s1", f"{NODE}.v.s2"]
    assert [v.replica for v in await b.fresh_views(12.0)] == ["s1"]
    assert await b.view_records.keys() == [f"{NODE}.v.s1"]


async def test_a_rejection_is_announced_once_and_forgotten_when_it_goes() -> None:
    b = book()
    assert await b.settle_rejections([rejected("t.f", 80 * MIB)], 1.0) == [
        rejected("t.f", 80 * MIB)
    ]
    assert await b.settle_rejections([rejected("t.f", 80 * MIB)], 2.0) == []
    key = f"{NODE}.gpu0.r.t-f"  # the key of the older spelling (t/f) too
    record = await b.rejection_records.value(key)
    assert isinstance(record, MemRejection)
    assert (record.function, record.at) == ("t.f", 1.0)
    assert len(await b.settle_rejections([rejected("t.f", 90 * MIB)], 3.0)) == 1  # grew
    assert await b.settle_rejections([], 4.0) == []
    assert b.rejected == {}
    assert await b.rejection_records.keys() == []


async def test_the_cache_is_published_when_it_changes_and_pressure_once() -> None:
    b = book()
    models = [CachedModel(item="m", nbytes=MIB, leased=False)]
    cache = ModelCache(node=NODE, device="gpu:0", at=1.0, models=models)
    assert await b.publish_cache(cache)
    assert not await b.publish_cache(ModelCache(node=NODE, device="gpu:0", at=2.0, models=models))
    assert b.press("gpu:0", True)
    assert not b.press("gpu:0", True)
    assert not b.press("gpu:0", False)
    assert b.press("gpu:0", True)


async def test_a_restarted_book_reads_back_views_rejections_and_caches() -> None:
    old = book()
    await old.accept(view("s1", 5.0))
    await old.settle_rejections([rejected("t.f", 80 * MIB)], 1.0)
    models = [CachedModel(item="m", nbytes=MIB, leased=True)]
    await old.publish_cache(ModelCache(node=NODE, device="gpu:0", at=1.0, models=models))
    new = ResidencyBook(
        old.keys,
        old.view_records,
        old.rejection_records,
        old.cache_records,
        max_view_age_s=10.0,
    )
    keys = sorted(
        [
            *await old.view_records.keys(),
            *await old.rejection_records.keys(),
            *await old.cache_records.keys(),
        ]
    )
    await new.restore(keys, ["gpu:0", "host"])
    assert list(new.views) == ["s1"]
    assert list(new.rejected) == [("gpu:0", "t.f")]
    assert new.cache == {"gpu:0": models}


class Peers:
    """The tensor store and the transfer service, as scripted replies."""

    def __init__(self) -> None:
        self.calls: list[Any] = []
        self.evict_reply = EvictModelReply(evicted=True, nbytes=MIB)
        self.release_reply = TubeReleaseReply(released=True, nbytes=MIB, swapped_bytes=MIB)
        self.prefetch_error: Exception | None = None
        self.models: list[ResidentModel] = []

    async def residency(self, req: ResidencyRequest) -> ResidencyReply:
        self.calls.append(req)
        dev = DeviceResidency(
            device="gpu:0", capacity_bytes=64 * MIB, used_bytes=0, models=self.models
        )
        return ResidencyReply(node=NODE, owner="store", devices=[dev], models=[])

    async def evict_model(self, req: EvictModelRequest) -> EvictModelReply:
        self.calls.append(req)
        return self.evict_reply

    async def prefetch_model(self, req: PrefetchRequest) -> PrefetchReply:
        self.calls.append(req)
        if self.prefetch_error is not None:
            raise self.prefetch_error
        return PrefetchReply(item="m", nbytes=MIB, bytes_copied=MIB, used_bytes=MIB)

    async def release_tube(self, req: TubeReleaseRequest) -> TubeReleaseReply:
        self.calls.append(req)
        return self.release_reply

    async def ensure_tube(self, req: EnsureRequest) -> EnsureReply:
        raise AssertionError("no tube to ensure here")


def residency_pass(peers: Peers) -> tuple[ResidencyPass, list[tuple[str, dict[str, Any]]]]:
    node = Node()
    events: list[tuple[str, dict[str, Any]]] = []

    async def publish(kind: str, data: dict[str, Any]) -> None:
        events.append((kind, data))

    holds = Holds(node.ledger, ["gpu:0"], window_s=10.0, max_request_s=60.0)
    rp = ResidencyPass(node.ledger, holds, book(), peers, publish, h2d_bps={"gpu:0": 1e9})
    return rp, events


def plan_for(fn: str) -> planner.Plan:
    demand = planner.Demand(fn, ModelSource(path="/m"), 1, 0, None)
    return planner.Plan(policy.MemoryState(()), demand_of={fn: demand})


EVICT_A = policy.Evict("gpu:0", "a", MIB, "unneeded", None)
EVICT_B = policy.Evict("gpu:0", "b", MIB, "unneeded", None)
PREFETCH = policy.Prefetch("gpu:0", "m", MIB, "acme.f", 5.0, 0.1)


async def test_evictions_run_first_then_the_prefetches_with_their_events() -> None:
    peers = Peers()
    rp, events = residency_pass(peers)
    actions = policy.Actions(evict=(EVICT_A,), prefetch=(PREFETCH,))
    done = await rp.carry_out(plan_for("acme.f"), actions, now=1.0)
    assert done == ([EVICT_A], [PREFETCH])
    assert [type(c).__name__ for c in peers.calls] == ["EvictModelRequest", "PrefetchRequest"]
    assert peers.calls[1].tenant == "acme"  # the tenant of the function's key
    assert [k for k, _ in events] == ["memory.evicted", "memory.prefetched"]
    assert events[1][1]["early_s"] == 4.0


async def test_an_eviction_refused_for_an_item_in_use_holds_back_the_prefetches() -> None:
    peers = Peers()
    peers.evict_reply = EvictModelReply(evicted=False, nbytes=0, reason="leased")
    rp, events = residency_pass(peers)
    actions = policy.Actions(evict=(EVICT_A, EVICT_B), prefetch=(PREFETCH,))
    assert await rp.carry_out(plan_for("acme.f"), actions, now=1.0) == ([], [])
    assert len(peers.calls) == 1
    assert not events


async def test_an_eviction_of_something_gone_goes_on_and_a_failed_prefetch_stops() -> None:
    peers = Peers()
    peers.evict_reply = EvictModelReply(evicted=False, nbytes=0, reason="not resident")
    peers.prefetch_error = Unavailable("no store")
    rp, events = residency_pass(peers)
    second = policy.Prefetch("gpu:0", "n", MIB, "acme.f", 6.0, 0.1)
    actions = policy.Actions(evict=(EVICT_A, EVICT_B), prefetch=(PREFETCH, second))
    assert await rp.carry_out(plan_for("acme.f"), actions, now=1.0) == ([], [])
    assert [type(c).__name__ for c in peers.calls] == [
        "EvictModelRequest",
        "EvictModelRequest",
        "PrefetchRequest",
    ]
    assert not events


async def test_a_tube_copy_is_released_to_the_host_tier() -> None:
    peers = Peers()
    rp, events = residency_pass(peers)
    tube = policy.Evict("gpu:0", "tube:T1", MIB, "unneeded", None)
    assert await rp.carry_out(plan_for("acme.f"), policy.Actions(evict=(tube,)), 1.0) == (
        [tube],
        [],
    )
    assert peers.calls == [TubeReleaseRequest(tube_id="T1", tier="gpu:0")]
    assert events[0][1]["what"] == "tube copy"
    assert events[0][1]["swapped_bytes"] == MIB
    peers.release_reply = TubeReleaseReply(released=False, reason="copy in flight")
    blocked = policy.Actions(evict=(tube,), prefetch=(PREFETCH,))
    assert await rp.carry_out(plan_for("acme.f"), blocked, 1.0) == ([], [])


async def test_a_pass_with_no_views_publishes_the_model_cache_once() -> None:
    peers = Peers()
    peers.models = [ResidentModel(item="m", nbytes=MIB, last_used=0.0, leased=True)]
    rp, events = residency_pass(peers)
    assert (await rp.run(1.0)).empty
    assert [k for k, _ in events] == ["memory.residency"]
    assert (await rp.run(2.0)).empty
    assert len(events) == 1  # unchanged: not again
    assert rp.book.cache["gpu:0"][0].item == "m"


def test_a_function_s_tenant_is_read_from_either_spelling() -> None:
    assert planner.tenant_of("acme.f") == "acme"
    assert planner.tenant_of("acme/f") == "acme"
    assert planner.tenant_of("") == "default"
