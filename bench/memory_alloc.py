"""Allocation cost and memory held at idle: the memory manager's pool vs torch's caching allocator.

The same workload for both, in one run: a burst of allocations of mixed sizes (a few
large model-like blocks, many small intermediates), frees in random order, then idle.
For the pool (``gpufaas.memory.pool``, simulated backend: bookkeeping only, which is
what its alloc/free cost is) it prints the median and p99 alloc+free time and what the
pool still holds after the keep-alive. With a CUDA GPU it runs the same workload through
``torch.empty(..., device="cuda")`` and prints torch's times and
``torch.cuda.memory_reserved()`` at idle (the caching allocator keeps what it reserved
until ``empty_cache()``). Without a GPU that half prints "untested" (never simulated).

    .venv/bin/python bench/memory_alloc.py --ops 20000 --json /tmp/alloc.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from gpufaas.memory.pool import SegmentPool, SimBackend

MIB = 2**20


def workload(ops: int, seed: int) -> list[int]:
    """Sizes: 1 in 50 a 64-512 MiB block, the rest 4 KiB-8 MiB intermediates."""
    rng = random.Random(seed)
    return [
        rng.randrange(64 * MIB, 512 * MIB) if rng.random() < 0.02 else rng.randrange(4096, 8 * MIB)
        for _ in range(ops)
    ]


def run_pool(sizes: list[int], live: int, capacity: int) -> dict[str, Any]:
    now = [0.0]
    pool = SegmentPool("gpu:0", capacity, SimBackend(), clock=lambda: now[0])
    rng = random.Random(1)
    held: list[int] = []
    times: list[float] = []
    for n in sizes:
        t0 = time.perf_counter()
        held.append(pool.alloc(n, "bench").id)
        if len(held) > live:
            pool.free(held.pop(rng.randrange(len(held))))
        times.append(time.perf_counter() - t0)
    peak = pool.stats().reserved_bytes
    for a in held:
        pool.free(a)
    now[0] += 1e6
    pool.release_idle(now[0], keep_alive_s=60.0)
    return {"median_us": statistics.median(times) * 1e6,
            "p99_us": sorted(times)[int(len(times) * 0.99)] * 1e6,
            "peak_reserved_mib": peak / MIB,
            "idle_reserved_mib": pool.stats().reserved_bytes / MIB}  # fmt: skip


def run_torch(sizes: list[int], live: int) -> dict[str, Any] | None:
    if not torch.cuda.is_available():
        return None
    rng = random.Random(1)
    held: list[torch.Tensor] = []
    times: list[float] = []
    for n in sizes:
        t0 = time.perf_counter()
        held.append(torch.empty(n, dtype=torch.uint8, device="cuda"))
        if len(held) > live:
            held.pop(rng.randrange(len(held)))
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.memory_reserved()
    held.clear()
    return {"gpu": torch.cuda.get_device_name(0),
            "median_us": statistics.median(times) * 1e6,
            "p99_us": sorted(times)[int(len(times) * 0.99)] * 1e6,
            "peak_reserved_mib": peak / MIB,
            "idle_reserved_mib": torch.cuda.memory_reserved() / MIB}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--ops", type=int, default=20000, help="allocations in the workload")
    ap.add_argument("--live", type=int, default=200, help="allocations held at once")
    ap.add_argument("--capacity-gib", type=float, default=70.0, help="the pool's device budget")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, metavar="PATH")
    args = ap.parse_args(argv)
    sizes = workload(args.ops, args.seed)
    pool = run_pool(sizes, args.live, int(args.capacity_gib * 2**30))
    print(f"workload: {args.ops} allocations, {args.live} held at once, seed {args.seed}")
    print(f"  pool (measured on this CPU, bookkeeping): alloc+free median {pool['median_us']:.1f} "
          f"us, p99 {pool['p99_us']:.1f} us; reserved at peak {pool['peak_reserved_mib']:,.0f} "
          f"MiB, after the keep-alive {pool['idle_reserved_mib']:,.0f} MiB")  # fmt: skip
    torch_figures = run_torch(sizes, args.live)
    if torch_figures is None:
        print("  torch caching allocator: no CUDA GPU here, untested")
    else:
        t = torch_figures
        print(f"  torch caching allocator on {t['gpu']}: alloc+free median {t['median_us']:.1f} "
              f"us, p99 {t['p99_us']:.1f} us; reserved at peak {t['peak_reserved_mib']:,.0f} "
              f"MiB, at idle {t['idle_reserved_mib']:,.0f} MiB")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"pool": pool, "torch": torch_figures}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
