"""The copy engine on real GPUs: chunked, pipelined copies through pinned staging buffers.

A copy from a host segment (pageable shared memory) to a GPU goes chunk by chunk through
a ring of pinned host buffers allocated and registered once at start-up: the CPU fills
one slot while the copy engine drains another, so the PCIe link sees pinned-speed DMA
without pinning anything on the request path. The chunk size comes from a calibration
at start-up: large enough that the per-copy launch overhead (10-20 µs from Python)
costs at most ``OVERHEAD_SHARE`` of a chunk's time on the measured link. GPU→GPU copies
go device to device (NVLink/P2P when the driver has peer access, never through a host
buffer we own).

Only constructed on a node whose probe found CUDA; nothing here runs on a CPU box, and
it has not run on a GPU yet (see docs/ROADMAP.md).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

OVERHEAD_SHARE = 0.05  # launch overhead as a share of one chunk's copy time, at most
MIN_CHUNK_BYTES = 2 * 2**20
MAX_CHUNK_BYTES = 64 * 2**20
RING_SLOTS = 4
PIPELINE_CHUNKS = 16  # a copy is cut into this many chunks at least, down to the minimum


@dataclass(frozen=True, slots=True)
class Calibration:
    """Measured at start-up on one GPU: per-copy overhead and pinned host→GPU bandwidth."""

    overhead_s: float
    pinned_bps: float
    chunk_bytes: int


def chunk_size(overhead_s: float, bandwidth_bps: float) -> int:
    """The smallest chunk whose launch overhead is at most OVERHEAD_SHARE of its copy time."""
    want = overhead_s * bandwidth_bps / OVERHEAD_SHARE
    size = 1 << max(0, int(want - 1).bit_length())  # a power of two, rounded up
    return max(MIN_CHUNK_BYTES, min(MAX_CHUNK_BYTES, size))


def copy_chunk(nbytes: int, calibrated: int) -> int:
    """The chunk for one copy: the calibrated size, smaller for a copy of few chunks, so
    that staging the first chunk (before any DMA overlaps it) is at most about a
    ``PIPELINE_CHUNKS``-th of the copy: a power of two, ``MIN_CHUNK_BYTES`` at least."""
    want = 1 << max(0, int(-(-nbytes // PIPELINE_CHUNKS) - 1).bit_length())
    return max(MIN_CHUNK_BYTES, min(calibrated, want))


class CudaCopyEngine:
    """Pinned staging ring and one copy stream per GPU, set up once."""

    def __init__(self, device_index: int, *, slots: int = RING_SLOTS) -> None:
        import torch  # noqa: PLC0415 - only on CUDA nodes

        self.device = torch.device("cuda", device_index)
        self.stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        self.calibration = self._calibrate()
        n = self.calibration.chunk_bytes
        self.ring = [torch.empty(n, dtype=torch.uint8, pin_memory=True) for _ in range(slots)]
        self.done = [torch.cuda.Event() for _ in range(slots)]  # type: ignore[no-untyped-call]
        for ev in self.done:
            ev.record(self.stream)

    def _calibrate(self) -> Calibration:
        import torch  # noqa: PLC0415

        small = torch.empty(4096, dtype=torch.uint8, pin_memory=True)
        big = torch.empty(256 * 2**20, dtype=torch.uint8, pin_memory=True)
        dst = torch.empty(big.numel(), dtype=torch.uint8, device=self.device)
        with torch.cuda.stream(self.stream):
            for _ in range(10):  # warm up
                dst[:4096].copy_(small, non_blocking=True)
            self.stream.synchronize()
            t0 = time.perf_counter()
            for _ in range(200):
                dst[:4096].copy_(small, non_blocking=True)
            self.stream.synchronize()
            overhead = (time.perf_counter() - t0) / 200
            t0 = time.perf_counter()
            dst.copy_(big, non_blocking=True)
            self.stream.synchronize()
            bandwidth = big.numel() / (time.perf_counter() - t0)
        return Calibration(overhead, bandwidth, chunk_size(overhead, bandwidth))

    def host_to_device(self, src: memoryview, dst: torch.Tensor) -> float:
        """Copy host bytes into a uint8 device tensor through the ring; returns seconds."""
        import torch  # noqa: PLC0415

        n = copy_chunk(len(src), self.calibration.chunk_bytes)
        host = torch.frombuffer(src, dtype=torch.uint8) if len(src) else None
        t0 = time.perf_counter()
        with torch.cuda.stream(self.stream):
            for i, offset in enumerate(range(0, len(src), n)):
                size = min(n, len(src) - offset)
                slot = i % len(self.ring)
                self.done[slot].synchronize()  # the slot's previous chunk has left it
                assert host is not None
                self.ring[slot][:size].copy_(host[offset : offset + size])  # CPU: pageable→pinned
                dst[offset : offset + size].copy_(self.ring[slot][:size], non_blocking=True)
                self.done[slot].record(self.stream)
        self.stream.synchronize()
        return time.perf_counter() - t0

    def device_to_device(self, src: torch.Tensor, dst: torch.Tensor) -> float:
        """GPU→GPU (peer access over NVLink/P2P when enabled by the driver); seconds."""
        import torch  # noqa: PLC0415

        t0 = time.perf_counter()
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)
        self.stream.synchronize()
        return time.perf_counter() - t0


def multipath_host_to_device(
    engines: Mapping[str, CudaCopyEngine],
    src: memoryview,
    dst: torch.Tensor,
    parts: Sequence[tuple[tuple[str, ...], int, int]],
) -> float:
    """Copy host bytes to ``dst`` over several routes at once; returns seconds.

    ``parts`` are (hops, offset, nbytes) from the planner: ``("host", "gpu:0")`` goes
    straight through gpu:0's ring; ``("host", "gpu:2", "gpu:0")`` lands the bytes on gpu:2
    through gpu:2's own PCIe link and ring, then moves them over NVLink. Each route runs on
    its own thread and stream, so the PCIe links work in parallel.
    """
    import torch  # noqa: PLC0415

    def one(hops: tuple[str, ...], offset: int, nbytes: int) -> None:
        target = dst[offset : offset + nbytes]
        if len(hops) == 2:
            engines[hops[1]].host_to_device(src[offset : offset + nbytes], target)
            return
        first = engines[hops[1]]
        staged = torch.empty(nbytes, dtype=torch.uint8, device=first.device)
        first.host_to_device(src[offset : offset + nbytes], staged)
        first.device_to_device(staged, target)  # peer access: NVLink, relays by the driver

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, len(parts))) as pool:
        for f in [pool.submit(one, *part) for part in parts]:
            f.result()
    return time.perf_counter() - t0
