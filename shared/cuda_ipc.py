"""GPU segments shared across processes through CUDA IPC handles (real GPUs only).

A segment is one ``cudaMalloc`` (not torch's caching allocator, whose blocks are
sub-allocated and would export a handle to a larger block) whose IPC handle is exported
once. The node's memory service holds its GPU budget as such segments and hands out
blocks of them (``gpufaas.memory.pool.CudaBackend``); the tensor store and the transfer
service write into their blocks and publish (handle, offset) references. Without a
memory service they allocate a segment of their own (the same class), as before.

Any process opens a handle once and caches the mapping (:func:`open_segment`: one IPC
mapping per handle and process, however many views are taken, since CUDA refuses to map
one allocation twice in a process); the mapping is closed when the last tensor viewing
it is gone, so an instance still computing keeps its weights mapped. Freeing is decided
by the owner of the segment (the memory service, by its blocks' leases), never by a
reader. CUDA also refuses to open a handle in the process that exported it, so there
(services run in one process in tests) the segment's own memory is viewed.

cupy (the ``gpu`` extra) provides the runtime calls; torch sees the memory through
DLPack. Nothing here runs on a machine without CUDA, and torch is imported only when a
tensor is asked for: the memory service allocates, exports and frees segments without it
(~180 MiB), and the tensor store imports this module and otherwise never needs torch.
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


class _Mapping:
    """One raw device allocation (ours, or another process's opened by handle).

    Tensors over it keep it alive; an opened one is closed when it is garbage."""

    def __init__(self, ptr: int, device_index: int) -> None:
        self.ptr = ptr
        self.device_index = device_index


# Segments this process exported (handle -> its memory), and handles it opened.
_EXPORTED: dict[bytes, _Mapping] = {}
_OPENED: weakref.WeakValueDictionary[bytes, _Mapping] = weakref.WeakValueDictionary()


def _as_tensor(owner: _Mapping, nbytes: int) -> torch.Tensor:
    """A uint8 torch tensor over the first ``nbytes`` of ``owner``; it keeps ``owner`` alive."""
    import torch.utils.dlpack  # noqa: PLC0415 - see the module docstring

    cupy = _cupy()
    mem = cupy.cuda.UnownedMemory(owner.ptr, nbytes, owner, owner.device_index)
    arr = cupy.ndarray((nbytes,), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(mem, 0))
    return torch.utils.dlpack.from_dlpack(arr)


def write_at(dst: torch.Tensor, offset: int, data: memoryview) -> None:
    """Copy host bytes into the uint8 device tensor ``dst`` at ``offset`` (synchronous)."""
    if not len(data):
        return  # torch.frombuffer refuses an empty buffer
    import torch  # noqa: PLC0415 - see the module docstring

    if data.readonly:  # torch warns on a read-only buffer (host segments are mapped writable)
        data = memoryview(bytearray(data))
    src = torch.frombuffer(data, dtype=torch.uint8)
    dst.narrow(0, offset, len(data)).copy_(src)


class CudaSegment:
    """A device allocation of ``nbytes``, exported once through CUDA IPC; freed by :meth:`free`."""

    def __init__(self, device_index: int, nbytes: int) -> None:
        cupy = _cupy()
        self.device_index = device_index
        self.nbytes = nbytes
        with cupy.cuda.Device(device_index):
            ptr = cupy.cuda.runtime.malloc(max(nbytes, 1))
            try:
                self.handle: bytes = bytes(cupy.cuda.runtime.ipcGetMemHandle(ptr))
            except BaseException:
                cupy.cuda.runtime.free(ptr)
                raise
        self.ptr = ptr
        self._owner: _Mapping | None = _Mapping(ptr, device_index)
        self._tensor: torch.Tensor | None = None
        _EXPORTED[self.handle] = self._owner

    @property
    def tensor(self) -> torch.Tensor | None:
        """The whole segment as a uint8 torch tensor (made on first use); None once freed."""
        if self._owner is None:
            return None
        if self._tensor is None:
            self._tensor = _as_tensor(self._owner, self.nbytes)
        return self._tensor

    def write(self, offset: int, data: memoryview) -> None:
        """Copy host bytes into the segment at ``offset`` (synchronous)."""
        tensor = self.tensor
        assert tensor is not None, "segment freed"
        write_at(tensor, offset, data)

    def free(self) -> None:
        """Give the memory back; callers guarantee no lease references it. Idempotent."""
        if self._owner is None:
            return
        cupy = _cupy()
        _EXPORTED.pop(self.handle, None)
        self._owner = None
        self._tensor = None
        with cupy.cuda.Device(self.device_index):
            # Copies into it from this process (on any stream) are done before it goes.
            cupy.cuda.runtime.deviceSynchronize()
            cupy.cuda.runtime.free(self.ptr)


def open_segment(handle: bytes, nbytes: int, device_index: int) -> torch.Tensor:
    """A uint8 tensor over the first ``nbytes`` of the allocation exported as ``handle``.

    The handle is opened once per process: while any tensor from an earlier call is
    alive, its mapping is reused (so two blocks of one memory-service segment share
    one mapping), and the handle is closed when the last of them is garbage. In the
    exporting process the segment's own memory is viewed.
    """
    owner = _EXPORTED.get(handle) or _OPENED.get(handle)
    if owner is None:
        cupy = _cupy()
        with cupy.cuda.Device(device_index):
            ptr = cupy.cuda.runtime.ipcOpenMemHandle(handle)
        owner = _Mapping(ptr, device_index)
        weakref.finalize(owner, _close, ptr, device_index)
        _OPENED[handle] = owner
    return _as_tensor(owner, nbytes)


def _close(ptr: int, device_index: int) -> None:
    cupy = _cupy()
    with cupy.cuda.Device(device_index):
        cupy.cuda.runtime.ipcCloseMemHandle(ptr)


def mem_get_info(device_index: int) -> tuple[int, int]:
    """(free, total) bytes of the GPU as the driver sees them, every process included."""
    cupy = _cupy()
    with cupy.cuda.Device(device_index):
        free, total = cupy.cuda.runtime.memGetInfo()
    return int(free), int(total)
