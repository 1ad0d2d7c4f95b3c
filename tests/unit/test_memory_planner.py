"""The memory manager's snapshot: queue views and the store's residency -> policy state."""

from __future__ import annotations

import dataclasses

import msgspec
import pytest

from gpufaas.memory.planner import (
    OTHER_ITEM,
    PINNED,
    TYPICAL_COMPUTE_S,
    Budget,
    build,
    merge_views,
)
from gpufaas.memory.policy import Resident, RunningRequest
from gpufaas.shared.memory_client import tube_item
from gpufaas.shared.messages import (
    DeviceResidency,
    ModelItem,
    ModelSource,
    QueuedTube,
    QueueEntry,
    QueueView,
    ResidencyReply,
    ResidentModel,
)

pytestmark = pytest.mark.unit

MIB = 2**20
NOW = 1000.0


def src(name: str) -> ModelSource:
    return ModelSource(path=f"/models/{name}")


def entry(
    fn: str, *, queued: int = 0, running: int = 0, deadline: float | None = None
) -> QueueEntry:
    return QueueEntry(
        function=f"t1/{fn}", model=src(fn), queued=queued, running=running, next_deadline=deadline
    )


def residency(models: list[ResidentModel], items: list[ModelItem], used: int) -> ResidencyReply:
    gpu = DeviceResidency(device="gpu:0", capacity_bytes=100 * MIB, used_bytes=used, models=models)
    return ResidencyReply(node="n", owner="store", devices=[gpu], models=items)


def budget(foreign: int = 0) -> dict[str, Budget]:
    return {"gpu:0": Budget("gpu:0", 100 * MIB, 10e9, foreign)}


def test_views_of_several_replicas_are_summed_per_function() -> None:
    a = QueueView(replica="r1", node="n", at=NOW, entries=[entry("f", queued=2, deadline=NOW + 5)])
    b = QueueView(
        replica="r2",
        node="n",
        at=NOW,
        entries=[entry("f", queued=3, running=1, deadline=NOW + 2), entry("g")],
    )
    f, g = merge_views([a, b])
    assert (f.function, f.queued, f.running, f.next_deadline) == ("t1/f", 5, 1, NOW + 2)
    assert (g.function, g.tenant, g.next_deadline) == ("t1/g", "t1", None)


def test_expected_starts_follow_the_queue_and_the_deadlines() -> None:
    demands = merge_views(
        [
            QueueView(
                replica="r",
                node="n",
                at=NOW,
                entries=[
                    entry("late", queued=1),  # no deadline: last
                    entry("first", queued=100, deadline=NOW + 1),
                    entry(
                        "capped", queued=1, deadline=NOW + 2
                    ),  # behind 100, but due by its deadline
                    entry("idle", running=1),  # nothing queued: not in the queue
                ],
            )
        ]
    )
    items = [ModelItem(item=d.function.split("/")[1], nbytes=MIB, known=True) for d in demands]
    plan = build(NOW, demands, residency([], items, 0), budget())
    (gpu,) = plan.state.devices
    starts = {q.id: q.expected_start_s for q in gpu.queue}
    assert [q.id for q in gpu.queue] == ["t1/first", "t1/capped", "t1/late"]
    assert starts["t1/first"] == pytest.approx(NOW)
    assert starts["t1/capped"] == pytest.approx(NOW + 2 - TYPICAL_COMPUTE_S)  # not NOW + 5
    assert starts["t1/late"] == pytest.approx(NOW + 101 * TYPICAL_COMPUTE_S)
    assert plan.demand_of["t1/first"].source == src("first")
    assert gpu.running == (RunningRequest(PINNED, ("idle",)),)


def test_bytes_that_are_not_models_are_pinned_and_shared_tensors_not_counted_twice() -> None:
    models = [
        ResidentModel(item="m", nbytes=10 * MIB, last_used=1.0, leased=False),
        ResidentModel(item="k", nbytes=5 * MIB, last_used=2.0, leased=True),
    ]
    # 3 MiB of the store's copies belong to no complete model; 7 MiB are other owners' blocks.
    plan = build(NOW, [], residency(models, [], 18 * MIB), budget(foreign=7 * MIB))
    (gpu,) = plan.state.devices
    assert {r.id: r.nbytes for r in gpu.resident} == {
        "m": 10 * MIB,
        "k": 5 * MIB,
        OTHER_ITEM: 10 * MIB,
    }
    assert gpu.running == (RunningRequest(PINNED, (OTHER_ITEM, "k")),)
    assert gpu.capacity_bytes == 100 * MIB
    # Two models sharing 4 MiB of tensors: 12 MiB stored, 16 MiB counted; 4 MiB given back.
    shared = [
        ResidentModel(item="m", nbytes=8 * MIB, last_used=1.0, leased=False),
        ResidentModel(item="v", nbytes=8 * MIB, last_used=2.0, leased=False),
    ]
    (gpu,) = build(NOW, [], residency(shared, [], 12 * MIB), budget()).state.devices
    assert gpu.capacity_bytes == 104 * MIB
    assert OTHER_ITEM not in {r.id for r in gpu.resident}
    assert gpu.running == ()


def test_a_function_runs_where_its_model_is_leased_and_unknown_models_are_skipped() -> None:
    demands = merge_views(
        [
            QueueView(
                replica="r",
                node="n",
                at=NOW,
                entries=[
                    entry("f", queued=1, running=1),
                    entry("gone", queued=1),
                ],
            )
        ]
    )
    items = [
        ModelItem(item="mf", nbytes=MIB, known=True),
        ModelItem(item="", nbytes=0, known=False, error="no such model"),
    ]
    gpu1 = DeviceResidency(
        device="gpu:1",
        capacity_bytes=100 * MIB,
        used_bytes=MIB,
        models=[ResidentModel(item="mf", nbytes=MIB, last_used=1.0, leased=True)],
    )
    reply = ResidencyReply(node="n", owner="s", devices=[gpu1], models=items)
    budgets = {d: Budget(d, 100 * MIB, 10e9, 0) for d in ("gpu:0", "gpu:1")}
    plan = build(NOW, demands, reply, budgets)
    assert plan.device_of == {"t1/f": "gpu:1"}
    assert plan.unresolved == {"t1/gone": "no such model"}
    gpu0, gpu1_state = plan.state.devices
    assert gpu0.queue == ()
    assert [q.id for q in gpu1_state.queue] == ["t1/f"]
    assert gpu1_state.running == (RunningRequest(PINNED, ("mf",)),)
    # A worker's report of a running request pins the function to its GPU.
    plan = build(NOW, demands, reply, budgets, running_on={"t1/f": "gpu:0"})
    assert plan.device_of == {"t1/f": "gpu:0"}
    # The GPU placement chose for its instance (the queue view says) before the copies'.
    placed = [dataclasses.replace(d, device="gpu:0") for d in demands]
    assert build(NOW, placed, reply, budgets).device_of == {"t1/f": "gpu:0"}


def test_the_queue_ahead_counts_each_functions_profiled_time() -> None:
    from gpufaas.memory.planner import Budget, Demand, _queue  # noqa: PLC0415
    from gpufaas.shared.messages import ModelItem, ModelSource  # noqa: PLC0415

    src = ModelSource(builtin="all-minilm-l6-v2")
    first = Demand("t/a", src, queued=10, running=0, next_deadline=100.0, compute_s=0.2)
    second = Demand("t/b", src, queued=1, running=0, next_deadline=None)
    items = [ModelItem(item="a", nbytes=1, known=True), ModelItem(item="b", nbytes=1, known=True)]
    budget = Budget("gpu:0", capacity_bytes=100, h2d_bps=1e9, foreign_bytes=0)
    q = _queue(0.0, [(first, items[0]), (second, items[1])], 0.05, budget)
    assert [r.expected_start_s for r in q] == [0.0, 2.0]  # 10 requests x 0.2 s ahead of b


def tube(tid: str, position: int, mib: int = 1) -> QueuedTube:
    return QueuedTube(id=tid, tenant="t1", nbytes=mib * MIB, position=position)


def test_input_tubes_are_items_of_the_request_at_their_position() -> None:
    one = QueueView(
        replica="r1",
        node="n",
        at=NOW,
        entries=[
            msgspec.structs.replace(
                entry("f", queued=3, deadline=NOW + 5), tubes=[tube("x", 0), tube("y", 2)]
            )
        ],
    )
    two = QueueView(
        replica="r2",
        node="n",
        at=NOW,
        entries=[
            msgspec.structs.replace(
                entry("f", queued=1, deadline=NOW + 5), tubes=[tube("y", 0), tube("late", 9)]
            )
        ],
    )
    (f,) = merge_views([one, two])
    assert [(t.id, t.position) for t in f.tubes] == [("x", 0), ("y", 0), ("late", 9)]
    resident_tube = Resident(tube_item("old"), 2 * MIB, 5.0)  # a block of the pool, no reader
    budgets = {"gpu:0": Budget("gpu:0", 100 * MIB, 10e9, 0, (resident_tube,))}
    item = ModelItem(item="f", nbytes=10 * MIB, known=True)
    plan = build(NOW, [f], residency([], [item], 0), budgets)
    (gpu,) = plan.state.devices
    (q,) = gpu.queue  # "late" is past the 4 queued requests: not an item
    assert [i.id for i in q.items] == ["f", tube_item("x"), tube_item("y")]
    assert plan.tube_of[tube_item("x")].tenant == "t1"
    assert resident_tube in gpu.resident
    assert gpu.running == ()  # tube copies are movable, not pinned

    # A later position is a request of its own, expected that many requests later.
    later = dataclasses.replace(f, tubes=(tube("x", 0), tube("z", 2)))
    (gpu,) = build(NOW, [later], residency([], [item], 0), budgets).state.devices
    assert [(q.id, [i.id for i in q.items]) for q in gpu.queue] == [
        ("t1/f", ["f", tube_item("x")]),
        ("t1/f#2", ["f", tube_item("z")]),
    ]
    assert gpu.queue[1].expected_start_s == pytest.approx(NOW + 2 * TYPICAL_COMPUTE_S)
    assert plan.demand_of["t1/f"].function == "t1/f"

    # A tube a request sent to the node reads is pinned, not a queued item.
    sent = dataclasses.replace(f, tubes=(msgspec.structs.replace(tube("x", 0), running=True),))
    (gpu,) = build(NOW, [sent], residency([], [item], 0), budgets).state.devices
    assert [[i.id for i in q.items] for q in gpu.queue] == [["f"]]
    assert gpu.running == (RunningRequest(PINNED, (tube_item("x"),)),)
    both = merge_views(
        [
            QueueView(
                replica="r1",
                node="n",
                at=NOW,
                entries=[msgspec.structs.replace(entry("f", queued=1), tubes=[tube("x", 0)])],
            ),
            QueueView(
                replica="r2",
                node="n",
                at=NOW,
                entries=[
                    msgspec.structs.replace(
                        entry("f", running=1),
                        tubes=[msgspec.structs.replace(tube("x", 3), running=True)],
                    )
                ],
            ),
        ]
    )
    assert [(t.id, t.running) for t in both[0].tubes] == [("x", True)]

    # Tubes that do not fit beside the model are read from the host: never a rejection.
    big = dataclasses.replace(f, tubes=(tube("huge", 0, mib=95),))
    (gpu,) = build(NOW, [big], residency([], [item], 0), budgets).state.devices
    assert [[i.id for i in q.items] for q in gpu.queue] == [["f"]]
