"""The memory manager's snapshot: queue views and the store's residency -> policy state."""

from __future__ import annotations

import pytest

from gpufaas.memory.planner import (
    OTHER_ITEM,
    PINNED,
    TYPICAL_COMPUTE_S,
    Budget,
    build,
    merge_views,
)
from gpufaas.memory.policy import RunningRequest
from gpufaas.shared.messages import (
    DeviceResidency,
    ModelItem,
    ModelSource,
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
    return QueueEntry(function=f"t1/{fn}", model=src(fn), queued=queued, running=running,
                      next_deadline=deadline)  # fmt: skip


def residency(models: list[ResidentModel], items: list[ModelItem], used: int) -> ResidencyReply:
    gpu = DeviceResidency(device="gpu:0", capacity_bytes=100 * MIB, used_bytes=used, models=models)
    return ResidencyReply(node="n", owner="store", devices=[gpu], models=items)


def budget(foreign: int = 0) -> dict[str, Budget]:
    return {"gpu:0": Budget("gpu:0", 100 * MIB, 10e9, foreign)}


def test_views_of_several_replicas_are_summed_per_function() -> None:
    a = QueueView(replica="r1", node="n", at=NOW, entries=[entry("f", queued=2, deadline=NOW + 5)])
    b = QueueView(replica="r2", node="n", at=NOW,
                  entries=[entry("f", queued=3, running=1, deadline=NOW + 2), entry("g")])  # fmt: skip
    f, g = merge_views([a, b])
    assert (f.function, f.queued, f.running, f.next_deadline) == ("t1/f", 5, 1, NOW + 2)
    assert (g.function, g.tenant, g.next_deadline) == ("t1/g", "t1", None)


def test_expected_starts_follow_the_queue_and_the_deadlines() -> None:
    demands = merge_views([QueueView(replica="r", node="n", at=NOW, entries=[
        entry("late", queued=1),  # no deadline: last
        entry("first", queued=100, deadline=NOW + 1),
        entry("capped", queued=1, deadline=NOW + 2),  # behind 100, but due by its deadline
        entry("idle", running=1),  # nothing queued: not in the queue
    ])])  # fmt: skip
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
    models = [ResidentModel(item="m", nbytes=10 * MIB, last_used=1.0, leased=False),
              ResidentModel(item="k", nbytes=5 * MIB, last_used=2.0, leased=True)]  # fmt: skip
    # 3 MiB of the store's copies belong to no complete model; 7 MiB are other owners' blocks.
    plan = build(NOW, [], residency(models, [], 18 * MIB), budget(foreign=7 * MIB))
    (gpu,) = plan.state.devices
    assert {r.id: r.nbytes for r in gpu.resident} == {"m": 10 * MIB, "k": 5 * MIB,
                                                      OTHER_ITEM: 10 * MIB}  # fmt: skip
    assert gpu.running == (RunningRequest(PINNED, (OTHER_ITEM, "k")),)
    assert gpu.capacity_bytes == 100 * MIB
    # Two models sharing 4 MiB of tensors: 12 MiB stored, 16 MiB counted; 4 MiB given back.
    shared = [ResidentModel(item="m", nbytes=8 * MIB, last_used=1.0, leased=False),
              ResidentModel(item="v", nbytes=8 * MIB, last_used=2.0, leased=False)]  # fmt: skip
    (gpu,) = build(NOW, [], residency(shared, [], 12 * MIB), budget()).state.devices
    assert gpu.capacity_bytes == 104 * MIB
    assert OTHER_ITEM not in {r.id for r in gpu.resident}
    assert gpu.running == ()


def test_a_function_runs_where_its_model_is_leased_and_unknown_models_are_skipped() -> None:
    demands = merge_views([QueueView(replica="r", node="n", at=NOW, entries=[
        entry("f", queued=1, running=1), entry("gone", queued=1),
    ])])  # fmt: skip
    items = [ModelItem(item="mf", nbytes=MIB, known=True),
             ModelItem(item="", nbytes=0, known=False, error="no such model")]  # fmt: skip
    gpu1 = DeviceResidency(device="gpu:1", capacity_bytes=100 * MIB, used_bytes=MIB,
                           models=[ResidentModel(item="mf", nbytes=MIB, last_used=1.0,
                                                 leased=True)])  # fmt: skip
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


def test_the_queue_ahead_counts_each_functions_profiled_time() -> None:
    from gpufaas.memory.planner import Demand, _queue  # noqa: PLC0415
    from gpufaas.shared.messages import ModelItem, ModelSource  # noqa: PLC0415

    src = ModelSource(builtin="all-minilm-l6-v2")
    first = Demand("t/a", src, queued=10, running=0, next_deadline=100.0, compute_s=0.2)
    second = Demand("t/b", src, queued=1, running=0, next_deadline=None)
    items = [ModelItem(item="a", nbytes=1, known=True), ModelItem(item="b", nbytes=1, known=True)]
    q = _queue(0.0, [(first, items[0]), (second, items[1])], typical_compute_s=0.05)
    assert [r.expected_start_s for r in q] == [0.0, 2.0]  # 10 requests x 0.2 s ahead of b
