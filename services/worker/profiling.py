"""Profiling an instance: latency and intermediate memory at batch sizes and concurrencies.

The scheduler asks for a profile on deploy (the batch-1 point at once, to check the SLO;
the sweep in the background) and chooses each function's batch size and concurrency
from it (Decreased Throughput Selection). Runs on the device's own threads, with the
runner's typical inputs (``Runner.sample``).

Memory is what the configuration holds besides the weights: on a real GPU the peak of
torch's allocator above its level before the run; on the CPU (and simulated GPUs, which
compute on the CPU) the peak of live tensors the forward pass allocates, tracked per
operator (:class:`LiveBytes`).
"""

from __future__ import annotations

import functools
import statistics
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from gpufaas.worker.runners import Inputs, Runner


@dataclass(frozen=True, slots=True)
class Sample:
    """One measured configuration."""

    batch: int
    concurrency: int
    latency_s: float  # median time of one batch while `concurrency` run at once
    memory_bytes: int  # intermediates held by the `concurrency` batches together


class LiveBytes(TorchDispatchMode):  # type: ignore[no-untyped-call]  # torch's mode is untyped
    """Peak bytes of tensors alive at once that operators allocated under this mode.

    Outputs that share storage (views) are counted once; a tensor's bytes are released
    when it is collected. Weights and inputs made outside the mode are not counted.
    """

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._lock = threading.Lock()
        self._live: dict[int, int] = {}  # storage address -> bytes
        self.now = 0
        self.peak = 0

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        addr, nbytes = storage.data_ptr(), storage.nbytes()
        with self._lock:
            if not nbytes or addr in self._live:
                return
            self._live[addr] = nbytes
            self.now += nbytes
            self.peak = max(self.peak, self.now)
        weakref.finalize(t, self._release, addr)

    def _release(self, addr: int) -> None:
        with self._lock:
            self.now -= self._live.pop(addr, 0)


def _once(runner: Runner, inputs: Inputs, cuda: bool) -> tuple[float, int]:
    """One batch: (seconds, intermediate bytes)."""
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        runner.infer(inputs)
        torch.cuda.synchronize()
        return time.perf_counter() - t0, torch.cuda.max_memory_allocated() - base
    with LiveBytes() as live:
        t0 = time.perf_counter()
        runner.infer(inputs)
        took = time.perf_counter() - t0
    return took, live.peak


def profile(
    runner: Runner,
    batches: Sequence[int],
    concurrencies: Sequence[int],
    *,
    repeats: int = 3,
    cuda: bool = False,
    deadline_s: float = 60.0,
) -> list[Sample]:
    """Measure each (batch, concurrency); blocking, run it on a device thread.

    A non-batchable runner is measured at batch 1 only. Latency is timed without the
    memory tracker (which slows each operator); memory comes from one tracked run per
    batch size, times the concurrency. Stops early (what was measured is returned) when
    ``deadline_s`` has passed, so a slow model does not hold the device for long.
    """
    if not runner.batchable:
        batches = [1]
    stop = time.monotonic() + deadline_s
    samples: list[Sample] = []
    for batch in batches:
        inputs = runner.sample(batch)
        runner.infer(inputs)  # warm-up (first-call allocations, lazy init)
        _, memory = _once(runner, inputs, cuda)
        for conc in concurrencies:
            times = _timed(functools.partial(runner.infer, inputs), conc, repeats)
            samples.append(Sample(batch, conc, statistics.median(times), memory * conc))
            if time.monotonic() > stop:
                return samples
    return samples


def _timed(fn: Callable[[], object], concurrency: int, repeats: int) -> list[float]:
    """Per-call seconds of ``fn`` run ``repeats`` times on each of ``concurrency`` threads."""

    def loop() -> list[float]:
        out = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return out

    if concurrency == 1:
        return loop()
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="profile") as pool:
        futures = [pool.submit(loop) for _ in range(concurrency)]
        return [t for f in futures for t in f.result()]
