"""The autoscaler on a fake clock: keep-alive, queue and rate scale-out, delayed scale-down."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from gpufaas.scheduler.autoscale import Autoscaler, Decision, FunctionLoad

pytestmark = pytest.mark.unit


@dataclass
class Clock:
    """A clock the test moves by hand."""

    now: float = 1000.0

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


def load(
    instances: int,
    *,
    queued: int = 0,
    in_flight: int = 0,
    capacity: int = 8,
    service_rps: float = 0.0,
    function: str = "f",
) -> FunctionLoad:
    return FunctionLoad(function, instances, queued, in_flight, capacity, service_rps)


def decide(scaler: Autoscaler, clock: Clock, fl: FunctionLoad) -> Decision:
    return scaler.decide(clock.now, [fl])[fl.function]


def test_scale_to_zero_after_keep_alive_and_back_to_one_on_the_next_arrival() -> None:
    clock = Clock()
    scaler = Autoscaler(keep_alive_s=60.0)
    scaler.observe("f", clock.now)
    assert decide(scaler, clock, load(0, queued=1)).desired == 1
    clock.advance(1)
    d = decide(scaler, clock, load(1))  # served; nothing queued; arrival 1 s ago
    assert d.desired == 1
    assert "keep-alive" in d.reason
    clock.advance(59)
    assert decide(scaler, clock, load(1)).desired == 1  # exactly keep-alive: still warm
    clock.advance(1)
    d = decide(scaler, clock, load(1))
    assert d.desired == 0
    assert d.reason == "idle 61 s > keep-alive 60 s"
    assert decide(scaler, clock, load(0)).desired == 0
    assert scaler.tracked() == 0  # at zero and idle: forgotten
    clock.advance(300)
    scaler.observe("f", clock.now)
    d = decide(scaler, clock, load(0))
    assert (d.current, d.desired) == (0, 1)


def test_keep_alive_counts_from_the_last_work_seen_not_only_the_last_arrival() -> None:
    clock = Clock()
    scaler = Autoscaler(keep_alive_s=60.0)
    scaler.observe("f", clock.now)
    clock.advance(90)  # a long request is still running
    assert decide(scaler, clock, load(1, in_flight=1)).desired == 1
    clock.advance(30)
    assert decide(scaler, clock, load(1)).desired == 1
    clock.advance(31)
    assert decide(scaler, clock, load(1)).desired == 0


def test_an_instance_found_running_without_arrivals_gets_a_keep_alive_first() -> None:
    clock = Clock()
    scaler = Autoscaler(keep_alive_s=60.0)
    assert decide(scaler, clock, load(2)).desired == 2  # not at once to zero after a restart
    clock.advance(61)
    assert decide(scaler, clock, load(2)).desired == 0


def test_scale_out_with_the_queue_at_once() -> None:
    clock = Clock()
    scaler = Autoscaler()
    scaler.observe("f", clock.now, 20)
    d = decide(scaler, clock, load(1, queued=12, in_flight=8, capacity=8))
    assert d.desired == 3  # ceil(20 / 8)
    assert d.reason == "queue 20 > capacity 8 per instance"


def test_scale_out_with_the_arrival_rate() -> None:
    clock = Clock()
    scaler = Autoscaler(window_s=10.0, target_utilization=0.5)
    for _ in range(20):  # 40 arrivals per second for 20 s
        scaler.observe("f", clock.now, 40)
        clock.advance(1)
    assert scaler.rate("f", clock.now) == pytest.approx(40.0)
    d = decide(scaler, clock, load(1, queued=0, in_flight=2, service_rps=30.0))
    assert d.desired == 3  # ceil(40 / (30 * 0.5))
    assert d.reason == "rate 40.0/s over 15.0/s per instance"


def test_a_fresh_burst_is_not_diluted_by_the_window() -> None:
    clock = Clock()
    scaler = Autoscaler(window_s=10.0)
    scaler.observe("f", clock.now, 50)
    assert scaler.rate("f", clock.now) == pytest.approx(50.0)  # elapsed 0: divided by 1 s
    clock.advance(2.0)
    assert scaler.rate("f", clock.now) == pytest.approx(25.0)
    clock.advance(8.0)  # window full: 50 in 10 s, then none once it has passed
    assert scaler.rate("f", clock.now) == pytest.approx(5.0)
    clock.advance(11.0)
    assert scaler.rate("f", clock.now) == 0.0
    assert scaler.rate("unknown", clock.now) == 0.0


def test_scale_down_waits_for_the_delay_then_goes_one_at_a_time() -> None:
    clock = Clock()
    scaler = Autoscaler(scale_down_delay_s=5.0, keep_alive_s=600.0)
    scaler.observe("f", clock.now)
    assert decide(scaler, clock, load(4, queued=32, capacity=8)).desired == 4
    clock.advance(1)
    d = decide(scaler, clock, load(4, queued=1))
    assert d.desired == 4
    assert "holding 4" in d.reason
    clock.advance(4)
    assert decide(scaler, clock, load(4, queued=1)).desired == 4  # 4 s below: still held
    clock.advance(1)
    d = decide(scaler, clock, load(4, queued=1))
    assert d.desired == 3
    assert "one down" in d.reason
    clock.advance(0.1)
    assert decide(scaler, clock, load(3, queued=1)).desired == 2  # one per decide call now
    # A spike resets the timer: scale-up is immediate, scale-down waits again after it.
    clock.advance(0.1)
    assert decide(scaler, clock, load(2, queued=24)).desired == 3
    clock.advance(0.1)
    assert decide(scaler, clock, load(3, queued=1)).desired == 3


def test_the_maximum_caps_every_rule() -> None:
    clock = Clock()
    scaler = Autoscaler(max_instances=4)
    scaler.observe("f", clock.now, 1000)
    d = decide(scaler, clock, load(1, queued=100, capacity=4, service_rps=10.0))
    assert d.desired == 4
    assert d.reason.endswith("; capped at max 4")


def test_memory_stays_bounded() -> None:
    clock = Clock()
    scaler = Autoscaler(window_s=10.0, keep_alive_s=60.0)
    for i in range(5000):
        scaler.observe("hot", clock.now, 3)
        scaler.observe(f"once-{i}", clock.now)
        clock.advance(0.25)
    # One bucket per second of the window (and the one straddling its start), no more.
    hot = scaler._functions["hot"]
    assert len(hot.buckets) <= 12
    # Functions seen once and idle past keep-alive are forgotten by the next decide.
    scaler.decide(clock.now, [load(1, function="hot")])
    assert scaler.tracked() <= 1 + 60 * 4 + 1


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="target_utilization"):
        Autoscaler(target_utilization=0.0)
    with pytest.raises(ValueError, match="max_instances"):
        Autoscaler(max_instances=0)
    with pytest.raises(ValueError, match="window_s"):
        Autoscaler(window_s=0.5)
    with pytest.raises(ValueError, match="n must be"):
        Autoscaler().observe("f", 0.0, -1)
