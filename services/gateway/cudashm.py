"""Triton's CUDA shared-memory extension, the device half: a client on this host exports a
``cudaMalloc`` allocation as a CUDA IPC handle and registers it as a region; inputs are
copied from it to the host for the request, and outputs copied into it. The registry
(one per gateway, per tenant) is :class:`sysshm.Regions`; this module holds what is
CUDA's: the probe, the checks of a registration (all made before CUDA is touched) and
the region itself.

The gateway probes CUDA once at start (only if cupy, the ``gpu`` extra, imports); without
it every CUDA route and RPC answers "not supported on this node". The mapping of a handle
is :func:`gpufaas.shared.cuda_ipc.open_segment`'s (one per handle and process), closed
when the last region over it is unregistered.
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import functools
from dataclasses import dataclass
from typing import Any, Final

from gpufaas.gateway.bodies import MAX_CUDA_REGION_BYTES
from gpufaas.shared.errors import InvalidArgument

HANDLE_BYTES: Final = 64  # sizeof(cudaIpcMemHandle_t)


@functools.cache
def probe_devices() -> int:
    """The CUDA devices this gateway can map regions on: 0 without cupy or a GPU (cached;
    blocking, so call it in a thread)."""
    try:
        import cupy  # noqa: F401, PLC0415 - optional `gpu` extra
    except Exception:  # any failure to import it means no CUDA here
        return 0
    try:
        import torch  # noqa: PLC0415 - heavy; only where cupy is installed

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # pragma: no cover - a broken driver is no CUDA either
        return 0


def decode_handle(b64: str) -> bytes:
    """The raw ``cudaIpcMemHandle_t`` of an HTTP registration (``raw_handle.b64``)."""
    try:
        handle = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgument("must be base64", field="raw_handle.b64") from None
    return check_handle(handle, "raw_handle.b64")


def check_handle(handle: bytes, field: str = "raw_handle") -> bytes:
    if len(handle) != HANDLE_BYTES:
        raise InvalidArgument(
            f"a CUDA IPC handle is {HANDLE_BYTES} bytes; {len(handle)} given", field=field
        )
    return handle


def check_registration(device_id: int, byte_size: int, devices: int) -> None:
    """A device this gateway sees and a size within bounds (before CUDA is touched)."""
    if not 0 <= device_id < devices:
        raise InvalidArgument(
            f"device_id {device_id} is not one of this node's {devices} CUDA devices",
            field="device_id",
        )
    if not 0 < byte_size <= MAX_CUDA_REGION_BYTES:
        raise InvalidArgument(
            f"byte_size must be 1 to {MAX_CUDA_REGION_BYTES}; got {byte_size}", field="byte_size"
        )


@dataclass(frozen=True, slots=True)
class CudaRegion:
    """A registered device region: the first ``byte_size`` bytes of an IPC allocation."""

    name: str
    device_id: int
    byte_size: int
    tensor: Any  # a uint8 torch tensor over the mapping; keeps it open
    writable: bool = True

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "device_id": self.device_id, "byte_size": self.byte_size}

    def read(self, offset: int, nbytes: int) -> memoryview:
        """``nbytes`` from ``offset``, copied to the host (blocking: call it in a thread)."""
        if not nbytes:
            return memoryview(b"")
        return memoryview(self.tensor.narrow(0, offset, nbytes).cpu().numpy())

    def write(self, offset: int, data: bytes | memoryview) -> None:
        """Host bytes copied in at ``offset`` and done on the device before this returns,
        so the client sees them once it has the reply (blocking: call it in a thread)."""
        import torch  # noqa: PLC0415 - only on a CUDA node

        from gpufaas.shared import cuda_ipc  # noqa: PLC0415 - as above

        cuda_ipc.write_at(self.tensor, offset, memoryview(data))
        if self.tensor.is_cuda:  # (a host tensor stands in for the device in unit tests)
            torch.cuda.synchronize(self.tensor.device)


def open_region(name: str, handle: bytes, device_id: int, byte_size: int) -> CudaRegion:
    """The client's allocation mapped (blocking: call it in a thread); a handle that does
    not open, or an allocation smaller than ``byte_size``, is a 400."""
    from gpufaas.shared import cuda_ipc  # noqa: PLC0415 - only on a CUDA node

    try:
        tensor = cuda_ipc.open_segment(handle, byte_size, device_id)
    except Exception as exc:  # cupy's CUDARuntimeError, among others
        raise InvalidArgument(
            f"cannot open the CUDA IPC handle on device {device_id}: {exc}", field="raw_handle"
        ) from None
    import torch  # noqa: PLC0415 - open_segment has imported it

    with torch.cuda.device(device_id):
        size = _allocation_size(tensor.data_ptr())
    if size is not None and size < byte_size:
        raise InvalidArgument(
            f"the allocation has {size} bytes, fewer than byte_size", field="byte_size"
        )
    return CudaRegion(name, device_id, byte_size, tensor)


def _allocation_size(ptr: int) -> int | None:
    """Bytes of the allocation from ``ptr`` to its end (driver API), None if unknown."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:  # pragma: no cover - a CUDA node has it
        return None
    base, size = ctypes.c_uint64(), ctypes.c_size_t()
    fn = libcuda.cuMemGetAddressRange_v2
    fn.argtypes = [
        ctypes.POINTER(ctypes.c_uint64),
        ctypes.POINTER(ctypes.c_size_t),
        ctypes.c_uint64,
    ]
    if fn(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(ptr)) != 0:
        return None
    return base.value + size.value - ptr
