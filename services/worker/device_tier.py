"""The device tier: one copy of each tensor per GPU, shared by every instance placed there.

Instances of one model, and fine-tuned variants sharing tensors, hold the same device
tensors; a tensor's copy is freed when the last instance using it goes. On a real GPU
the copy is a CUDA tensor; on a simulated GPU it stays the host view and only the
capacity is accounted, so placement and "out of memory" behave the same on a CPU box.
The tier lives in the worker process (one per node today); sharing device copies
across processes through CUDA IPC handles is the next step.
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
        self.used = 0

    def acquire(
        self, manifest: Mapping[str, TensorRef], host: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Tensors for one instance (by parameter name), copying only those not yet here.

        All or nothing: if the new bytes do not fit, nothing is copied or counted.
        """
        new = {ref.id: ref for ref in manifest.values() if ref.id not in self.copies}
        need = sum(ref.nbytes for ref in new.values())
        if self.used + need > self.capacity:
            raise ResourceExhausted(
                f"{self.name} has {self.capacity - self.used} bytes free; the model needs "
                f"{need} more (of {sum(r.nbytes for r in manifest.values())})",
                field="model",
            )
        by_id = {ref.id: host[name] for name, ref in manifest.items()}
        for tid, ref in new.items():
            view = by_id[tid]
            self.copies[tid] = view if self.torch_device is None else view.to(self.torch_device)
            self.nbytes[tid] = ref.nbytes
        self.used += need
        self.refs.update({ref.id for ref in manifest.values()})
        return {name: self.copies[ref.id] for name, ref in manifest.items()}

    def release(self, tensor_ids: set[str]) -> int:
        """Drop one instance's references; returns the bytes freed."""
        freed = 0
        for tid in tensor_ids:
            self.refs[tid] -= 1
            if self.refs[tid] <= 0:
                del self.refs[tid]
                self.copies.pop(tid, None)
                freed += self.nbytes.pop(tid, 0)
        self.used -= freed
        return freed
