"""The Ray column of bench/handoff.py, run in an interpreter that has Ray and torch.

Two actors on one local Ray node, each its own process. The producer actor ``ray.put``s
the tensor's numpy view (one copy into Ray's shared-memory object store) and calls the
consumer actor with the reference; Ray hands the consumer a zero-copy, read-only view of
the stored array, which it wraps as a torch tensor and sums: the work every mode of
handoff.py does. Timestamps are CLOCK_MONOTONIC, taken inside the actors, as there.
Imports Ray by name so that mypy, in an environment without Ray, still checks this file.

Run by handoff.py; alone:  /tmp/rayenv/bin/python bench/_handoff_ray.py --out /tmp/ray.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

ray: Any = importlib.import_module("ray")


def now_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


class Consumer:
    """Wraps what it is handed as a tensor and sums it, with one torch thread as there."""

    def __init__(self) -> None:
        torch.set_num_threads(1)  # Ray's default for workers too; explicit, as in handoff.py

    def consume(self, arr: np.ndarray[Any, Any]) -> tuple[int, int, float]:
        with warnings.catch_warnings():
            # A read-only view of Ray's object store; it is only read, never written.
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(arr)
        ready = now_ns()
        total = float(t.sum())
        return ready, now_ns(), total


class Producer:
    """Puts a tensor into the object store and hands the reference to the consumer."""

    def __init__(self, consumer: Any) -> None:
        self.consumer = consumer

    def run(self, size_mib: int, reps: int, warmup: int) -> list[tuple[float, float]]:
        t = torch.randn(size_mib * 2**18, generator=torch.Generator().manual_seed(0))
        arr = t.numpy()
        expected = float(t.sum())
        out: list[tuple[float, float]] = []
        for i in range(warmup + reps):
            t0 = now_ns()
            ref = ray.put(arr)
            ready, done, total = ray.get(self.consumer.consume.remote(ref))
            del ref
            if abs(total - expected) > 1e-6 * abs(expected) + 1e-3:
                raise RuntimeError(f"consumer summed {total}, producer {expected}")
            if i >= warmup:
                out.append(((ready - t0) / 1e6, (done - t0) / 1e6))
        return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="1,16,64", help="comma-separated sizes in MiB")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", type=Path, required=True, help="where to write the JSON result")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        consumer = ray.remote(Consumer).options(num_cpus=0).remote()
        producer = ray.remote(Producer).options(num_cpus=0).remote(consumer)
        samples = {
            str(size): ray.get(producer.run.remote(size, args.reps, args.warmup)) for size in sizes
        }
    finally:
        ray.shutdown()
    doc = {"ray": ray.__version__, "torch": torch.__version__, "samples": samples}
    args.out.write_text(json.dumps(doc) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
