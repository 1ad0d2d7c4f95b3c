"""The CUDA shared-memory registry's checks, without CUDA: a registration is refused field
by field before CUDA is touched, and a region (a host tensor standing in for the device
mapping) is read, written, listed and unregistered apart from system regions."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import torch

from gpufaas.gateway import app  # noqa: F401 - first, as the gateway imports sysshm
from gpufaas.gateway.cudashm import (
    CudaRegion,
    check_handle,
    check_registration,
    decode_handle,
    probe_devices,
)
from gpufaas.gateway.sysshm import CUDA_UNSUPPORTED, Regions, ShmRef
from gpufaas.shared.errors import AlreadyExists, InvalidArgument, NotFound


def field_of(exc: pytest.ExceptionInfo[InvalidArgument]) -> str | None:
    return exc.value.field


def test_handles_are_64_bytes_of_base64() -> None:
    handle = bytes(range(64))
    assert decode_handle(base64.b64encode(handle).decode()) == handle
    for bad in ("not base64!", "QUJD=", base64.b64encode(bytes(63)).decode(), ""):
        with pytest.raises(InvalidArgument) as exc:
            decode_handle(bad)
        assert field_of(exc) == "raw_handle.b64"
    with pytest.raises(InvalidArgument, match="64 bytes; 65 given") as exc:
        check_handle(bytes(65))
    assert field_of(exc) == "raw_handle"


def test_devices_and_sizes_are_bounded() -> None:
    check_registration(1, 16 << 30, devices=2)
    for device_id, byte_size, devices, field in (
        (2, 8, 2, "device_id"),
        (-1, 8, 2, "device_id"),
        (0, 8, 0, "device_id"),
        (0, 0, 1, "byte_size"),
        (0, (16 << 30) + 1, 1, "byte_size"),
    ):
        with pytest.raises(InvalidArgument) as exc:
            check_registration(device_id, byte_size, devices)
        assert field_of(exc) == field


def test_probe_finds_no_cuda_here() -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA on this machine")
    assert probe_devices() == 0


async def test_registration_is_refused_without_cuda_and_checked_with_it() -> None:
    regions = Regions()
    with pytest.raises(InvalidArgument, match=CUDA_UNSUPPORTED):
        await regions.register_cuda("t", "g", bytes(64), 0, 8)
    regions.cuda_devices = 1
    for args, field in (
        ((bytes(10), 0, 8), "raw_handle"),
        ((bytes(64), 1, 8), "device_id"),
        ((bytes(64), 0, 0), "byte_size"),
    ):
        with pytest.raises(InvalidArgument) as exc:
            await regions.register_cuda("t", "g", *args)
        assert field_of(exc) == field
    with pytest.raises(InvalidArgument) as exc:
        await regions.register_cuda("t", "a b", bytes(64), 0, 8)
    assert field_of(exc) == "name"


async def test_cuda_regions_read_write_and_are_their_kinds_own(tmp_path: Path) -> None:
    regions = Regions(root=tmp_path, cuda_devices=1)
    tensor = torch.zeros(16, dtype=torch.uint8)
    regions._regions["t", "g"] = CudaRegion("g", 0, 16, tensor)
    with pytest.raises(AlreadyExists):
        await regions.register_cuda("t", "g", bytes(64), 0, 8)
    ref = ShmRef("g", 4, 8, "inputs[0].parameters")
    params = await regions.write_output("t", ref, b"abcd")
    assert params["shared_memory_byte_size"] == 4
    assert bytes(tensor[4:8]) == b"abcd"
    assert bytes(await regions.read_input("t", ref, "UINT8", [8], 1 << 20)) == b"abcd" + bytes(4)
    with pytest.raises(InvalidArgument) as exc:
        await regions.read("t", ShmRef("g", 12, 8, "inputs[0].parameters"))
    assert field_of(exc) == "inputs[0].parameters.shared_memory_byte_size"
    with pytest.raises(NotFound):
        await regions.read("u", ref)  # another tenant's

    # The two kinds share names but not listings or unregistering.
    assert regions.status("t") == []
    assert regions.status("t", kind=CudaRegion) == [{"name": "g", "device_id": 0, "byte_size": 16}]
    with pytest.raises(NotFound):
        regions.status("t", "g")
    regions.unregister("t")
    assert regions.status("t", "g", CudaRegion)
    regions.unregister("t", "g", CudaRegion)
    assert regions.status("t", kind=CudaRegion) == []
