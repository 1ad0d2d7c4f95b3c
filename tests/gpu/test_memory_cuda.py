"""The memory service's pool on a real GPU: segments are cudaMalloc'd, exported by CUDA IPC
handle, sub-allocated into blocks another process reads by (handle, offset), and given
back to the driver when idle. Skipped (with the reason) on machines without CUDA."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from gpufaas.memory.pool import CUDA_ALIGN_BYTES, CudaBackend, SegmentPool
from gpufaas.shared.errors import ResourceExhausted

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine"),
]

MIB = 2**20
GIB = 2**30

# Reads a block of a segment exported by another process: (handle, offset, nbytes) in,
# the int32 sum and the first and last values out.
CHILD = """
import sys, torch
from gpufaas.shared.cuda_ipc import open_segment
handle, offset, nbytes = bytes.fromhex(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
block = open_segment(handle, offset + nbytes, 0).narrow(0, offset, nbytes).view(torch.int32)
print(int(block.sum()), int(block[0]), int(block[-1]))
"""


def cuda_pool(segment_bytes: int = 64 * MIB, capacity: int = 8 * GIB) -> SegmentPool:
    return SegmentPool(
        "gpu:0", capacity, CudaBackend(0), segment_bytes=segment_bytes, align_bytes=CUDA_ALIGN_BYTES
    )


def driver_free() -> int:
    from gpufaas.shared.cuda_ipc import mem_get_info  # noqa: PLC0415 - needs cupy

    return mem_get_info(0)[0]


def test_blocks_of_one_cudamalloc_segment_share_its_handle_at_distinct_offsets() -> None:
    pool = cuda_pool()
    backend = pool.backend
    assert isinstance(backend, CudaBackend)
    try:
        a, b = pool.alloc(1000, "t"), pool.alloc(3 * MIB + 5, "t")
        assert a.segment == b.segment
        assert a.handle is not None
        assert len(a.handle) == 64  # cudaIpcMemHandle_t
        assert a.handle == b.handle == backend.segments[a.segment].handle
        assert a.offset != b.offset
        ptr = backend.segments[a.segment].ptr
        assert all((ptr + x.offset) % CUDA_ALIGN_BYTES == 0 for x in (a, b))
        assert backend.held_bytes == pool.stats().reserved_bytes == 64 * MIB
    finally:
        pool.close()
    assert backend.held_bytes == 0


def test_another_process_reads_the_bytes_written_at_a_block_offset() -> None:
    from gpufaas.shared.cuda_ipc import open_segment, write_at  # noqa: PLC0415

    pool = cuda_pool()
    try:
        first = pool.alloc(4096, "t")
        block = pool.alloc(MIB, "t")
        assert block.handle is not None
        assert block.offset > 0
        data = torch.arange(block.nbytes // 4, dtype=torch.int32) * 3 + 7
        head = torch.full((first.nbytes // 4,), -1, dtype=torch.int32)
        base = open_segment(block.handle, block.offset + block.nbytes, 0)  # ours: in place
        write_at(base, block.offset, memoryview(data.numpy().tobytes()))
        write_at(base, first.offset, memoryview(head.numpy().tobytes()))
        out = subprocess.run(
            [sys.executable, "-c", CHILD, block.handle.hex(), str(block.offset), str(block.nbytes)],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        total, lo, hi = map(int, out.stdout.split())
        assert (total, lo, hi) == (int(data.sum()), int(data[0]), int(data[-1]))
    finally:
        pool.close()


def test_an_idle_segment_goes_back_to_the_driver() -> None:
    pool = cuda_pool(segment_bytes=GIB)
    before = driver_free()
    a = pool.alloc(10, "t")
    held = driver_free()
    assert before - held >= GIB - 64 * MIB, (before, held)
    pool.free(a.id)
    assert pool.release_idle(now=1e12, keep_alive_s=0.0) == [a.segment]
    after = driver_free()
    assert after - held >= GIB - 64 * MIB, (held, after)
    assert pool.stats().reserved_bytes == 0


def test_an_idle_segment_is_freed_once_its_reader_is_gone() -> None:
    pool = cuda_pool(segment_bytes=GIB)
    a = pool.alloc(MIB, "t")
    assert a.handle is not None
    held = driver_free()
    subprocess.run(
        [sys.executable, "-c", CHILD, a.handle.hex(), str(a.offset), str(MIB)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    pool.free(a.id)
    pool.release_idle(now=1e12, keep_alive_s=0.0)
    assert driver_free() - held >= GIB - 64 * MIB


def test_more_than_the_gpu_has_is_resource_exhausted_and_cuda_goes_on() -> None:
    total = torch.cuda.get_device_properties(0).total_memory
    pool = cuda_pool(capacity=4 * total)
    with pytest.raises(ResourceExhausted, match="out of memory"):
        pool.alloc(2 * total, "t")
    assert pool.stats().reserved_bytes == 0
    a = pool.alloc(MIB, "t")  # the failed cudaMalloc left no error behind
    assert a.handle is not None
    assert float(torch.ones(4, device="cuda:0").sum()) == 4.0
    pool.close()


def test_an_idle_worker_gives_torchs_cached_intermediates_back() -> None:
    from gpufaas.worker.lanes import trim_cuda_cache  # noqa: PLC0415

    x = torch.empty(64 * MIB, dtype=torch.uint8, device="cuda:0")
    del x  # cached by torch's allocator, not yet the driver's
    assert torch.cuda.memory_reserved(0) >= 64 * MIB
    assert trim_cuda_cache(0) >= 64 * MIB
    assert torch.cuda.memory_reserved(0) < 64 * MIB


def test_a_hold_takes_no_device_memory() -> None:
    pool = cuda_pool()
    before = driver_free()
    pool.hold("t/f", GIB)
    assert driver_free() >= before - 8 * MIB  # nothing allocated (allow driver noise)
    assert pool.stats().held_bytes == GIB
