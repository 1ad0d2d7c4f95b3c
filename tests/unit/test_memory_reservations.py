"""Elastic reservations: R_size x R_con over a sliding window, on a fake clock."""

from __future__ import annotations

import pytest

from gpufaas.memory.reservations import Reservation, ReservationTracker
from gpufaas.shared.errors import InvalidArgument

pytestmark = pytest.mark.unit

MB = 1 << 20
W = 10.0  # window, seconds


def test_size_times_peak_concurrency() -> None:
    r = ReservationTracker(window_s=W)
    for i in range(3):
        r.observe_start("f", f"r{i}", 4 * MB, now=1.0 + i)
    assert r.reservation("f", now=3.0) == Reservation("f", 4 * MB, 3, 12 * MB)
    for i in range(3):
        r.observe_end("f", f"r{i}", now=4.0)
    # nothing in flight, but the peak of 3 is still in the window
    assert r.desired("f", now=5.0) == 12 * MB
    assert r.desired("unknown", now=5.0) == 0


def test_follows_a_changing_load_and_decays_to_zero() -> None:
    r = ReservationTracker(window_s=W)
    t = 0.0
    # phase 1: 4 at a time, 8 MB each
    for i in range(4):
        r.observe_start("f", f"a{i}", 8 * MB, now=t)
    for i in range(4):
        r.observe_end("f", f"a{i}", now=t + 1)
    assert r.desired("f", now=t + 1) == 32 * MB
    # phase 2, after a full window: one at a time, 2 MB each
    for k in range(20):
        t = 20.0 + k
        r.observe_start("f", f"b{k}", 2 * MB, now=t)
        r.observe_end("f", f"b{k}", now=t + 0.5)
    assert r.reservation("f", now=t + 1) == Reservation("f", 2 * MB, 1, 2 * MB)
    # idle for a window: nothing wanted, and the function is forgotten
    assert r.desired("f", now=t + 1 + W + 1) == 0
    assert r.functions() == ["f"]
    assert r.snapshot(now=t + 1 + W + 1) == {}
    assert r.functions() == []
    assert r.total(now=t + 100) == 0


def test_p95_ignores_a_rare_outlier_but_not_a_small_sample() -> None:
    r = ReservationTracker(window_s=W)
    r.observe_start("f", "x0", 100 * MB, now=0.0)
    r.observe_end("f", "x0", now=0.1)
    r.observe_start("f", "x1", MB, now=0.2)
    r.observe_end("f", "x1", now=0.3)
    assert r.reservation("f", now=0.5).size_bytes == 100 * MB  # 2 samples: p95 is the max
    for i in range(38):
        r.observe_start("f", f"y{i}", MB, now=1.0 + i * 0.1)
        r.observe_end("f", f"y{i}", now=1.05 + i * 0.1)
    assert r.reservation("f", now=5.0).size_bytes == MB  # 1 outlier in 40 is above p95
    strict = ReservationTracker(window_s=W, size_quantile=1.0)
    strict.observe_start("f", "x0", 100 * MB, now=0.0)
    strict.observe_start("f", "x1", MB, now=0.0)
    assert strict.reservation("f", now=0.5).size_bytes == 100 * MB


def test_long_request_still_counts_after_the_window() -> None:
    r = ReservationTracker(window_s=W)
    r.observe_start("f", "long", 16 * MB, now=0.0)
    r.observe_start("f", "short", MB, now=0.0)
    r.observe_end("f", "short", now=1.0)
    assert r.reservation("f", now=50.0) == Reservation("f", 16 * MB, 1, 16 * MB)
    r.observe_end("f", "long", now=51.0)
    assert r.desired("f", now=51.0) == 16 * MB  # its end is in the window: peak 1
    assert r.desired("f", now=51.0 + W + 1) == 0


def test_a_start_whose_end_never_comes_stops_counting() -> None:
    r = ReservationTracker(window_s=W, max_request_s=30.0)
    r.observe_start("f", "orphan", 8 * MB, now=0.0)  # its worker died mid-request
    assert r.desired("f", now=29.0) == 8 * MB
    assert r.desired("f", now=31.0) == 8 * MB  # ended now: still in the window
    assert r.desired("f", now=31.0 + W + 1) == 0  # then it goes, as any request does
    assert r.snapshot(now=31.0 + W + 2) == {}
    assert not r.observe_end("f", "orphan", now=100.0)  # a late end changes nothing
    with pytest.raises(InvalidArgument):
        ReservationTracker(max_request_s=0)


def test_starts_and_ends_are_idempotent() -> None:
    r = ReservationTracker(window_s=W)
    assert r.observe_start("f", "a", MB, now=0.0)
    assert not r.observe_start("f", "a", MB, now=0.1)  # redelivered
    assert r.reservation("f", now=0.2).concurrency == 1
    assert r.observe_end("f", "a", now=1.0)
    assert not r.observe_end("f", "a", now=1.1)
    assert not r.observe_end("g", "a", now=1.1)
    with pytest.raises(InvalidArgument, match="negative") as e:
        r.observe_start("f", "b", -1, now=2.0)
    assert e.value.field == "nbytes"


def test_functions_are_independent() -> None:
    r = ReservationTracker(window_s=W)
    r.observe_start("f", "a", 2 * MB, now=0.0)
    r.observe_start("g", "a", 3 * MB, now=0.0)  # same request id, other function
    r.observe_start("g", "b", 3 * MB, now=0.0)
    snap = r.snapshot(now=1.0)
    assert {k: v.desired_bytes for k, v in snap.items()} == {"f": 2 * MB, "g": 6 * MB}
    assert r.total(now=1.0) == 8 * MB
    assert r.functions() == ["f", "g"]
