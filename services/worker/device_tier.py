"""The device tier: one copy of each tensor per GPU, shared by every instance placed there.

Instances of one model, and fine-tuned variants sharing tensors, hold the same device
tensors. A copy whose last instance went stays resident for a keep-alive (a new
instance of the model then starts without copying), and idle copies are evicted least
recently used first when a new model needs the room; a copy in use is never freed. On
a real GPU the copy is a CUDA tensor; on a simulated GPU it stays the host view and
only the capacity is accounted, so placement and "out of memory" behave the same on a
CPU box. The tier lives in the worker process (one per node today); sharing device
copies across processes through CUDA IPC handles is the next step.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import torch

from gpufaas.shared.errors import ResourceExhausted
from gpufaas.shared.messages import TensorRef


class DeviceTier:
    """Device copies of tensors on one device, refcounted by the instances using them."""

    def __init__(self, name: str, capacity_bytes: int, torch_device: torch.device | None) -> None:
        self.name = name
        self.capacity = capacity_bytes
        self.torch_device = torch_device  # None: simulated, accounting only
        self.copies: dict[str, torch.Tensor] = {}
        self.nbytes: dict[str, int] = {}
        self.refs: Counter[str] = Counter()
        self.idle_since: dict[str, float] = {}  # resident copies no instance uses
        self.used = 0

    def acquire(
        self, manifest: Mapping[str, TensorRef], host: Mapping[str, torch.Tensor], now: float
    ) -> dict[str, torch.Tensor]:
        """Tensors for one instance (by parameter name), copying only those not resident.

        Idle copies are evicted (least recently used first) to make room. All or
        nothing: if the new bytes still do not fit, nothing is copied or counted.
        """
        new = {ref.id: ref for ref in manifest.values() if ref.id not in self.copies}
        need = sum(ref.nbytes for ref in new.values())
        if self.used + need > self.capacity:
            wanted = {ref.id for ref in manifest.values()}
            idle = sum(self.nbytes[t] for t in self.idle_since if t not in wanted)
            if self.used - idle + need > self.capacity:
                raise ResourceExhausted(
                    f"{self.name} has {self.capacity - self.used + idle} bytes free or freeable; "
                    f"the model needs {need} more (of {sum(r.nbytes for r in manifest.values())})",
                    field="model",
                )
            for tid in sorted(self.idle_since, key=self.idle_since.__getitem__):
                if self.used + need <= self.capacity:
                    break
                if tid not in wanted:
                    self._free(tid)
        by_id = {ref.id: host[name] for name, ref in manifest.items()}
        for tid, ref in new.items():
            view = by_id[tid]
            self.copies[tid] = view if self.torch_device is None else view.to(self.torch_device)
            self.nbytes[tid] = ref.nbytes
        self.used += need
        for tid in {ref.id for ref in manifest.values()}:
            self.refs[tid] += 1
            self.idle_since.pop(tid, None)
        return {name: self.copies[ref.id] for name, ref in manifest.items()}

    def release(self, tensor_ids: set[str], now: float) -> None:
        """Drop one instance's references; unused copies stay resident, idle from ``now``."""
        for tid in tensor_ids:
            self.refs[tid] -= 1
            if self.refs[tid] <= 0:
                del self.refs[tid]
                self.idle_since[tid] = now

    def reclaim_once(self, now: float, keep_alive_s: float) -> int:
        """Free copies idle for ``keep_alive_s``; returns the bytes freed."""
        expired = [t for t, since in self.idle_since.items() if now - since >= keep_alive_s]
        return sum(self._free(t) for t in expired)

    def _free(self, tid: str) -> int:
        self.idle_since.pop(tid, None)
        self.copies.pop(tid, None)
        nbytes = self.nbytes.pop(tid, 0)
        self.used -= nbytes
        return nbytes
