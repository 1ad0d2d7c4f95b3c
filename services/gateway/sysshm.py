"""Triton's system shared-memory extension: a client on this host names a region of its
POSIX shared memory (``/dev/shm/<key>``), and inputs are read from it and outputs written
into it instead of travelling in the request and reply bodies. The registry and its reads
and writes serve both protocols; the HTTP routes are here, the gRPC methods in
:mod:`grpc_server`, over the same :class:`Regions` (one per gateway process).

A region is its tenant's: registered, used, listed and unregistered through that tenant's
keys only (another tenant's region name is a 404). The registry lives in each gateway
process, as Triton's does in its server: a client registers with the gateway it infers
through. The file must be a regular file owned by the gateway's user (never through a
link); the gateway keeps it open until it is unregistered and reads and writes it with
``pread``/``pwrite``, so that a client that shrinks its file gets a 400, not a crash.

CUDA regions (:mod:`cudashm`: a client's device allocation, by IPC handle) share the
registry, its names and its reads and writes, on a node where CUDA was found at start;
elsewhere their routes answer "not supported on this node".
"""

from __future__ import annotations

import asyncio
import os
import re
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from aiohttp import web

from gpufaas.gateway import app as gw
from gpufaas.gateway.auth import caller_of
from gpufaas.gateway.bodies import CudaShmRegisterBody, ShmRegisterBody
from gpufaas.gateway.cudashm import (
    CudaRegion,
    check_handle,
    check_registration,
    decode_handle,
    open_region,
    probe_devices,
)
from gpufaas.gateway.openapi import Param, RouteDoc
from gpufaas.shared.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    PayloadTooLarge,
    QuotaExceeded,
)
from gpufaas.shared.messages import convert
from gpufaas.shared.tensors import raw_nbytes

POSIX_SHM: Final = Path("/dev/shm")
MAX_REGIONS: Final = 64  # per tenant and gateway: each holds an open file
REGION_PATTERN: Final = r"^[A-Za-z0-9_.=-]{1,128}$"
# A POSIX shared-memory name: one leading "/" at most, then a plain file name.
_KEY: Final = re.compile(r"^/?[A-Za-z0-9_=-][A-Za-z0-9_.=-]{0,199}\Z")
_REGION: Final = re.compile(REGION_PATTERN.replace("$", r"\Z"))
CUDA_UNSUPPORTED: Final = (
    "CUDA shared memory is not supported on this node; use system shared memory"
)


@dataclass(frozen=True, slots=True)
class Region:
    """A registered region: ``byte_size`` bytes from ``offset`` of the file ``key``."""

    name: str
    key: str
    offset: int
    byte_size: int
    fd: int
    writable: bool

    def status(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "key": self.key,
            "offset": self.offset,
            "byte_size": self.byte_size,
        }


@dataclass(frozen=True, slots=True)
class ShmRef:
    """Where a tensor lies in a tenant's region: the ``shared_memory_*`` parameters."""

    region: str
    offset: int
    byte_size: int
    field: str  # e.g. inputs[0].parameters: the request's parameters that named it


class Regions:
    """The registered regions of every tenant on this gateway: system ones and, where
    ``cuda_devices`` were found, CUDA ones (one namespace for both kinds, as Triton's)."""

    def __init__(self, root: Path = POSIX_SHM, cuda_devices: int = 0) -> None:
        self.root = root
        self.cuda_devices = cuda_devices
        self._regions: dict[tuple[str, str], Region | CudaRegion] = {}

    def _admit(self, tenant: str, name: str) -> None:
        check_region_name(name)
        if (tenant, name) in self._regions:
            raise AlreadyExists(f"shared memory region {name!r} is registered", field="name")
        if sum(t == tenant for t, _ in self._regions) >= MAX_REGIONS:
            raise QuotaExceeded(
                f"at most {MAX_REGIONS} shared memory regions per tenant", field="name"
            )

    def register(self, tenant: str, name: str, body: ShmRegisterBody) -> None:
        self._admit(tenant, name)
        fd, writable = self._open(body)
        self._regions[tenant, name] = Region(
            name, body.key, body.offset, body.byte_size, fd, writable
        )

    def check_cuda(self) -> None:
        """CUDA regions are served here (else the clear 400 / UNIMPLEMENTED)."""
        if not self.cuda_devices:
            raise InvalidArgument(CUDA_UNSUPPORTED, field="cudasharedmemory")

    async def register_cuda(
        self, tenant: str, name: str, handle: bytes, device_id: int, byte_size: int
    ) -> None:
        """A client's device allocation, checked, then mapped (in a thread)."""
        self.check_cuda()
        check_handle(handle)
        check_registration(device_id, byte_size, self.cuda_devices)
        self._admit(tenant, name)
        region = await asyncio.to_thread(open_region, name, handle, device_id, byte_size)
        self._admit(tenant, name)  # again: another registration may have won meanwhile
        self._regions[tenant, name] = region

    def _open(self, body: ShmRegisterBody) -> tuple[int, bool]:
        """The key's file, open (read-write when the gateway may write it), checked."""
        if not _KEY.match(body.key) or body.key.lstrip("/") in (".", ".."):
            raise InvalidArgument(
                "key must be a shared memory name: a plain file name, '/' only first",
                field="key",
            )
        path = self.root / body.key.lstrip("/")
        flags = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            try:
                fd, writable = os.open(path, os.O_RDWR | flags), True
            except PermissionError:
                fd, writable = os.open(path, os.O_RDONLY | flags), False
        except FileNotFoundError:
            raise NotFound(
                f"no shared memory object {body.key!r} on this host", field="key"
            ) from None
        except OSError as exc:
            raise InvalidArgument(
                f"cannot open {body.key!r}: {exc.strerror}", field="key"
            ) from None
        st = os.fstat(fd)
        why = None
        if not stat.S_ISREG(st.st_mode):
            why = "is not a shared memory object"
        elif st.st_uid != os.getuid():
            why = "belongs to another user than the gateway's"
        elif body.offset + body.byte_size > st.st_size:
            why = f"has {st.st_size} bytes, fewer than offset + byte_size"
        if why is not None:
            os.close(fd)
            field = "byte_size" if why.startswith("has") else "key"
            raise InvalidArgument(f"shared memory object {body.key!r} {why}", field=field)
        return fd, writable

    def unregister(
        self, tenant: str, name: str | None = None, kind: type[Region | CudaRegion] = Region
    ) -> None:
        """One region of the tenant's of ``kind`` (none there: nothing to do), or all."""
        names = [
            n
            for (t, n), r in self._regions.items()
            if t == tenant and name in (None, n) and isinstance(r, kind)
        ]
        for n in names:
            _close(self._regions.pop((tenant, n)))

    def status(
        self, tenant: str, name: str | None = None, kind: type[Region | CudaRegion] = Region
    ) -> list[dict[str, Any]]:
        if name is not None:
            region = self.get(tenant, name, "name")
            if not isinstance(region, kind):
                raise NotFound(f"{name!r} is a region of the other kind", field="name")
            return [region.status()]
        return [
            r.status()
            for (t, _), r in sorted(self._regions.items())
            if t == tenant and isinstance(r, kind)
        ]

    def get(self, tenant: str, name: str, field: str) -> Region | CudaRegion:
        region = self._regions.get((tenant, name)) if isinstance(name, str) else None
        if region is None:
            raise NotFound(f"shared memory region {name!r} is not registered", field=field)
        return region

    def close(self) -> None:
        for region in self._regions.values():
            _close(region)
        self._regions.clear()

    def check(self, tenant: str, ref: ShmRef, *, output: bool = False) -> Region | CudaRegion:
        """The region ``ref`` lies in, checked to hold it (400 or 404 naming the field)."""
        region = self.get(tenant, ref.region, f"{ref.field}.shared_memory_region")
        if ref.offset + ref.byte_size > region.byte_size:
            raise InvalidArgument(
                f"shared_memory_offset + shared_memory_byte_size ({ref.offset} + "
                f"{ref.byte_size}) is past the end of region {ref.region!r} "
                f"({region.byte_size} bytes)",
                field=f"{ref.field}.shared_memory_byte_size",
            )
        if output and not region.writable:
            raise InvalidArgument(
                f"region {ref.region!r} is read-only to the gateway",
                field=f"{ref.field}.shared_memory_region",
            )
        return region

    async def read(self, tenant: str, ref: ShmRef) -> memoryview:
        """The bytes ``ref`` names, read from the client's region (in a thread)."""
        region = self.check(tenant, ref)
        if isinstance(region, CudaRegion):
            return await asyncio.to_thread(region.read, ref.offset, ref.byte_size)
        buf = bytearray(ref.byte_size)
        if not await asyncio.to_thread(_pread_into, region.fd, buf, region.offset + ref.offset):
            raise InvalidArgument(
                f"shared memory object {region.key!r} is shorter than its region now",
                field=f"{ref.field}.shared_memory_region",
            )
        return memoryview(buf)

    async def read_input(
        self, tenant: str, ref: ShmRef, datatype: str, shape: list[int], max_bytes: int
    ) -> memoryview:
        """An input's bytes, its size checked against its datatype and shape (and the
        gateway's cap) before anything is read; BYTES framing is the caller's to check."""
        where = f"{ref.field}.shared_memory_byte_size"
        if ref.byte_size > max_bytes:
            raise PayloadTooLarge(f"at most {max_bytes} bytes per input", field=where)
        nbytes = raw_nbytes(datatype, shape)
        if nbytes is not None and ref.byte_size != nbytes:
            raise InvalidArgument(
                f"{datatype} of shape {shape} is {nbytes} bytes; {ref.byte_size} given",
                field=where,
            )
        return await self.read(tenant, ref)

    async def write_output(
        self, tenant: str, ref: ShmRef, data: bytes | memoryview
    ) -> dict[str, Any]:
        """An output written at ``ref``; the parameters that tell the client where."""
        await self.write(tenant, ref, data)
        return {
            "shared_memory_region": ref.region,
            "shared_memory_offset": ref.offset,
            "shared_memory_byte_size": len(data),
        }

    async def write(self, tenant: str, ref: ShmRef, data: bytes | memoryview) -> None:
        """``data`` written at ``ref`` in the client's region (400 if it does not fit)."""
        region = self.check(tenant, ref, output=True)
        if len(data) > ref.byte_size:
            raise InvalidArgument(
                f"the output has {len(data)} bytes; shared_memory_byte_size is {ref.byte_size}",
                field=f"{ref.field}.shared_memory_byte_size",
            )
        if isinstance(region, CudaRegion):
            await asyncio.to_thread(region.write, ref.offset, data)
            return
        at = region.offset + ref.offset

        def pwrite() -> None:
            if os.fstat(region.fd).st_size < at + len(data):
                raise InvalidArgument(
                    f"shared memory object {region.key!r} is shorter than its region now",
                    field=f"{ref.field}.shared_memory_region",
                )
            view = memoryview(data)
            while view:
                view = view[os.pwrite(region.fd, view, at + len(data) - len(view)) :]

        await asyncio.to_thread(pwrite)


def _close(region: Region | CudaRegion) -> None:
    """A system region's file closed; a CUDA one's mapping goes with its last tensor."""
    if isinstance(region, Region):
        os.close(region.fd)


def _pread_into(fd: int, buf: bytearray, at: int) -> bool:
    """Fill ``buf`` from ``fd`` at ``at``; False if the file ends first."""
    view, done = memoryview(buf), 0
    while done < len(buf):
        got = os.preadv(fd, [view[done:]], at + done)
        if got == 0:
            return False
        done += got
    return True


def check_region_name(name: str) -> None:
    if not _REGION.match(name):
        raise InvalidArgument(
            f"a region name is 1 to 128 letters, digits or _.=-; got {name[:64]!r}", field="name"
        )


def shm_ref(params: dict[str, Any] | None, field: str) -> ShmRef | None:
    """The ``shared_memory_*`` parameters of an input or output, checked; None if absent."""
    if not params or "shared_memory_region" not in params:
        for k in ("shared_memory_offset", "shared_memory_byte_size"):
            if params and k in params:
                raise InvalidArgument(
                    f"{k} without shared_memory_region", field=f"{field}.shared_memory_region"
                )
        return None
    region = params["shared_memory_region"]
    if not isinstance(region, str):
        raise InvalidArgument("must be a string", field=f"{field}.shared_memory_region")
    values = {}
    for k, default in (("shared_memory_offset", 0), ("shared_memory_byte_size", None)):
        v = params.get(k, default)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise InvalidArgument("must be a non-negative integer", field=f"{field}.{k}")
        values[k] = v
    return ShmRef(region, values["shared_memory_offset"], values["shared_memory_byte_size"], field)


REGIONS = web.AppKey("shm_regions", Regions)


async def regions_ctx(app: web.Application) -> AsyncIterator[None]:
    """The registry for the app's life (CUDA probed once, in a thread); its files closed at
    the end."""
    app[REGIONS] = Regions(cuda_devices=await asyncio.to_thread(probe_devices))
    yield
    app[REGIONS].close()


# --- routes ----------------------------------------------------------------------------


def _tenant(request: web.Request) -> str:
    return caller_of(request).tenant


async def register(request: web.Request) -> web.Response:
    body = convert(await gw.read_json(request), ShmRegisterBody)
    request.app[REGIONS].register(_tenant(request), request.match_info["name"], body)
    return web.Response()


async def unregister(request: web.Request) -> web.Response:
    name = request.match_info.get("name")
    if name is not None:
        check_region_name(name)
    request.app[REGIONS].unregister(_tenant(request), name)
    return web.Response()


async def status(request: web.Request) -> web.Response:
    name = request.match_info.get("name")
    if name is not None:
        check_region_name(name)
    return gw.json_response(request.app[REGIONS].status(_tenant(request), name))


async def cuda_register(request: web.Request) -> web.Response:
    regions = request.app[REGIONS]
    regions.check_cuda()
    body = convert(await gw.read_json(request), CudaShmRegisterBody)
    handle = decode_handle(body.raw_handle.b64)
    name = request.match_info["name"]
    await regions.register_cuda(_tenant(request), name, handle, body.device_id, body.byte_size)
    return web.Response()


async def cuda_unregister(request: web.Request) -> web.Response:
    request.app[REGIONS].check_cuda()
    name = request.match_info.get("name")
    if name is not None:
        check_region_name(name)
    request.app[REGIONS].unregister(_tenant(request), name, CudaRegion)
    return web.Response()


async def cuda_status(request: web.Request) -> web.Response:
    request.app[REGIONS].check_cuda()
    name = request.match_info.get("name")
    if name is not None:
        check_region_name(name)
    return gw.json_response(request.app[REGIONS].status(_tenant(request), name, CudaRegion))


REGION_NAME = Param("name", "path", {"type": "string", "pattern": REGION_PATTERN}, "a region")
_SYS = "/v2/systemsharedmemory"
_CUDA = "/v2/cudasharedmemory"
_GPU = " (on a node with CUDA; elsewhere a 400)"
ROUTES: list[tuple[RouteDoc, Any]] = [
    (RouteDoc("GET", f"{_SYS}/status", "Your system shared-memory regions"), status),
    (
        RouteDoc("GET", f"{_SYS}/region/{{name}}/status", "A region", params=(REGION_NAME,)),
        status,
    ),
    (
        RouteDoc(
            "POST",
            f"{_SYS}/region/{{name}}/register",
            "Register a region of /dev/shm/<key>",
            ShmRegisterBody,
            params=(REGION_NAME,),
        ),
        register,
    ),
    (RouteDoc("POST", f"{_SYS}/unregister", "Unregister all your regions"), unregister),
    (
        RouteDoc(
            "POST",
            f"{_SYS}/region/{{name}}/unregister",
            "Unregister a region",
            params=(REGION_NAME,),
        ),
        unregister,
    ),
    (RouteDoc("GET", f"{_CUDA}/status", f"Your CUDA shared-memory regions{_GPU}"), cuda_status),
    (
        RouteDoc(
            "GET", f"{_CUDA}/region/{{name}}/status", f"A CUDA region{_GPU}", params=(REGION_NAME,)
        ),
        cuda_status,
    ),
    (
        RouteDoc(
            "POST",
            f"{_CUDA}/region/{{name}}/register",
            f"Register a CUDA IPC allocation{_GPU}",
            CudaShmRegisterBody,
            params=(REGION_NAME,),
        ),
        cuda_register,
    ),
    (
        RouteDoc("POST", f"{_CUDA}/unregister", f"Unregister all your CUDA regions{_GPU}"),
        cuda_unregister,
    ),
    (
        RouteDoc(
            "POST",
            f"{_CUDA}/region/{{name}}/unregister",
            f"Unregister a CUDA region{_GPU}",
            params=(REGION_NAME,),
        ),
        cuda_unregister,
    ),
]
