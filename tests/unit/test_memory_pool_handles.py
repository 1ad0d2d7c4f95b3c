"""Blocks name their segment's handle and offset: the pool's bookkeeping for a backend
whose segments are opened by handle (a real GPU's), and the messages that carry them."""

from __future__ import annotations

import itertools
from pathlib import Path

import msgspec
import pytest

from gpufaas.memory.pool import (
    CUDA_ALIGN_BYTES,
    CUDA_SEGMENT_BYTES,
    HostBackend,
    SegmentPool,
    SimBackend,
)
from gpufaas.shared.errors import NotFound
from gpufaas.shared.messages import (
    DevicePlacement,
    DeviceRef,
    DeviceSegment,
    MemAllocation,
    decode,
    decode_json,
    encode,
    encode_json,
)

pytestmark = pytest.mark.unit

A = CUDA_ALIGN_BYTES
SEG = 64 * A


_SERIAL = itertools.count(1)  # every segment ever made: a handle of its own


class HandleBackend:
    """A backend whose segments are opened by handle, recording what it creates and
    destroys; ``adopt`` makes new memory (a new handle), as a real GPU's backend does."""

    def __init__(self) -> None:
        self.handles: dict[str, bytes] = {}
        self.created: list[tuple[str, int]] = []
        self.destroyed: list[str] = []

    def create(self, segment_id: str, nbytes: int) -> None:
        self.handles[segment_id] = next(_SERIAL).to_bytes(64, "little")  # as CUDA's: 64 B
        self.created.append((segment_id, nbytes))

    def adopt(self, segment_id: str, nbytes: int) -> None:
        self.create(segment_id, nbytes)

    def destroy(self, segment_id: str) -> None:
        if self.handles.pop(segment_id, None) is not None:
            self.destroyed.append(segment_id)

    def handle(self, segment_id: str) -> bytes | None:
        return self.handles[segment_id]


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def make_pool(capacity: int = 8 * SEG) -> tuple[SegmentPool, HandleBackend, Clock]:
    backend, clock = HandleBackend(), Clock()
    pool = SegmentPool("gpu:0", capacity, backend, segment_bytes=SEG, align_bytes=A, clock=clock)
    return pool, backend, clock


def test_blocks_of_one_segment_share_its_handle_at_distinct_aligned_offsets() -> None:
    pool, backend, _ = make_pool()
    a, b, c = pool.alloc(1000, "store"), pool.alloc(5000, "store"), pool.alloc(1, "transfer")
    assert a.segment == b.segment == c.segment
    assert backend.created == [(a.segment, SEG)]
    assert a.handle == b.handle == c.handle == backend.handles[a.segment] == pool.handle(a.segment)
    assert len({a.offset, b.offset, c.offset}) == 3
    assert all(x.offset % A == 0 for x in (a, b, c))
    assert (a.offset, b.offset, c.offset) == (0, 2 * A, 12 * A)  # 1000 -> 2A, 5000 -> 10A


def test_a_large_block_gets_a_segment_and_handle_of_its_own() -> None:
    pool, backend, _ = make_pool()
    small = pool.alloc(A, "w")
    big = pool.alloc(3 * SEG + 1, "w")
    assert big.segment != small.segment
    assert big.handle != small.handle
    assert big.offset == 0
    assert backend.created[-1] == (big.segment, 3 * SEG + A)  # the request, aligned
    assert pool.fits(SEG - A)
    assert pool.fits(0)
    assert not pool.fits(SEG)


def test_idle_segments_are_destroyed_once_and_their_handles_forgotten() -> None:
    pool, backend, clock = make_pool()
    a = pool.alloc(A, "w")
    big = pool.alloc(2 * SEG, "w")
    pool.free(a.id)
    pool.free(big.id)
    clock.now = 5.0
    assert pool.release_idle(clock.now, keep_alive_s=10.0) == []
    assert backend.destroyed == []
    assert sorted(pool.release_idle(100.0, keep_alive_s=10.0)) == sorted([a.segment, big.segment])
    assert sorted(backend.destroyed) == sorted([a.segment, big.segment])
    assert backend.handles == {}
    with pytest.raises(NotFound):
        pool.handle(a.segment)
    again = pool.alloc(A, "w")  # a new segment, a new handle
    assert again.handle is not None
    assert again.handle not in (a.handle, big.handle)
    pool.close()
    assert backend.handles == {}
    assert pool.stats().reserved_bytes == 0


def test_a_restored_pool_hands_out_the_new_memory_s_handles() -> None:
    pool, _, _ = make_pool()
    blocks = [pool.alloc(n, "store") for n in (100, 3000, SEG - 4 * A, 2 * SEG)]
    pool.free(blocks[1].id)
    saved_segments = pool.segments()
    saved = pool.allocations()
    again, backend, _ = make_pool()
    again.restore(saved_segments, saved)
    restored = again.allocations()
    assert [(a.id, a.segment, a.offset, a.nbytes) for a in restored] == [
        (a.id, a.segment, a.offset, a.nbytes) for a in saved
    ]
    for a in restored:  # same blocks, the handles of the re-created segments
        assert a.handle == backend.handles[a.segment] == again.handle(a.segment)
        assert a.handle != next(s.handle for s in saved if s.id == a.id)


def test_sim_and_host_segments_have_no_handle(tmp_path: Path) -> None:
    assert HostBackend(tmp_path).handle("any") is None
    pool = SegmentPool("sim:0", 4 * SEG, SimBackend())
    a = pool.alloc(10, "w")
    assert a.handle is None
    assert pool.handle(a.segment) is None


def test_cuda_defaults_are_large_aligned_segments() -> None:
    assert CUDA_SEGMENT_BYTES >= 256 * 2**20
    assert CUDA_SEGMENT_BYTES % CUDA_ALIGN_BYTES == 0
    assert CUDA_ALIGN_BYTES >= 512
    assert CUDA_ALIGN_BYTES & (CUDA_ALIGN_BYTES - 1) == 0


# --- the messages --------------------------------------------------------------------------


def test_an_allocation_carries_its_handle_and_offset_both_ways() -> None:
    handle = bytes(range(64))
    a = MemAllocation(
        id=3, device="gpu:0", segment="s1", offset=4096, nbytes=10, owner="o", handle=handle
    )
    assert decode(encode(a), MemAllocation) == a
    assert decode_json(encode_json(a), MemAllocation) == a  # as kept in KV


def test_an_old_sender_s_allocation_still_decodes() -> None:
    old = {
        "type": "mem_allocation.v1",
        "id": 1,
        "device": "gpu:0",
        "segment": "s",
        "offset": 512,
        "nbytes": 9,
        "owner": "o",
    }
    a = decode(msgspec.msgpack.encode(old), MemAllocation)
    assert (a.handle, a.offset) == (None, 512)
    assert decode_json(msgspec.json.encode(old), MemAllocation).handle is None


def test_device_segments_say_where_the_block_starts() -> None:
    seg = DeviceSegment(id="t1", nbytes=4096 + 100, ipc_handle=b"h" * 64, offset=4096)
    placed = DevicePlacement(
        device="gpu:0",
        refs={"x": DeviceRef(segment="t1", offset=4096 + 0)},
        segments=[seg],
        bytes_copied=100,
        used_bytes=100,
    )
    assert decode(encode(placed), DevicePlacement) == placed
    old = {"type": "device_segment.v1", "id": "t1", "nbytes": 100, "ipc_handle": b"h" * 64}
    assert decode(msgspec.msgpack.encode(old), DeviceSegment).offset == 0
