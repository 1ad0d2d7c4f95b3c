"""GPU segments shared across processes through CUDA IPC handles (real GPUs only).

The tensor store allocates one segment per registration with ``cudaMalloc`` (not
torch's caching allocator, whose blocks are sub-allocated and would export a handle to
a larger block) and exports its IPC handle once. A worker opens a handle once per
process and caches the mapping; the mapping is closed when the last tensor viewing it
is gone, so an instance still computing keeps its weights mapped. Freeing is decided
by the store's leases, never by a worker. CUDA refuses to open a handle in the process
that exported it, so there (services run in one process in tests) the segment's own
tensor is used.

cupy (the ``gpu`` extra) provides the runtime calls; torch sees the memory through
DLPack. Nothing here runs on a machine without CUDA, and torch is imported only when it
does: the tensor store imports this module and otherwise never needs torch (~180 MiB).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def _cupy() -> Any:
    try:
        import cupy  # noqa: PLC0415 - optional `gpu` extra, only on a CUDA node
    except ImportError as exc:  # pragma: no cover - needs a GPU node
        raise RuntimeError("the CUDA device tier needs cupy: pip install 'gpufaas[gpu]'") from exc
    return cupy


_EXPORTED: weakref.WeakValueDictionary[bytes, torch.Tensor] = weakref.WeakValueDictionary()


class _Mapping:
    """Owner of one raw device allocation; ``close`` runs when the last view is gone."""

    def __init__(self, ptr: int, nbytes: int, device_index: int) -> None:
        self.ptr = ptr
        self.nbytes = nbytes
        self.device_index = device_index


def _as_tensor(owner: _Mapping) -> torch.Tensor:
    """A uint8 torch tensor over ``owner``'s memory; it keeps ``owner`` alive."""
    import torch.utils.dlpack  # noqa: PLC0415 - see the module docstring

    cupy = _cupy()
    mem = cupy.cuda.UnownedMemory(owner.ptr, owner.nbytes, owner, owner.device_index)
    arr = cupy.ndarray((owner.nbytes,), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(mem, 0))
    return torch.utils.dlpack.from_dlpack(arr)


class CudaSegment:
    """A device allocation owned by the tensor store, exported once through CUDA IPC."""

    def __init__(self, device_index: int, nbytes: int) -> None:
        cupy = _cupy()
        self.device_index = device_index
        self.nbytes = nbytes
        with cupy.cuda.Device(device_index):
            ptr = cupy.cuda.runtime.malloc(max(nbytes, 1))
            self.handle: bytes = bytes(cupy.cuda.runtime.ipcGetMemHandle(ptr))
        self._owner = _Mapping(ptr, nbytes, device_index)
        self.tensor: torch.Tensor | None = _as_tensor(self._owner)
        _EXPORTED[self.handle] = self.tensor

    def write(self, offset: int, data: memoryview) -> None:
        """Copy host bytes into the segment at ``offset`` (synchronous)."""
        import torch  # noqa: PLC0415 - see the module docstring

        assert self.tensor is not None, "segment freed"
        src = torch.frombuffer(data, dtype=torch.uint8)
        self.tensor.narrow(0, offset, len(data)).copy_(src)

    def free(self) -> None:
        """Give the memory back; callers guarantee no lease references it."""
        if self.tensor is None:
            return
        import torch  # noqa: PLC0415 - see the module docstring

        torch.cuda.synchronize(self.device_index)
        _EXPORTED.pop(self.handle, None)
        self.tensor = None
        cupy = _cupy()
        with cupy.cuda.Device(self.device_index):
            cupy.cuda.runtime.free(self._owner.ptr)


def open_segment(handle: bytes, nbytes: int, device_index: int) -> torch.Tensor:
    """Map a segment exported by another process (once per process: the caller caches it).

    The returned uint8 tensor, and every view of it, keep the mapping open; the handle is
    closed when the last of them is garbage.
    """
    local = _EXPORTED.get(handle)
    if local is not None:
        return local
    cupy = _cupy()
    with cupy.cuda.Device(device_index):
        ptr = cupy.cuda.runtime.ipcOpenMemHandle(handle)
    owner = _Mapping(ptr, nbytes, device_index)
    weakref.finalize(owner, _close, ptr, device_index)
    return _as_tensor(owner)


def _close(ptr: int, device_index: int) -> None:
    cupy = _cupy()
    with cupy.cuda.Device(device_index):
        cupy.cuda.runtime.ipcCloseMemHandle(ptr)
