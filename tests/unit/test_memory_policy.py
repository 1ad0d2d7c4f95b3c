"""The queue-aware residency policy, driven step by step with a fake clock."""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from gpufaas.memory.policy import (
    Actions,
    DeviceState,
    ItemRef,
    MemoryState,
    QueuedRequest,
    Resident,
    RunningRequest,
    apply_actions,
    reconcile_once,
)
from gpufaas.shared.errors import InvalidArgument

pytestmark = pytest.mark.unit

GB = 10**9
BPS = 10 * GB  # 1 GB copies in 0.1 s
SLACK_S = 0.05


@dataclass(slots=True)
class FakeClock:
    now_s: float = 100.0

    def advance(self, dt_s: float) -> float:
        self.now_s += dt_s
        return self.now_s


def device(
    capacity_gb: int,
    resident: dict[str, tuple[int, float]],
    *,
    running: tuple[RunningRequest, ...] = (),
    queue: tuple[QueuedRequest, ...] = (),
) -> MemoryState:
    res = tuple(Resident(i, gb * GB, last) for i, (gb, last) in resident.items())
    return MemoryState((DeviceState("gpu:0", capacity_gb * GB, BPS, res, running, queue),))


def queued(rid: str, start_s: float, *items: tuple[str, int]) -> QueuedRequest:
    return QueuedRequest(rid, f"fn-{rid}", tuple(ItemRef(i, gb * GB) for i, gb in items), start_s)


def reconcile(now_s: float, state: MemoryState) -> Actions:
    return reconcile_once(now_s, state, slack_s=SLACK_S)


def test_items_free_to_drop_go_before_those_that_must_be_copied_out() -> None:
    # Over capacity by 2 GB; nothing is queued. The LRU item is a tube whose only copy is
    # on the GPU (evicting it copies 2 GB over the link): a weight of the same size, used
    # later but free to drop, goes instead.
    gpu_only = Resident("tube:x", 2 * GB, 1.0, swap_bytes=2 * GB)
    weights = Resident("m", 2 * GB, 5.0)
    state = MemoryState(
        (DeviceState("gpu:0", 4 * GB, BPS, (gpu_only, weights, Resident("k", 2 * GB, 9.0))),)
    )
    assert [e.item for e in reconcile(100.0, state).evict] == ["m"]
    # Among items queued requests need, too: the free one needed sooner goes before the
    # costly one needed later.
    queue = (queued("r1", 130.0, ("tube:x", 2)), queued("r2", 120.0, ("m", 2)))
    state = MemoryState(
        (
            DeviceState(
                "gpu:0", 4 * GB, BPS, (gpu_only, weights, Resident("k", 2 * GB, 9.0)), (), queue
            ),
        )
    )
    actions = reconcile(100.0, state)
    assert [(e.item, e.reason) for e in actions.evict] == [("k", "unneeded")]
    state = MemoryState((DeviceState("gpu:0", 2 * GB, BPS, (gpu_only, weights), (), queue),))
    assert [(e.item, e.reason) for e in reconcile(100.0, state).evict] == [("m", "needed-later")]


def test_no_pressure_no_actions() -> None:
    state = device(10, {"a": (4, 1.0), "b": (4, 2.0)}, queue=(queued("r1", 200.0, ("a", 4)),))
    actions = reconcile(100.0, state)
    assert actions == Actions()


def test_unneeded_data_goes_before_data_a_queued_request_needs() -> None:
    # "old" is least recently used but queued for; "idle" is newer and nobody needs it
    state = device(
        10,
        {"old": (4, 1.0), "idle": (4, 50.0)},
        queue=(
            queued("r1", 100.1, ("new", 4)),
            queued("r2", 105.0, ("old", 4)),
        ),
    )
    actions = reconcile(100.0, state)
    assert [(e.item, e.reason) for e in actions.evict] == [("idle", "unneeded")]
    assert [p.item for p in actions.prefetch] == ["new"]
    assert actions.pressure


def test_unneeded_items_go_least_recently_used_first() -> None:
    state = device(
        10,
        {"a": (3, 30.0), "b": (3, 10.0), "c": (3, 20.0)},
        queue=(queued("r1", 100.0, ("x", 5)),),
    )
    actions = reconcile(100.0, state)
    assert [e.item for e in actions.evict] == ["b", "c"]


def test_among_needed_items_the_one_needed_latest_goes_first() -> None:
    state = device(
        10,
        {"soon": (3, 1.0), "late": (3, 2.0), "mid": (3, 3.0)},
        queue=(
            queued("r0", 100.05, ("x", 3)),
            queued("r1", 101.0, ("soon", 3)),
            queued("r2", 103.0, ("mid", 3)),
            queued("r3", 109.0, ("late", 3)),
        ),
    )
    actions = reconcile(100.0, state)
    assert [(e.item, e.reason, e.needed_at_s) for e in actions.evict] == [
        ("late", "needed-later", 109.0)
    ]
    assert [p.item for p in actions.prefetch] == ["x"]


def test_over_capacity_evicts_by_the_same_order() -> None:
    # capacity shrank under the residents: unneeded first, then the latest-needed
    state = device(
        6,
        {"soon": (2, 1.0), "late": (2, 2.0), "idle": (2, 9.0), "more": (2, 3.0)},
        queue=(queued("r1", 101.0, ("soon", 2)), queued("r2", 102.0, ("late", 2), ("more", 2))),
    )
    actions = reconcile(100.0, state)
    assert [e.item for e in actions.evict] == ["idle"]
    state2 = replace(state, devices=(replace(state.devices[0], capacity_bytes=4 * GB),))
    actions2 = reconcile(100.0, state2)
    assert [e.item for e in actions2.evict] == ["idle", "late"]  # ties: least recent first


def test_running_request_items_are_never_evicted() -> None:
    # everything resident is in use; the queued request must wait, not evict
    state = device(
        10,
        {"a": (5, 1.0), "b": (5, 2.0)},
        running=(RunningRequest("run", ("a", "b")),),
        queue=(queued("r1", 100.0, ("c", 4)),),
    )
    actions = reconcile(100.0, state)
    assert actions.evict == ()
    assert actions.prefetch == ()
    assert actions.pressure
    # even over capacity, a pinned item stays
    over = device(4, {"a": (5, 1.0)}, running=(RunningRequest("run", ("a",)),))
    assert reconcile(100.0, over).evict == ()


def test_prefetch_never_evicts_data_needed_sooner() -> None:
    state = device(
        10,
        {"soon": (6, 1.0)},
        queue=(
            queued("r1", 100.2, ("soon", 6)),
            queued("r2", 100.3, ("big", 6)),
        ),
    )
    actions = reconcile(100.0, state)
    assert actions.evict == ()
    assert actions.prefetch == ()
    assert actions.pressure


def test_prefetch_lands_before_the_request_starts() -> None:
    """Drive a small queue: each item becomes resident before its request's expected start."""
    clock = FakeClock()
    state = device(
        10,
        {"a": (5, 99.0), "b": (5, 98.0)},
        running=(RunningRequest("run-a", ("a",)),),
        queue=(
            queued("r1", 101.0, ("c", 5)),
            queued("r2", 102.0, ("a", 5)),
        ),
    )
    lead_s = 5 * GB / BPS + SLACK_S
    landed: dict[str, float] = {}
    prefetched_at: dict[str, float] = {}
    while clock.now_s < 102.0:
        actions = reconcile(clock.now_s, state)
        for p in actions.prefetch:
            prefetched_at[p.item] = clock.now_s
            landed[p.item] = clock.now_s + p.nbytes / BPS
        state = apply_actions(state, actions, clock.now_s)
        clock.advance(0.01)
    assert prefetched_at["c"] >= 101.0 - lead_s - 1e-9  # not earlier than needed
    assert landed["c"] <= 101.0  # resident before r1 starts
    assert "a" not in prefetched_at  # it stayed resident: pinned by the running request
    assert {r.id for r in state.devices[0].resident} == {"a", "c"}


def test_swapped_out_item_comes_back_before_its_request() -> None:
    clock = FakeClock(now_s=0.0)
    state = device(
        10, {"x": (8, 0.0)}, queue=(queued("r1", 0.5, ("y", 8)), queued("r2", 3.0, ("x", 8)))
    )
    evicted_x_at = None
    x_back_at = None
    y_done = False
    while clock.now_s < 3.0:
        actions = reconcile(clock.now_s, state)
        for e in actions.evict:
            if e.item == "x":
                evicted_x_at = clock.now_s
        for p in actions.prefetch:
            if p.item == "x":
                x_back_at = clock.now_s + p.nbytes / BPS
        state = apply_actions(state, actions, clock.now_s)
        if not y_done and clock.now_s >= 0.5:
            # r1 ran and finished: drop it from the queue
            dev = state.devices[0]
            state = MemoryState((replace(dev, queue=dev.queue[1:]),))
            y_done = True
        clock.advance(0.01)
    assert evicted_x_at is not None
    assert evicted_x_at < 0.5
    assert x_back_at is not None
    assert x_back_at <= 3.0


def test_working_set_bigger_than_the_device_is_rejected() -> None:
    state = device(
        10,
        {"a": (2, 1.0)},
        queue=(queued("huge", 100.0, ("p", 6), ("q", 6)), queued("ok", 100.0, ("a", 2))),
    )
    actions = reconcile(100.0, state)
    assert [(r.request, r.working_set_bytes) for r in actions.rejected] == [("huge", 12 * GB)]
    assert "exceeds the capacity" in actions.rejected[0].reason
    assert actions.prefetch == ()
    assert actions.evict == ()
    after = apply_actions(state, actions, 100.0)
    assert [q.id for q in after.devices[0].queue] == ["ok"]


def test_reconcile_is_idempotent() -> None:
    state = device(
        12,
        {"a": (4, 1.0), "b": (4, 2.0), "c": (4, 3.0)},
        running=(RunningRequest("run", ("c",)),),
        queue=(
            queued("r1", 100.3, ("d", 4)),
            queued("r2", 100.4, ("e", 4)),
            queued("r3", 100.5, ("f", 4)),
            queued("r4", 101.0, ("a", 4)),
            queued("big", 101.0, ("g", 13)),
        ),
    )
    first = reconcile(100.0, state)
    assert first == reconcile(100.0, state)  # same state, same actions
    assert first.evict
    assert first.prefetch
    assert first.rejected
    second = reconcile(100.0, apply_actions(state, first, 100.0))
    assert second.empty


def test_invalid_state_is_refused() -> None:
    bad = MemoryState((DeviceState("gpu:0", 0, BPS),))
    with pytest.raises(InvalidArgument):
        reconcile(0.0, bad)
    with pytest.raises(InvalidArgument):
        reconcile_once(0.0, device(1, {}), slack_s=-1.0)


def _memory_trace() -> Any:
    bench = Path(__file__).resolve().parents[2] / "bench"
    sys.path.insert(0, str(bench))
    try:
        return importlib.import_module("memory_trace")
    finally:
        sys.path.remove(str(bench))


def test_bench_smoke_queue_aware_swaps_no_more_than_lru() -> None:
    trace = _memory_trace()
    results = trace.run_all(seed=3, requests=150)
    by_policy = {r.policy: r for r in results}
    assert by_policy["queue-aware"].completed == 150
    assert by_policy["queue-aware"].bytes_swapped <= by_policy["lru"].bytes_swapped


def test_bench_smoke_tubes_queue_aware_p99_no_worse_than_lru() -> None:
    trace = _memory_trace()
    cfg = trace.TraceConfig()
    _, plain = trace.make_trace(3, 300, cfg)
    _, tubed = trace.make_trace(3, 300, cfg, 4.0)
    assert [(a.id, a.t_s, a.model) for a in tubed] == [(a.id, a.t_s, a.model) for a in plain]
    assert all(2 * trace.GB <= a.tube_bytes <= 6 * trace.GB for a in tubed)
    results = trace.run_all(seed=3, requests=300, tube_gb=4.0)
    by_policy = {r.policy: r for r in results}
    assert all(r.completed + r.rejected == 300 for r in results)
    assert by_policy["queue-aware"].completed == 300
    assert by_policy["queue-aware"].bytes_swapped_out > 0  # 4 GB tubes do not all fit
    assert by_policy["queue-aware"].p99_s <= by_policy["lru"].p99_s  # held for seeds 1-20
