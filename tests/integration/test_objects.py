"""The object tier against a real nats-server: byte-exact round trips, overwrite, delete, errors."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import nats
import numpy as np
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from gpufaas.shared.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from gpufaas.shared.objects import (
    delete_object,
    ensure_object_bucket,
    get_object,
    put_object,
    stat_object,
)
from tests.conftest import NatsServer

pytestmark = pytest.mark.integration

BUCKET = "tubes_t"
MIB = 1024 * 1024


@dataclass
class Conn:
    """A NATS connection that records every asynchronous error and disconnect."""

    nc: NATS
    js: JetStreamContext
    errors: list[Exception] = field(default_factory=list)
    disconnects: int = 0
    closed: asyncio.Event = field(default_factory=asyncio.Event)


async def connect(server: NatsServer, *, reconnect: bool = True) -> Conn:
    conn: Conn | None = None

    async def on_error(exc: Exception) -> None:
        assert conn is not None
        conn.errors.append(exc)

    async def on_disconnect() -> None:
        assert conn is not None
        conn.disconnects += 1

    async def on_closed() -> None:
        assert conn is not None
        conn.closed.set()

    nc = await nats.connect(
        server.url,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        closed_cb=on_closed,
        allow_reconnect=reconnect,
    )
    conn = Conn(nc, nc.jetstream())
    return conn


@pytest.fixture
async def conn(nats_server: NatsServer) -> AsyncIterator[Conn]:
    c = await connect(nats_server)
    await ensure_object_bucket(c.js, BUCKET)
    yield c
    # Neither side may have overrun the other, at any size.
    assert c.errors == []
    assert c.disconnects == 0
    await c.nc.close()


def random_bytes(n: int, seed: int = 0) -> bytes:
    """Incompressible bytes, different in every chunk (a reordering would show)."""
    return np.random.default_rng(seed).bytes(n)


def sha256_digest(data: bytes) -> str:
    return "SHA-256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode()


def file_names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


async def chunk_subjects(js: JetStreamContext, bucket: str) -> list[str]:
    info = await js.stream_info(f"OBJ_{bucket}", subjects_filter=f"$O.{bucket}.C.>")
    return sorted(info.state.subjects or {})


@pytest.mark.parametrize("size", [0, 1, 1000, 5 * 1024 + 7])
async def test_small_and_empty_round_trip(conn: Conn, size: int) -> None:
    data = random_bytes(size, seed=size)
    stored = await put_object(conn.js, BUCKET, f"obj-{size}", data, chunk_bytes=1024)
    assert stored.size_bytes == size
    assert stored.chunks == -(-size // 1024)
    assert stored.digest == sha256_digest(data)
    assert await stat_object(conn.js, BUCKET, f"obj-{size}") == stored

    into = bytearray(b"stale bytes longer than some objects")
    assert await get_object(conn.js, BUCKET, f"obj-{size}", into) == size
    assert into == data


async def test_64_mib_round_trip_into_buffer_view_and_file(conn: Conn, tmp_path: Path) -> None:
    data = random_bytes(64 * MIB)
    stored = await put_object(conn.js, BUCKET, "big", memoryview(data))
    assert stored.digest == sha256_digest(data)

    into = bytearray()
    assert await get_object(conn.js, BUCKET, "big", into) == len(data)
    assert into == data

    view_target = bytearray(len(data) + 10)
    assert await get_object(conn.js, BUCKET, "big", memoryview(view_target)) == len(data)
    assert view_target[: len(data)] == data

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    path = out_dir / "big.bin"
    assert await get_object(conn.js, BUCKET, "big", path) == len(data)
    assert path.read_bytes() == data
    assert file_names(out_dir) == ["big.bin"]  # no temporary left behind

    # And from a file, mapped rather than read.
    stored2 = await put_object(conn.js, BUCKET, "from-file", path)
    assert stored2.digest == stored.digest


@pytest.mark.slow
async def test_256_mib_neither_stalls_nor_drops(conn: Conn) -> None:
    data = random_bytes(256 * MIB, seed=256)
    await put_object(conn.js, BUCKET, "huge", data, timeout_s=10.0)
    into = bytearray()
    assert await get_object(conn.js, BUCKET, "huge", into, timeout_s=10.0) == len(data)
    assert into == data  # the fixture checks no slow consumer or disconnect was reported


async def test_missing_object_and_bucket(conn: Conn) -> None:
    with pytest.raises(NotFound) as exc:
        await get_object(conn.js, BUCKET, "nope", bytearray())
    assert exc.value.field == "tube"
    with pytest.raises(NotFound) as exc:
        await stat_object(conn.js, BUCKET, "nope")
    assert exc.value.field == "tube"
    with pytest.raises(NotFound) as exc:
        await get_object(conn.js, "no_such_bucket", "x", bytearray())
    assert exc.value.field == "bucket"
    with pytest.raises(NotFound) as exc:
        await put_object(conn.js, "no_such_bucket", "x", b"data")
    assert exc.value.field == "bucket"


async def test_overwrite_replaces_bytes_and_drops_old_chunks(conn: Conn) -> None:
    first = random_bytes(3000, seed=1)
    second = random_bytes(1500, seed=2)
    a = await put_object(conn.js, BUCKET, "name", first, chunk_bytes=1024)
    b = await put_object(conn.js, BUCKET, "name", second, chunk_bytes=1024)
    assert a.nuid != b.nuid
    into = bytearray()
    assert await get_object(conn.js, BUCKET, "name", into) == len(second)
    assert into == second
    assert await chunk_subjects(conn.js, BUCKET) == [f"$O.{BUCKET}.C.{b.nuid}"]


async def test_delete_is_idempotent_and_frees_chunks(conn: Conn) -> None:
    await put_object(conn.js, BUCKET, "gone", b"x" * 5000, chunk_bytes=1024)
    assert await delete_object(conn.js, BUCKET, "gone") is True
    assert await delete_object(conn.js, BUCKET, "gone") is False
    with pytest.raises(NotFound):
        await get_object(conn.js, BUCKET, "gone", bytearray())
    assert await chunk_subjects(conn.js, BUCKET) == []
    # The name can be used again.
    await put_object(conn.js, BUCKET, "gone", b"back")
    into = bytearray()
    await get_object(conn.js, BUCKET, "gone", into)
    assert into == b"back"


async def test_bad_arguments(conn: Conn) -> None:
    await put_object(conn.js, BUCKET, "ten", b"0123456789")
    with pytest.raises(InvalidArgument) as exc:
        await get_object(conn.js, BUCKET, "ten", memoryview(bytearray(4)))
    assert exc.value.field == "into"
    with pytest.raises(InvalidArgument) as exc:
        await get_object(conn.js, BUCKET, "ten", memoryview(b"read-only, 20 bytes."))
    assert exc.value.field == "into"
    with pytest.raises(InvalidArgument) as exc:
        await put_object(conn.js, "bad.bucket", "x", b"")
    assert exc.value.field == "bucket"
    with pytest.raises(InvalidArgument) as exc:
        await put_object(conn.js, BUCKET, "", b"")
    assert exc.value.field == "name"


async def test_full_bucket_is_resource_exhausted_and_leaves_nothing(conn: Conn) -> None:
    await ensure_object_bucket(conn.js, "tiny", max_bytes=MIB)
    with pytest.raises(ResourceExhausted):
        await put_object(conn.js, "tiny", "too-big", random_bytes(3 * MIB), chunk_bytes=256 * 1024)
    assert await chunk_subjects(conn.js, "tiny") == []


async def test_interoperates_with_nats_py_object_store(conn: Conn) -> None:
    data = random_bytes(300_000, seed=7)
    await put_object(conn.js, BUCKET, "ours", data, chunk_bytes=64 * 1024)
    stock = await conn.js.object_store(BUCKET)
    out = io.BytesIO()
    await stock.get("ours", writeinto=out)
    assert out.getvalue() == data

    await stock.put("theirs", data)
    into = bytearray()
    await get_object(conn.js, BUCKET, "theirs", into)
    assert into == data


async def test_unreachable_nats_is_unavailable(nats_server: NatsServer) -> None:
    c = await connect(nats_server, reconnect=False)
    await ensure_object_bucket(c.js, BUCKET)
    await put_object(c.js, BUCKET, "x", b"bytes")
    nats_server.stop()
    await asyncio.wait_for(c.closed.wait(), 10)  # the client noticed the server is gone
    with pytest.raises(Unavailable):
        await get_object(c.js, BUCKET, "x", bytearray())
    with pytest.raises(Unavailable):
        await put_object(c.js, BUCKET, "y", b"bytes")
    with pytest.raises(Unavailable):
        await delete_object(c.js, BUCKET, "x")
