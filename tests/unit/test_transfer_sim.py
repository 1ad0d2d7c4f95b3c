"""The simulated copy engine: real bytes through the callback, simulated time on the DGX-1."""

from __future__ import annotations

import itertools
import random

import pytest

from gpufaas.shared.devices import load_topology
from gpufaas.shared.errors import InvalidArgument
from gpufaas.transfer.linkmodel import LinkModel
from gpufaas.transfer.planner import Planner
from gpufaas.transfer.simengine import SimCopyEngine, SimTransfer, TransferRecord, VirtualClock

pytestmark = pytest.mark.unit

MiB = 2**20
GiB = 2**30


@pytest.fixture(scope="module")
def model() -> LinkModel:
    return LinkModel(load_topology("dgx1-v100"))


@pytest.fixture(scope="module")
def planner(model: LinkModel) -> Planner:
    return Planner(model)


@pytest.fixture
def engine(model: LinkModel, planner: Planner) -> SimCopyEngine:
    return SimCopyEngine(model, planner=planner)


def nop(offset: int, nbytes: int) -> None:
    """A copy callback for runs that only look at simulated times."""


class Buffers:
    """A source of random bytes, a destination, and every chunk the engine copied."""

    def __init__(self, nbytes: int, seed: int) -> None:
        self.src = random.Random(seed).randbytes(nbytes)
        self.dst = bytearray(nbytes)
        self.calls: list[tuple[int, int]] = []

    def copy(self, offset: int, nbytes: int) -> None:
        self.dst[offset : offset + nbytes] = self.src[offset : offset + nbytes]
        self.calls.append((offset, nbytes))


def test_bytes_arrive_exactly_under_contention(engine: SimCopyEngine) -> None:
    jobs = {
        "in": ("host", "gpu:0", Buffers(24 * MiB + 12345, 1)),
        "peer": ("gpu:0", "gpu:5", Buffers(40 * MiB + 7, 2)),
        "out": ("gpu:2", "host", Buffers(8 * MiB - 3, 3)),
        "same-switch": ("host", "gpu:1", Buffers(16 * MiB, 4)),
    }
    for i, (tid, (src, dst, buf)) in enumerate(jobs.items()):
        engine.submit(SimTransfer(tid, src, dst, len(buf.src), buf.copy), at_s=i * 1e-4)
    records = {r.id: r for r in engine.run_until_idle()}
    assert set(records) == set(jobs)
    for tid, (_, _, buf) in jobs.items():
        assert bytes(buf.dst) == buf.src, tid
        spans = sorted(buf.calls)
        assert spans[0][0] == 0
        assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(spans))
        assert sum(n for _, n in spans) == len(buf.src)  # every byte exactly once
        assert records[tid].chunks == len(buf.calls)
        assert sum(records[tid].route_nbytes) == len(buf.src)
    assert engine.idle


def test_random_arrivals_stay_within_capacity_and_land_exactly(
    model: LinkModel, planner: Planner
) -> None:
    rng = random.Random(11)
    engine = SimCopyEngine(model, planner=planner)
    bufs: dict[str, Buffers] = {}
    for i in range(12):
        src, dst = rng.sample(model.devices, 2)
        buf = bufs[f"t{i}"] = Buffers(rng.randint(1, 6 * MiB), 100 + i)
        deadline = rng.choice([None, rng.uniform(1e-3, 3e-3)])
        transfer = SimTransfer(f"t{i}", src, dst, len(buf.src), buf.copy, deadline, 1e-4)
        engine.submit(transfer, at_s=rng.uniform(0, 1e-3))
    caps = model.capacities_bps
    t = 0.0
    while not engine.idle:
        t += 5e-5
        engine.run_until(t)
        for r, v in engine.load_bps().items():
            assert v <= caps[r] * (1 + 1e-9), r
    assert len(engine.records) == 12
    for tid, buf in bufs.items():
        assert bytes(buf.dst) == buf.src, tid
    assert all(rec.finished_sim_s >= rec.submitted_sim_s for rec in engine.records)
    missed = [rec for rec in engine.records if rec.deadline_met is False]
    assert all(rec.at_risk for rec in missed)  # no deadline is missed without a warning


def test_chunks_of_a_route_are_copied_in_order(engine: SimCopyEngine, planner: Planner) -> None:
    buf = Buffers(48 * MiB, 5)
    engine.submit(SimTransfer("t", "host", "gpu:0", len(buf.src), buf.copy))
    [rec] = engine.run_until_idle()
    assert bytes(buf.dst) == buf.src
    plan = planner.plan("host", "gpu:0", len(buf.src))
    for part in plan.parts:
        mine = [o for o, _ in buf.calls if part.offset <= o < part.offset + part.nbytes]
        assert mine == sorted(mine)
        chunk = engine.chunk_nbytes(part.route.capacity_bps)
        assert all(n <= chunk for o, n in buf.calls if o in mine)
    assert len(rec.routes) == len(plan.parts) > 1


@pytest.mark.parametrize(("src", "dst"), [("host", "gpu:0"), ("gpu:0", "gpu:5"), ("gpu:3", "host")])
def test_a_lone_transfer_takes_the_modelled_time(
    engine: SimCopyEngine, planner: Planner, model: LinkModel, src: str, dst: str
) -> None:
    engine.submit(SimTransfer("lone", src, dst, GiB, nop))
    [rec] = engine.run_until_idle()
    predicted = planner.plan(src, dst, GiB).modelled_time_s
    assert rec.duration_sim_s == pytest.approx(predicted, rel=0.01)
    assert rec.planned_sim_s == pytest.approx(predicted)
    optimum = model.max_flow_time(src, dst, GiB)
    assert optimum <= rec.duration_sim_s <= 1.10 * optimum
    assert engine.now_s == pytest.approx(rec.finished_sim_s)


def run_contended(engine: SimCopyEngine, deadline_s: float | None) -> dict[str, TransferRecord]:
    """A 1 GiB best-effort load into gpu:0, then a 256 MiB request into gpu:1 behind the
    same switch, which must land by its deadline minus 1 ms of inference."""
    engine.submit(SimTransfer("bulk", "host", "gpu:0", GiB, nop))
    hot = SimTransfer("hot", "host", "gpu:1", 256 * MiB, nop, deadline_s, 1e-3)
    engine.submit(hot, at_s=1e-3)
    return {r.id: r for r in engine.run_until_idle()}


def test_deadlines_are_met_under_contention_when_admissible(
    model: LinkModel, planner: Planner
) -> None:
    fair = run_contended(SimCopyEngine(model, planner=planner), None)
    budget_s = 8e-3
    assert fair["hot"].duration_sim_s > budget_s  # an even share would land it too late
    slo = run_contended(SimCopyEngine(model, planner=planner), 1e-3 + budget_s + 1e-3)
    assert slo["hot"].deadline_met is True
    assert slo["hot"].at_risk == ()
    assert slo["hot"].finished_sim_s <= 1e-3 + budget_s
    assert slo["bulk"].deadline_met is None
    # bandwidth is not wasted: the bulk copy ends when all bytes could have
    assert slo["bulk"].finished_sim_s == pytest.approx(fair["bulk"].finished_sim_s, rel=0.01)


def test_an_infeasible_deadline_is_missed_and_reported(engine: SimCopyEngine) -> None:
    engine.submit(SimTransfer("bulk", "host", "gpu:0", GiB, nop))
    engine.submit(SimTransfer("late", "host", "gpu:1", GiB, nop, deadline_s=2e-3), at_s=1e-3)
    records = {r.id: r for r in engine.run_until_idle()}
    late = records["late"]
    assert late.deadline_met is False
    assert late.at_risk
    assert late.at_risk[0].startswith("insufficient_bandwidth")
    assert "MISSED" in repr(late)


def test_two_deadlines_on_one_uplink_are_both_met(engine: SimCopyEngine) -> None:
    # gpu:0 and gpu:1 share switch0: 12.5 GB/s between them on the direct routes
    for i, dst in enumerate(["gpu:0", "gpu:1"]):
        engine.submit(SimTransfer(f"t{i}", "host", dst, 64 * MiB, nop, deadline_s=5e-3 * (i + 1)))
    records = engine.run_until_idle()
    assert [r.deadline_met for r in records] == [True, True]


def test_zero_bytes_complete_at_once(engine: SimCopyEngine) -> None:
    calls: list[tuple[int, int]] = []
    engine.run_until(0.5)
    engine.submit(SimTransfer("empty", "host", "gpu:3", 0, lambda o, n: calls.append((o, n)), 1.0))
    [rec] = engine.run_until(0.5)
    assert (rec.submitted_sim_s, rec.finished_sim_s) == (0.5, 0.5)
    assert rec.routes == ()
    assert rec.deadline_met is True
    assert calls == []


def test_time_is_virtual_and_advances_event_by_event(model: LinkModel, planner: Planner) -> None:
    clock = VirtualClock(100.0)
    engine = SimCopyEngine(model, planner=planner, clock=clock)
    buf = Buffers(32 * MiB, 6)
    engine.submit(SimTransfer("t", "host", "gpu:7", len(buf.src), buf.copy), at_s=100.001)
    assert engine.run_until(100.001) == []
    assert clock.now_s == 100.001
    assert engine.run_until(100.0012) == []  # mid-flight: some chunks landed, not all
    assert len(buf.calls) > 0
    assert bytes(buf.dst) != buf.src
    [rec] = engine.run_until(101.0)
    assert clock.now_s == 101.0
    assert bytes(buf.dst) == buf.src
    assert rec.submitted_sim_s == 100.001
    assert "simulated" in repr(rec)
    assert "simulated" in repr(engine)
    assert "simulated" in repr(clock)
    with pytest.raises(InvalidArgument) as err:
        engine.run_until(50.0)
    assert err.value.field == "t_s"


def test_chunk_sizes_follow_the_copy_overhead(engine: SimCopyEngine) -> None:
    # 15 us per copy x bandwidth x 10, rounded up to whole MiB
    assert engine.chunk_nbytes(12.5e9) == 2 * MiB
    assert engine.chunk_nbytes(50e9) == 8 * MiB
    assert engine.chunk_nbytes(1e6) == MiB
    assert engine.chunk_nbytes(1e13) == 64 * MiB


def test_bad_submissions_are_refused(engine: SimCopyEngine) -> None:
    cases = [
        (SimTransfer("a", "host", "gpu:8", 1, nop), "tier"),
        (SimTransfer("a", "nvme", "gpu:0", 1, nop), "tier"),
        (SimTransfer("a", "host", "gpu:0", -1, nop), "nbytes"),
    ]
    for transfer, name in cases:
        with pytest.raises(InvalidArgument) as err:
            engine.submit(transfer)
        assert err.value.field == name
    engine.submit(SimTransfer("a", "host", "gpu:0", MiB, nop))
    with pytest.raises(InvalidArgument) as err:
        engine.submit(SimTransfer("a", "host", "gpu:1", MiB, nop))
    assert err.value.field == "id"
    engine.run_until(1.0)
    with pytest.raises(InvalidArgument) as err:
        engine.submit(SimTransfer("b", "host", "gpu:0", MiB, nop), at_s=0.5)
    assert err.value.field == "at_s"
