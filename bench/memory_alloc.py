"""Allocation cost and memory held at idle: the memory manager's pool vs torch's caching allocator.

The same workload for every allocator, in one run: a burst of allocations of mixed sizes
(a few large model-like blocks, many small intermediates), frees in random order, then
idle. First the pool's bookkeeping alone (``gpufaas.memory.pool`` with the simulated
backend: what its alloc/free cost is on this CPU). Then, with a CUDA GPU, the GPU half:

* the pool with the ``CudaBackend``: its segments are real ``cudaMalloc`` allocations
  (256 MiB, or the request if larger), exported by CUDA IPC handle, as the node's memory
  service holds them; after the burst, ``release_idle`` past the keep-alive;
* ``torch.empty(..., device="cuda")`` (torch's caching allocator), which keeps what it
  reserved until ``empty_cache()``.

For each it prints alloc+free median and p99 in µs, the memory reserved at the peak and
at idle (pool: its reserved bytes after ``release_idle``; torch: ``memory_reserved()``),
and the driver's view at idle (``mem_get_info``: used memory above what was used before
the workload), the GPU's name, and the ratios. The pool runs first, so torch's cache does
not count against it. Without a GPU (or without cupy) the GPU half prints "untested"
(never simulated).

    .venv/bin/python bench/memory_alloc.py --ops 20000 --json /tmp/alloc.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gpufaas.memory.pool import (
    CUDA_ALIGN_BYTES,
    CUDA_SEGMENT_BYTES,
    CudaBackend,
    SegmentBackend,
    SegmentPool,
    SimBackend,
)

MIB = 2**20


def workload(ops: int, seed: int) -> list[int]:
    """Sizes: 1 in 50 a 64-512 MiB block, the rest 4 KiB-8 MiB intermediates."""
    rng = random.Random(seed)
    return [
        rng.randrange(64 * MIB, 512 * MIB) if rng.random() < 0.02 else rng.randrange(4096, 8 * MIB)
        for _ in range(ops)
    ]


def _times(times: list[float]) -> dict[str, float]:
    return {
        "median_us": statistics.median(times) * 1e6,
        "p99_us": sorted(times)[int(len(times) * 0.99)] * 1e6,
    }


def run_pool(
    sizes: list[int],
    live: int,
    capacity: int,
    backend: SegmentBackend,
    *,
    segment_bytes: int | None = None,
    align_bytes: int | None = None,
    driver_used: Callable[[], int] | None = None,
) -> dict[str, Any]:
    """The workload through a pool of ``backend``; ``driver_used`` (a real GPU): the
    device's used bytes, read before the burst and after the keep-alive."""
    now = [0.0]
    extra: dict[str, Any] = {}
    if segment_bytes is not None:
        extra["segment_bytes"] = segment_bytes
    if align_bytes is not None:
        extra["align_bytes"] = align_bytes
    pool = SegmentPool("gpu:0", capacity, backend, clock=lambda: now[0], **extra)
    base = driver_used() if driver_used else 0
    rng = random.Random(1)
    held: list[int] = []
    times: list[float] = []
    for n in sizes:
        t0 = time.perf_counter()
        held.append(pool.alloc(n, "bench").id)
        if len(held) > live:
            pool.free(held.pop(rng.randrange(len(held))))
        times.append(time.perf_counter() - t0)
    st = pool.stats()
    peak, segments = st.reserved_bytes, st.segments
    for a in held:
        pool.free(a)
    now[0] += 1e6
    pool.release_idle(now[0], keep_alive_s=60.0)
    out = {
        **_times(times),
        "peak_reserved_mib": peak / MIB,
        "peak_segments": segments,
        "idle_reserved_mib": pool.stats().reserved_bytes / MIB,
    }
    if driver_used:
        out["idle_driver_used_mib"] = (driver_used() - base) / MIB
    pool.close()
    return out


def gpu_half() -> str | None:
    """Why the GPU half cannot run here (None: it can)."""
    if not torch.cuda.is_available():
        return "no CUDA GPU here"
    if importlib.util.find_spec("cupy") is None:
        return "cupy is not installed (pip install 'gpufaas[gpu]')"
    return None


def run_pool_cuda(sizes: list[int], live: int, capacity: int) -> dict[str, Any]:
    from gpufaas.shared.cuda_ipc import mem_get_info  # noqa: PLC0415 - needs cupy

    def used() -> int:
        free, total = mem_get_info(0)
        return total - free

    used()  # the CUDA context first: it is no part of either allocator's figures
    out = run_pool(
        sizes,
        live,
        capacity,
        CudaBackend(0),
        segment_bytes=CUDA_SEGMENT_BYTES,
        align_bytes=CUDA_ALIGN_BYTES,
        driver_used=used,
    )
    out["gpu"] = torch.cuda.get_device_name(0)
    return out


def run_torch(sizes: list[int], live: int) -> dict[str, Any]:
    def used() -> int:
        free, total = torch.cuda.mem_get_info(0)
        return total - free

    torch.zeros(1, device="cuda:0")  # torch's CUDA state first, as for the pool
    torch.cuda.synchronize()
    base = used()
    rng = random.Random(1)
    held: list[torch.Tensor] = []
    times: list[float] = []
    for n in sizes:
        t0 = time.perf_counter()
        held.append(torch.empty(n, dtype=torch.uint8, device="cuda:0"))
        if len(held) > live:
            held.pop(rng.randrange(len(held)))
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.memory_reserved(0)
    held.clear()
    torch.cuda.synchronize()
    return {
        "gpu": torch.cuda.get_device_name(0),
        **_times(times),
        "peak_reserved_mib": peak / MIB,
        "idle_reserved_mib": torch.cuda.memory_reserved(0) / MIB,
        "idle_driver_used_mib": (used() - base) / MIB,
    }


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a (torch 0)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--ops", type=int, default=20000, help="allocations in the workload")
    ap.add_argument("--live", type=int, default=200, help="allocations held at once")
    ap.add_argument("--capacity-gib", type=float, default=70.0, help="the pool's device budget")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, metavar="PATH")
    args = ap.parse_args(argv)
    sizes = workload(args.ops, args.seed)
    capacity = int(args.capacity_gib * 2**30)
    pool = run_pool(sizes, args.live, capacity, SimBackend())
    print(f"workload: {args.ops} allocations, {args.live} held at once, seed {args.seed}")
    print(
        f"  pool bookkeeping (measured on this CPU, simulated backend): alloc+free median "
        f"{pool['median_us']:.1f} us, p99 {pool['p99_us']:.1f} us; reserved at peak "
        f"{pool['peak_reserved_mib']:,.0f} MiB, after the keep-alive "
        f"{pool['idle_reserved_mib']:,.0f} MiB"
    )
    why_not = gpu_half()
    cuda: dict[str, Any] | None = None
    torch_figures: dict[str, Any] | None = None
    if why_not is not None:
        print(f"  pool on the GPU (CudaBackend): {why_not}, untested")
        print(f"  torch caching allocator: {why_not}, untested")
    else:
        cuda = run_pool_cuda(sizes, args.live, capacity)
        torch_figures = run_torch(sizes, args.live)
        c, t = cuda, torch_figures
        print(f"GPU: {c['gpu']} (measured)")
        print(
            f"  pool, CudaBackend ({CUDA_SEGMENT_BYTES // MIB} MiB cudaMalloc segments by IPC "
            f"handle): alloc+free median {c['median_us']:.1f} us, p99 {c['p99_us']:.1f} us; "
            f"reserved at peak {c['peak_reserved_mib']:,.0f} MiB in {c['peak_segments']} "
            f"segments; at idle (after release_idle) {c['idle_reserved_mib']:,.0f} MiB "
            f"reserved, {c['idle_driver_used_mib']:,.0f} MiB more used by the driver's "
            f"count than before"
        )
        print(
            f"  torch caching allocator (torch.empty): alloc+free median {t['median_us']:.1f} "
            f"us, p99 {t['p99_us']:.1f} us; reserved at peak {t['peak_reserved_mib']:,.0f} "
            f"MiB; at idle memory_reserved() {t['idle_reserved_mib']:,.0f} MiB, "
            f"{t['idle_driver_used_mib']:,.0f} MiB more used by the driver's count than "
            f"before"
        )
        print(
            f"  ratios pool/torch: median {_ratio(c['median_us'], t['median_us'])}, p99 "
            f"{_ratio(c['p99_us'], t['p99_us'])}, reserved at peak "
            f"{_ratio(c['peak_reserved_mib'], t['peak_reserved_mib'])}, held at idle "
            f"{c['idle_reserved_mib']:,.0f} vs {t['idle_reserved_mib']:,.0f} MiB "
            f"(driver: {c['idle_driver_used_mib']:,.0f} vs {t['idle_driver_used_mib']:,.0f} "
            f"MiB)"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"pool": pool, "pool_cuda": cuda, "torch": torch_figures}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
