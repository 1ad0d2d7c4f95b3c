"""Host→GPU copies on a real GPU: the transfer engine's chunked pinned ring vs the peaks.

For each size, in one run: the engine's ``host_to_device`` from a pageable shared-memory
buffer through its pinned staging ring; one plain ``copy_`` from a pinned buffer (the
measured pinned peak); and ``tensor.to('cuda')`` from pageable memory (what a plain
serving process does). Prints medians and the ratios: ring / pinned peak (target >= 90%
at >= 64 MiB) and ring / pageable.

Needs a CUDA GPU and the ``gpu`` extra; on a machine without one it says so and exits 0
(the figures are then "untested", never simulated).

    .venv/bin/python bench/h2d_copy.py --sizes 16,64,256,1024 --reps 10
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

MIB = 2**20


def timed(fn: Callable[[], None], reps: int) -> float:
    """Median seconds of ``fn`` (the GPU synchronised after each)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="16,64,256,1024", help="MiB, comma-separated")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--json", type=Path, default=None, metavar="PATH")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU on this machine: the CUDA copy engine is untested here")
        return 0
    from gpufaas.transfer.cuda_engine import CudaCopyEngine  # noqa: PLC0415

    engine = CudaCopyEngine(0)
    cal = engine.calibration
    print(f"GPU: {torch.cuda.get_device_name(0)}; torch {torch.__version__}")
    print(
        f"calibration: {cal.overhead_s * 1e6:.1f} µs per copy, pinned "
        f"{cal.pinned_bps / 1e9:.1f} GB/s, chunk {cal.chunk_bytes / MIB:.0f} MiB"
    )
    rows: list[dict[str, Any]] = []
    for mib in (int(s) for s in args.sizes.split(",")):
        n = mib * MIB
        pageable = bytearray(n)
        view = memoryview(pageable)
        pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        dst = torch.empty(n, dtype=torch.uint8, device="cuda")
        host = torch.frombuffer(pageable, dtype=torch.uint8)

        def via_ring(v: memoryview = view, d: torch.Tensor = dst) -> None:
            engine.host_to_device(v, d)

        def pinned_peak(p: torch.Tensor = pinned, d: torch.Tensor = dst) -> None:
            d.copy_(p, non_blocking=True)

        def plain_to(h: torch.Tensor = host) -> None:
            h.to("cuda")

        ring, peak, plain = (timed(f, args.reps) for f in (via_ring, pinned_peak, plain_to))
        row = {
            "mib": mib,
            "ring_gbps": n / ring / 1e9,
            "pinned_gbps": n / peak / 1e9,
            "pageable_gbps": n / plain / 1e9,
        }
        rows.append(row)
        print(
            f"{mib:>6} MiB  ring {row['ring_gbps']:6.1f} GB/s  pinned peak "
            f"{row['pinned_gbps']:6.1f}  pageable .to('cuda') {row['pageable_gbps']:6.1f}  "
            f"ring/peak {ring and peak / ring:.0%}  ring/pageable {plain / ring:.2f}x"
        )
    if args.json:
        args.json.write_text(json.dumps({"gpu": torch.cuda.get_device_name(0), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
