"""This worker process's views of stored tensors, shared by its instances.

Each segment is mapped once per process, host segments with ``mmap`` and device
segments through their CUDA IPC handle, and each tensor gets one view that every
instance using it shares. Host segments (and a simulated GPU's, which are host memory)
are mapped copy-on-write: a write through a view changes this process's copy of the page,
never the file other processes and tenants map. Device views of a real GPU are the shared
copy itself; what keeps them unwritten is that no runner writes a weight (exported
programs run in their functional form, see ``exported.py``). A segment is let go when the last instance using it is gone
(its views keep the mapping alive until then, so a batch still computing is safe), so
memory the tensor store frees is really given back.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from gpufaas.shared.cuda_ipc import open_segment
from gpufaas.shared.messages import DevicePlacement, TensorRef
from gpufaas.shared.shm import SegmentCache


class TensorMap:
    """Views of the tensor store's tensors, by segment, counted by the instances using them."""

    def __init__(self, shm_root: Path) -> None:
        self.host = SegmentCache(shm_root, private=True)  # copy-on-write: never the file
        self._views: dict[tuple[str, str], torch.Tensor] = {}  # (segment, tensor id) -> view
        self._device: dict[str, torch.Tensor] = {}  # device segment key -> its uint8 mapping
        self._users: Counter[str] = Counter()  # segment key -> instances using it

    def acquire(
        self, manifest: Mapping[str, TensorRef], placement: DevicePlacement | None
    ) -> tuple[dict[str, torch.Tensor], frozenset[str]]:
        """One instance's weights by parameter name, and the segments it now holds.

        With a placement on a real GPU the weights are views of the device copies;
        otherwise (host, or a simulated GPU) zero-copy views of the host segments.
        """
        on_device = placement is not None and any(
            s.ipc_handle is not None for s in placement.segments
        )
        weights: dict[str, torch.Tensor] = {}
        held: set[str] = set()
        if on_device:
            assert placement is not None
            for seg in placement.segments:
                key = f"{placement.device}/{seg.id}"
                if key not in self._device:
                    assert seg.ipc_handle is not None
                    self._device[key] = open_segment(seg.ipc_handle, seg.nbytes, seg.device_index)
                held.add(key)
            for name, ref in manifest.items():
                dev = placement.refs[ref.id]
                base = self._device[f"{placement.device}/{dev.segment}"]
                weights[name] = _typed(base.narrow(0, dev.offset, ref.nbytes), ref)
        else:
            for name, ref in manifest.items():
                weights[name] = self._host_view(ref)
                held.add(ref.segment)
        self._users.update(held)
        return weights, frozenset(held)

    def release(self, held: Iterable[str]) -> None:
        """An instance is gone: let go of the segments nobody else here uses."""
        for key in held:
            self._users[key] -= 1
            if self._users[key] > 0:
                continue
            del self._users[key]
            if self._device.pop(key, None) is None:
                self.host.forget(key)
                for vkey in [k for k in self._views if k[0] == key]:
                    del self._views[vkey]

    @property
    def segments_mapped(self) -> int:
        return len(self.host) + len(self._device)

    def _host_view(self, ref: TensorRef) -> torch.Tensor:
        key = (ref.segment, ref.id)
        view = self._views.get(key)
        if view is None:
            dtype = getattr(torch, ref.dtype)
            count = math.prod(ref.shape)
            if count == 0:
                view = torch.empty(ref.shape, dtype=dtype)
            else:
                mapping = self.host.map(ref.segment)
                flat = torch.frombuffer(mapping, dtype=dtype, count=count, offset=ref.offset)
                view = flat.view(ref.shape)
            self._views[key] = view
        return view


def _typed(raw: torch.Tensor, ref: TensorRef) -> torch.Tensor:
    """A device tensor of ``ref``'s dtype and shape over its raw bytes (no copy)."""
    dtype = getattr(torch, ref.dtype)
    if math.prod(ref.shape) == 0:
        return torch.empty(ref.shape, dtype=dtype, device=raw.device)
    return raw.view(dtype).view(ref.shape)
