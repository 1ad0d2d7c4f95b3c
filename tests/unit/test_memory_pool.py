"""The segment pool: exact sub-allocation, growth and shrink on a fake clock, errors."""

from __future__ import annotations

import itertools
import random
import statistics
import time
from pathlib import Path

import pytest

from gpufaas.memory.pool import (
    EMPTY_SEGMENT,
    Allocation,
    HostBackend,
    SegmentPool,
    SimBackend,
)
from gpufaas.shared.errors import InvalidArgument, NotFound, ResourceExhausted

pytestmark = pytest.mark.unit

A = 256  # alignment
SEG = 64 * A


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_pool(
    capacity: int = 8 * SEG, segment: int = SEG
) -> tuple[SegmentPool, SimBackend, FakeClock]:
    backend, clock = SimBackend(), FakeClock()
    pool = SegmentPool("sim:0", capacity, backend, segment_bytes=segment, clock=clock)
    return pool, backend, clock


def check_exact(pool: SegmentPool) -> None:
    """Live blocks do not overlap, stay in their segment, and the byte counts add up."""
    seg_sizes = pool.segments()
    by_seg: dict[str, list[tuple[int, int]]] = {}
    for a in pool.allocations():
        if a.nbytes == 0:
            assert a.segment == EMPTY_SEGMENT
            continue
        assert a.offset % A == 0
        size = -(-a.nbytes // A) * A
        assert a.offset + size <= seg_sizes[a.segment]
        by_seg.setdefault(a.segment, []).append((a.offset, a.offset + size))
    allocated = 0
    for blocks in by_seg.values():
        blocks.sort()
        for (_, end), (start, _) in itertools.pairwise(blocks):
            assert end <= start, "live allocations overlap"
        allocated += sum(e - s for s, e in blocks)
    st = pool.stats()
    assert st.allocated_bytes == allocated
    assert st.reserved_bytes == sum(seg_sizes.values())
    assert st.free_bytes == st.reserved_bytes - allocated


def test_alloc_aligns_and_free_coalesces_back_to_one_block() -> None:
    pool, backend, _ = make_pool()
    a = pool.alloc(100, "w1")
    b = pool.alloc(A + 1, "w1")
    c = pool.alloc(A, "w2")
    assert (a.offset, b.offset, c.offset) == (0, A, 3 * A)
    assert a.segment == b.segment == c.segment
    assert backend.created == 1
    pool.free(b.id)  # a hole in the middle
    st = pool.stats()
    assert st.free_bytes == SEG - 2 * A
    assert st.largest_free_block_bytes == SEG - 4 * A
    d = pool.alloc(2 * A, "w3")  # best fit: the hole, not the tail
    assert d.offset == A
    for x in (a, c, d):
        pool.free(x.id)
    st = pool.stats()
    assert (st.allocated_bytes, st.free_bytes, st.largest_free_block_bytes) == (0, SEG, SEG)
    assert st.fragmentation == 0.0


def test_random_workload_never_overlaps() -> None:
    pool, _, _ = make_pool(capacity=64 * SEG)
    rng = random.Random(6)
    live: list[Allocation] = []
    for step in range(4000):
        if live and rng.random() < 0.45:
            pool.free(live.pop(rng.randrange(len(live))).id)
        else:
            nbytes = rng.choice([0, rng.randrange(1, 4 * A), rng.randrange(A, 16 * A)])
            live.append(pool.alloc(nbytes, f"w{step % 7}"))
        if step % 500 == 0:
            check_exact(pool)
    check_exact(pool)
    for a in live:
        pool.free(a.id)
    st = pool.stats()
    assert st.allocated_bytes == 0
    assert st.allocations == 0
    assert st.free_bytes == st.reserved_bytes
    assert st.largest_free_block_bytes == SEG  # every segment merged back whole


def test_grows_then_releases_idle_segments_after_keep_alive() -> None:
    pool, backend, clock = make_pool()
    first = [pool.alloc(SEG // 2, "w") for _ in range(2)]
    assert pool.stats().segments == 1
    third = pool.alloc(SEG // 2, "w")  # does not fit: a second segment
    assert pool.stats().segments == 2
    events = pool.drain_events()
    assert [(e.kind, e.segment_bytes, e.reserved_bytes) for e in events] == [
        ("grow", SEG, SEG),
        ("grow", SEG, 2 * SEG),
    ]
    assert pool.drain_events() == []
    clock.now = 10.0
    pool.free(third.id)  # the second segment is empty from t=10
    assert pool.release_idle(now=15.0, keep_alive_s=30.0) == []
    clock.now = 20.0
    for a in first:
        pool.free(a.id)  # the first one from t=20
    assert pool.release_idle(now=40.0, keep_alive_s=30.0) == [third.segment]
    assert backend.segments == {first[0].segment: SEG}
    assert pool.release_idle(now=50.0, keep_alive_s=30.0) == [first[0].segment]
    assert backend.segments == {}
    assert backend.destroyed == 2
    assert [(e.kind, e.reserved_bytes) for e in pool.drain_events()] == [
        ("shrink", SEG),
        ("shrink", 0),
    ]
    st = pool.stats()
    assert (st.reserved_bytes, st.segments, st.largest_free_block_bytes) == (0, 0, 0)


def test_reuse_cancels_the_keep_alive() -> None:
    pool, _, clock = make_pool()
    a = pool.alloc(A, "w")
    pool.free(a.id)
    clock.now = 100.0
    b = pool.alloc(A, "w")  # same segment, busy again
    assert b.segment == a.segment
    assert pool.release_idle(now=1000.0, keep_alive_s=1.0) == []


def test_large_allocation_gets_a_dedicated_segment() -> None:
    pool, backend, _ = make_pool()
    big = pool.alloc(3 * SEG + 1, "w")
    assert big.offset == 0
    assert backend.segments[big.segment] == 3 * SEG + A
    small = pool.alloc(A, "w")
    assert small.segment != big.segment  # the dedicated segment is full
    assert backend.segments[small.segment] == SEG


def test_capacity_errors_name_device_and_bytes() -> None:
    pool, _, _ = make_pool(capacity=2 * SEG + 3 * A)
    with pytest.raises(InvalidArgument, match="more than the whole device") as e:
        pool.alloc(2 * SEG + 4 * A, "w")
    assert e.value.field == "nbytes"
    with pytest.raises(InvalidArgument, match="negative"):
        pool.alloc(-1, "w")
    pool.alloc(SEG, "w")
    pool.alloc(SEG, "w")
    tail = pool.alloc(A, "w")  # the capacity left is less than a segment: a short tail one
    assert pool.segments()[tail.segment] == 3 * A
    assert pool.stats().reserved_bytes == pool.capacity
    with pytest.raises(ResourceExhausted, match=r"sim:0: cannot allocate 1000 bytes") as full:
        pool.alloc(1000, "w")
    assert full.value.field == "nbytes"
    assert f"{2 * A} of {2 * SEG + 3 * A} bytes free" in full.value.message


def test_growth_gives_back_idle_segments_that_are_too_small() -> None:
    pool, backend, _ = make_pool(capacity=2 * SEG)
    a = pool.alloc(SEG, "w")
    pool.free(a.id)  # empty, within its keep-alive
    big = pool.alloc(2 * SEG, "w")  # only fits if that segment goes
    assert backend.segments == {big.segment: 2 * SEG}
    assert [e.kind for e in pool.drain_events()] == ["grow", "shrink", "grow"]


def test_zero_bytes_is_an_empty_allocation() -> None:
    pool, backend, _ = make_pool()
    z = pool.alloc(0, "w")
    assert (z.segment, z.offset, z.nbytes) == (EMPTY_SEGMENT, 0, 0)
    assert backend.created == 0
    assert pool.stats().allocations == 1
    pool.free(z.id)
    with pytest.raises(NotFound, match="not live") as e:
        pool.free(z.id)
    assert e.value.field == "alloc_id"


def test_free_owner_frees_only_that_owner() -> None:
    pool, _, _ = make_pool()
    dead = [pool.alloc(n, "dead") for n in (A, 0, 5 * A)]
    alive = pool.alloc(A, "alive")
    assert pool.free_owner("dead") == 3
    assert pool.free_owner("dead") == 0
    assert pool.allocations() == [alive]
    assert pool.get(alive.id) == alive
    with pytest.raises(NotFound):
        pool.get(dead[0].id)
    check_exact(pool)


def test_fragmentation_on_a_constructed_case() -> None:
    pool, _, _ = make_pool(capacity=SEG, segment=8 * A)
    blocks = [pool.alloc(A, "w") for _ in range(8)]  # the segment, full
    assert pool.stats().fragmentation == 0.0  # no free bytes at all
    for a in blocks[0::2]:
        pool.free(a.id)  # four separate one-unit holes
    st = pool.stats()
    assert (st.free_bytes, st.largest_free_block_bytes) == (4 * A, A)
    assert st.fragmentation == pytest.approx(0.75)
    pool.free(blocks[1].id)  # holes 0..2 merge: 3 units, plus two of 1
    st = pool.stats()
    assert (st.free_bytes, st.largest_free_block_bytes) == (5 * A, 3 * A)
    assert st.fragmentation == pytest.approx(0.4)


def test_alloc_free_is_fast_with_thousands_live() -> None:
    pool, _, _ = make_pool(capacity=1 << 40, segment=1 << 24)
    rng = random.Random(1)
    live = [pool.alloc(rng.randrange(1, 64 * A), "w") for _ in range(5000)]
    for a in live[::2]:
        pool.free(a.id)  # a fragmented free list, thousands long
    sizes = [rng.randrange(1, 64 * A) for _ in range(2000)]
    samples = []
    for n in sizes:
        t0 = time.perf_counter()
        a = pool.alloc(n, "w")
        pool.free(a.id)
        samples.append(time.perf_counter() - t0)
    median_us = statistics.median(samples) * 1e6
    assert median_us < 100, f"median alloc+free {median_us:.1f} us"


def test_host_backend_creates_and_deletes_real_files(tmp_path: Path) -> None:
    root = tmp_path / "segments"
    backend = HostBackend(root)
    pool = SegmentPool("host", 4 * SEG, backend, segment_bytes=SEG, clock=FakeClock())
    a = pool.alloc(100, "w")
    big = pool.alloc(2 * SEG, "w")
    for seg in (a.segment, big.segment):
        path = backend.path(seg)
        assert path.is_file()
        assert path.stat().st_size == pool.segments()[seg]
    assert sorted(p.name for p in root.iterdir()) == sorted(pool.segments())  # no temp files
    pool.free(big.id)
    assert pool.release_idle(now=100.0, keep_alive_s=1.0) == [big.segment]
    assert not backend.path(big.segment).exists()
    pool.close()
    assert list(root.iterdir()) == []
    assert pool.stats().reserved_bytes == 0


def test_a_restored_host_pool_keeps_its_files_and_their_bytes(tmp_path: Path) -> None:
    backend = HostBackend(tmp_path / "segments")
    pool = SegmentPool("host", 4 * SEG, backend, segment_bytes=SEG, clock=FakeClock())
    a = pool.alloc(100, "w")
    path = backend.path(a.segment)
    with path.open("r+b") as f:
        f.seek(a.offset)
        f.write(b"swapped")
    again = SegmentPool(
        "host", 4 * SEG, HostBackend(tmp_path / "segments"), segment_bytes=SEG, clock=FakeClock()
    )
    again.restore(pool.segments(), pool.allocations())
    with path.open("rb") as f:
        f.seek(a.offset)
        assert f.read(7) == b"swapped"
    path.unlink()  # a segment whose file is gone is made anew, whole
    third = SegmentPool(
        "host", 4 * SEG, HostBackend(tmp_path / "segments"), segment_bytes=SEG, clock=FakeClock()
    )
    third.restore(pool.segments(), pool.allocations())
    assert path.stat().st_size == SEG


def test_a_restored_pool_is_the_pool_it_was_saved_from() -> None:
    pool, _, _ = make_pool()
    rng = random.Random(7)
    live = [pool.alloc(rng.randrange(1, SEG // 3), f"w{i % 3}") for i in range(40)]
    for a in live[::3]:
        pool.free(a.id)
    saved_segments, saved = pool.segments(), pool.allocations()
    again, _, _ = make_pool()
    again.restore(saved_segments, saved)
    check_exact(again)
    assert again.stats() == pool.stats()
    assert again.allocations() == saved
    # It goes on as the original would: new ids, no overlap with restored blocks.
    fresh = again.alloc(SEG // 4, "w9")
    assert fresh.id > max(a.id for a in saved)
    check_exact(again)
    assert again.free_owner("w1") > 0
    check_exact(again)


def test_a_hold_keeps_room_without_memory_and_segments_never_grow_into_it() -> None:
    pool, backend, clock = make_pool(capacity=4 * SEG)
    pool.hold("t/f", 2 * SEG)  # a function's intermediates: torch allocates them, not us
    assert backend.held_bytes == 0  # no segment, no device call
    st = pool.stats()
    assert (st.held_bytes, st.reserved_bytes) == (2 * SEG, 0)
    a = pool.alloc(2 * SEG, "store")  # the rest of the device
    with pytest.raises(ResourceExhausted, match="held for other allocators"):
        pool.alloc(A, "store")
    # Growing the hold gives back an empty segment still in its keep-alive, not a live one.
    pool.free(a.id)
    clock.now = 1.0
    pool.hold("t/f", 3 * SEG)
    assert pool.segments() == {}
    assert backend.destroyed == 1
    b = pool.alloc(SEG, "store")
    with pytest.raises(ResourceExhausted, match="cannot hold"):  # B is live: no room
        pool.hold("t/g", SEG)
    assert pool.holds() == {"t/f": 3 * SEG}  # unchanged
    pool.hold("t/f", 0)  # let go
    assert pool.stats().held_bytes == 0
    pool.hold("t/g", 3 * SEG)
    pool.free(b.id)
    check_exact(pool)
    with pytest.raises(InvalidArgument):
        pool.hold("t/g", -1)


def test_the_default_host_pool_fits_the_shared_memory_file_system(tmp_path: Path) -> None:
    import os  # noqa: PLC0415

    from gpufaas.memory.devices import _default_host_pool  # noqa: PLC0415
    from gpufaas.shared.messages import DeviceInfo  # noqa: PLC0415

    fs = os.statvfs(tmp_path)
    huge = DeviceInfo(name="host", kind="host", model="host memory", memory_bytes=2**60)
    assert _default_host_pool(huge, tmp_path) == fs.f_blocks * fs.f_frsize // 2
    small = DeviceInfo(name="host", kind="host", model="host memory", memory_bytes=4 * 2**20)
    assert _default_host_pool(small, tmp_path) == 2**20  # a quarter of the host's memory
