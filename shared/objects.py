"""Object tier: tube bytes in JetStream's object store, durable and readable from any node.

The wire format is the NATS object store's (stream ``OBJ_<bucket>``, chunks on
``$O.<bucket>.C.<nuid>``, an ``ObjectInfo`` JSON record on ``$O.<bucket>.M.<name as
base64url>`` rolled up to the latest, a SHA-256 digest), so ``nats object get`` and other
clients read what this writes and the other way round. The transfer is our own: nats-py
2.16's ``ObjectStore`` waits for each chunk's ack before sending the next and reads through
an ordered push consumer at ~50 MiB/s here, and its ``publish_async`` never resolves a
future whose ack is a JetStream error (``APIError.from_error`` raises inside the reply
callback), so a windowed put cannot be built on it either. A put keeps a bounded window of chunks awaiting their acks; a get pulls
through an ephemeral pull consumer, asking for at most a window of chunks at a time, so
neither side can overrun the other (no "slow consumer" at any size). Hashing runs on the
default executor, overlapped with the transfer.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import mmap
import os
import re
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg as NatsMsg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    Header,
    ObjectInfo,
    ObjectMetaOptions,
    StorageType,
)
from nats.nuid import NUID

from gpufaas.shared.errors import (
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    NotFound,
    PayloadTooLarge,
    PlatformError,
    ResourceExhausted,
    Unavailable,
)
from gpufaas.shared.jetstream import placed, raise_replicas, reconcile_limits
from gpufaas.shared.paths import allocate, create_new, open_fd, staging_name

log = structlog.get_logger()

# On loopback (bench/objects_throughput.py) chunks from 128 KiB to 4 MiB and 4-32 MiB in
# flight all gave 300-600 MiB/s on a 2-core box, within its noise; 1 MiB keeps the message
# count of big objects low. Chunks are cut to the server's max_payload (1 MiB by default,
# 8 MiB in the embedded config); the window stays well below its max_pending (64 MiB).
DEFAULT_CHUNK_BYTES: Final = 1024 * 1024
DEFAULT_WINDOW_BYTES: Final = 16 * 1024 * 1024
# The longest wait for any one step (an ack, the next chunk), not for the whole object.
DEFAULT_STEP_TIMEOUT_S: Final = 30.0

_BUCKET_RE: Final = re.compile(r"^[A-Za-z0-9_-]+\Z")
_DIGEST_PREFIX: Final = "SHA-256="
_ROLLUP_SUBJECT: Final = "sub"  # Nats-Rollup value: keep only the latest record of a name
# JetStream API error codes (nats-server errors.json).
_ERR_STREAM_NOT_FOUND: Final = 10059
_ERR_NO_ROOM: Final = frozenset({10023, 10028, 10047})
_ERR_MSG_TOO_BIG: Final = 10054


@dataclass(frozen=True, slots=True)
class StoredObject:
    """What the bucket records about one object (its ``ObjectInfo``), as put or found."""

    bucket: str
    name: str
    nuid: str
    size_bytes: int
    chunks: int
    chunk_bytes: int
    digest: str  # "SHA-256=<base64url>", as every NATS object-store client writes it
    mtime: str


# --- subjects of the NATS object-store protocol (not gpufaas subjects) ---------------------


def _stream(bucket: str) -> str:
    return f"OBJ_{bucket}"


def _chunk_subject(bucket: str, nuid: str) -> str:
    return f"$O.{bucket}.C.{nuid}"


def _meta_subject(bucket: str, name: str) -> str:
    return f"$O.{bucket}.M.{base64.urlsafe_b64encode(name.encode()).decode()}"


# --- public API --------------------------------------------------------------------------


async def ensure_object_bucket(
    js: JetStreamContext,
    bucket: str,
    *,
    ttl_s: float | None = None,
    max_bytes: int | None = None,
    storage: StorageType = StorageType.FILE,
    replicas: int = 1,
    reshape: bool = False,
) -> None:
    """Create (or open) an object bucket with ``replicas`` replicas (fewer where the cluster
    cannot place them) and at most ``max_bytes``; with ``reshape`` (an identity allowed to
    update streams) an existing bucket's limits are brought up to date. Safe to call
    concurrently from every service."""
    _check_bucket(bucket)
    nc = _client(js)
    with _translated(nc, f"open object bucket {bucket!r}"):
        try:
            await js.object_store(bucket)
        except nats.js.errors.BucketNotFoundError:
            pass
        else:
            if reshape:
                await raise_replicas(js, _stream(bucket), replicas)
            if reshape and max_bytes:
                await reconcile_limits(js, _stream(bucket), max_bytes=max_bytes, max_age=ttl_s)
            return

        async def create(r: int) -> None:
            # The name goes positionally: create_object_store(config=...) loses it (nats-py 2.16).
            await js.create_object_store(
                bucket, ttl=ttl_s, max_bytes=max_bytes, storage=storage, replicas=r
            )

        try:
            await placed(create, replicas, f"OBJ_{bucket}")
        except nats.js.errors.BadRequestError:
            await js.object_store(bucket)  # another service created it first


async def put_object(
    js: JetStreamContext,
    bucket: str,
    name: str,
    data: bytes | bytearray | memoryview | Path,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    window_bytes: int = DEFAULT_WINDOW_BYTES,
    timeout_s: float = DEFAULT_STEP_TIMEOUT_S,
) -> StoredObject:
    """Store ``data`` (bytes, a contiguous buffer or a file) as ``name``, replacing any old one.

    Readers see the old object until the new record is written, then the new one whole.
    """
    _check_bucket(bucket)
    _check_name(name)
    if chunk_bytes < 1:
        raise InvalidArgument("chunk_bytes must be positive", field="chunk_bytes")
    nc = _client(js)
    chunk_bytes = min(chunk_bytes, nc.max_payload)
    window = max(1, window_bytes // chunk_bytes)
    what = f"put object {name!r} into bucket {bucket!r}"
    with _translated(nc, what), _source(data) as view:
        previous = await _lookup(js, bucket, name)
        nuid = NUID().next().decode()
        subject = _chunk_subject(bucket, nuid)
        hasher = _Hasher(view)
        try:
            hasher.advance(len(view))  # one job over the whole buffer, beside the publishing
            chunks = await _publish_chunks(
                nc, subject, view, chunk_bytes=chunk_bytes, window=window, timeout_s=timeout_s
            )
            info = ObjectInfo(
                name=name,
                bucket=bucket,
                nuid=nuid,
                size=len(view),
                chunks=chunks,
                digest=await hasher.finish(len(view)),
                mtime=datetime.now(UTC).isoformat(),
                options=ObjectMetaOptions(max_chunk_size=chunk_bytes),
            )
            await js.publish(
                _meta_subject(bucket, name),
                json.dumps(info.as_dict()).encode(),
                timeout=timeout_s,
                headers={Header.ROLLUP.value: _ROLLUP_SUBJECT},
            )
        except BaseException:
            await hasher.settle()
            with contextlib.suppress(nats.errors.Error):
                await js.purge_stream(_stream(bucket), subject=subject)
            raise
        if previous is not None:
            await _purge_chunks(js, previous, what)
        return _stored(info, chunk_bytes)


async def get_object(
    js: JetStreamContext,
    bucket: str,
    name: str,
    into: bytearray | memoryview | Path,
    *,
    window_bytes: int = DEFAULT_WINDOW_BYTES,
    timeout_s: float = DEFAULT_STEP_TIMEOUT_S,
    tier: str = "host",
) -> int:
    """Read object ``name`` into a buffer or a file and check its digest; returns its size.

    A ``bytearray`` is resized to the object; a ``memoryview`` must be writable, contiguous
    and large enough (the first ``size`` bytes are written); a file is written under a
    temporary name and renamed into place only once complete and verified (no room for
    it: ``ResourceExhausted`` naming ``tier``, the file's storage).
    """
    _check_bucket(bucket)
    _check_name(name)
    nc = _client(js)
    with _translated(nc, f"get object {name!r} from bucket {bucket!r}"):
        obj = await _lookup(js, bucket, name)
        if obj is None:
            raise NotFound(f"object {name!r} is not in bucket {bucket!r}", field="tube")
        with _destination(into, obj.size_bytes, tier) as dest:
            await _pull_chunks(js, obj, dest, window_bytes=window_bytes, timeout_s=timeout_s)
    return obj.size_bytes


async def stat_object(js: JetStreamContext, bucket: str, name: str) -> StoredObject:
    """The record of object ``name``, or ``NotFound``."""
    _check_bucket(bucket)
    _check_name(name)
    with _translated(_client(js), f"stat object {name!r} in bucket {bucket!r}"):
        obj = await _lookup(js, bucket, name)
    if obj is None:
        raise NotFound(f"object {name!r} is not in bucket {bucket!r}", field="tube")
    return obj


async def delete_object(js: JetStreamContext, bucket: str, name: str) -> bool:
    """Delete object ``name`` (idempotent); whether there was one to delete."""
    _check_bucket(bucket)
    _check_name(name)
    what = f"delete object {name!r} from bucket {bucket!r}"
    with _translated(_client(js), what):
        obj = await _lookup(js, bucket, name)
        if obj is None:
            return False
        tombstone = ObjectInfo(
            name=name, bucket=bucket, nuid=obj.nuid, size=0, chunks=0, digest="", deleted=True
        )
        await js.publish(
            _meta_subject(bucket, name),
            json.dumps(tombstone.as_dict()).encode(),
            headers={Header.ROLLUP.value: _ROLLUP_SUBJECT},
        )
        await _purge_chunks(js, obj, what)
    return True


# --- validation and records ---------------------------------------------------------------


def _client(js: JetStreamContext) -> NATS:
    # nats-py keeps the connection private; the chunk windows need it for raw publishes.
    return js._nc


def _check_bucket(bucket: str) -> None:
    if not _BUCKET_RE.match(bucket):
        raise InvalidArgument(
            f"bucket {bucket!r} is not a valid object bucket name ([A-Za-z0-9_-]+)", field="bucket"
        )


def _check_name(name: str) -> None:
    if not name:
        raise InvalidArgument("object name must not be empty", field="name")


def _stored(info: ObjectInfo, chunk_bytes: int) -> StoredObject:
    if info.nuid is None or info.size is None or info.chunks is None or info.digest is None:
        raise Internal(f"object record of {info.name!r} in {info.bucket!r} is incomplete")
    return StoredObject(
        bucket=info.bucket,
        name=info.name,
        nuid=info.nuid,
        size_bytes=info.size,
        chunks=info.chunks,
        chunk_bytes=chunk_bytes,
        digest=info.digest,
        mtime=info.mtime or "",
    )


async def _lookup(js: JetStreamContext, bucket: str, name: str) -> StoredObject | None:
    """The live record of ``name``, or None; ``NotFound`` when the bucket does not exist."""
    try:
        msg = await js.get_last_msg(_stream(bucket), _meta_subject(bucket, name))
    except nats.js.errors.NotFoundError as exc:
        if exc.err_code == _ERR_STREAM_NOT_FOUND:
            raise NotFound(f"object bucket {bucket!r} does not exist", field="bucket") from None
        return None
    try:
        raw: dict[str, Any] = json.loads(msg.data or b"")
        info: ObjectInfo = ObjectInfo.from_response(raw)
    except (ValueError, TypeError, KeyError) as exc:
        raise Internal(f"object record of {name!r} in {bucket!r} is unreadable: {exc}") from None
    if info.deleted:
        return None
    if info.is_link():
        raise InvalidArgument(f"object {name!r} is a link; links are not supported", field="tube")
    opts = info.options
    chunk_bytes = opts.max_chunk_size if opts is not None and opts.max_chunk_size else 0
    if not chunk_bytes and info.chunks:
        chunk_bytes = -(-(info.size or 0) // info.chunks)
    return _stored(info, max(1, chunk_bytes))


async def _purge_chunks(js: JetStreamContext, obj: StoredObject, what: str) -> None:
    """Drop an old or deleted object's chunks; a failure only leaves bytes to reclaim later."""
    try:
        await js.purge_stream(_stream(obj.bucket), subject=_chunk_subject(obj.bucket, obj.nuid))
    except nats.errors.Error as exc:
        log.warning("object_chunks_not_purged", what=what, nuid=obj.nuid, error=repr(exc))


# --- errors -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _translated(nc: NATS, what: str) -> Iterator[None]:
    """Turn every nats-py exception into the platform's typed errors."""
    try:
        yield
    except PlatformError:
        raise
    except nats.js.errors.APIError as exc:
        raise _api_error(exc.code, exc.err_code, exc.description, what) from exc
    except TimeoutError as exc:  # nats.errors.TimeoutError and asyncio's are both TimeoutError
        if nc.is_connected:
            raise DeadlineExceeded(f"{what}: no progress for too long") from exc
        raise Unavailable(f"{what}: NATS is unreachable") from exc
    except nats.errors.Error as exc:
        raise Unavailable(f"{what}: NATS is unreachable ({type(exc).__name__})") from exc


def _api_error(
    code: int | None, err_code: int | None, description: str | None, what: str
) -> PlatformError:
    text = f"{what}: {description or 'JetStream error'} (code {code}, err_code {err_code})"
    if err_code in _ERR_NO_ROOM or "maximum bytes exceeded" in (description or ""):
        return ResourceExhausted(text)
    if err_code == _ERR_MSG_TOO_BIG:
        return PayloadTooLarge(text)
    if err_code == _ERR_STREAM_NOT_FOUND:
        return NotFound(text, field="bucket")
    return Unavailable(text)


def _reply_error(msg: NatsMsg, what: str) -> PlatformError | None:
    """The error a JetStream publish ack carries, or None for a good ack."""
    if msg.headers and msg.headers.get(Header.STATUS.value) == "503":
        return NotFound(f"{what}: no object bucket stores this subject", field="bucket")
    try:
        resp: dict[str, Any] = json.loads(msg.data)
    except ValueError:
        return Internal(f"{what}: unreadable JetStream ack {msg.data[:100]!r}")
    err = resp.get("error")
    if err is None:
        return None
    return _api_error(err.get("code"), err.get("err_code"), err.get("description"), what)


# --- sources and destinations ---------------------------------------------------------------


@contextlib.contextmanager
def _source(data: bytes | bytearray | memoryview | Path) -> Iterator[memoryview]:
    """A flat byte view of what to store (a file is mapped, not read)."""
    if isinstance(data, Path):
        try:
            f = os.fdopen(open_fd(data, os.O_RDONLY), "rb")  # never through a link
        except OSError as exc:
            raise InvalidArgument(f"cannot read {data}: {exc.strerror}", field="data") from None
        with f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                yield memoryview(b"")
                return
            with mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) as mm, memoryview(mm) as view:
                yield view
        return
    with memoryview(data) as view:
        if not view.c_contiguous:
            raise InvalidArgument("data must be a contiguous buffer", field="data")
        with view.cast("B") as flat:
            yield flat


@contextlib.contextmanager
def _destination(
    into: bytearray | memoryview | Path, size: int, tier: str = "host"
) -> Iterator[memoryview]:
    """A writable view of exactly ``size`` bytes where the object goes."""
    if isinstance(into, bytearray):
        if len(into) > size:
            del into[size:]
        elif len(into) < size:
            into.extend(bytes(size - len(into)))
        with memoryview(into) as view:
            yield view
    elif isinstance(into, memoryview):
        if into.readonly or not into.c_contiguous:
            raise InvalidArgument("into must be a writable contiguous buffer", field="into")
        if into.nbytes < size:
            raise InvalidArgument(
                f"into holds {into.nbytes} bytes; the object has {size}", field="into"
            )
        with into.cast("B") as flat, flat[:size] as view:
            yield view
    elif isinstance(into, Path):
        yield from _file_destination(into, size, tier)
    else:
        raise InvalidArgument(
            f"into must be a bytearray, a memoryview or a Path, not {type(into).__name__}",
            field="into",
        )


def _file_destination(path: Path, size: int, tier: str) -> Iterator[memoryview]:
    # Written under a temporary name and renamed, so a reader never sees half an object.
    tmp = staging_name(path)
    try:
        fd = create_new(tmp)  # private (0600), new, never through a link
    except OSError as exc:
        raise InvalidArgument(f"cannot write {path}: {exc.strerror}", field="into") from None
    try:
        os.ftruncate(fd, size)
        allocate(fd, size, path, tier)  # a full disk or tmpfs: a 507 here, not a SIGBUS
        if size == 0:
            yield memoryview(bytearray())
        else:
            with (
                mmap.mmap(
                    fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE
                ) as mm,
                memoryview(mm) as view,
            ):
                yield view
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)


# --- transfer -----------------------------------------------------------------------------------


class _Hasher:
    """SHA-256 of a buffer as it fills: at most one job at a time on the default executor.

    Each job covers every byte filled since the last one, so jobs stay in order without a
    dedicated thread, and the event loop never hashes (hashlib drops the GIL).
    """

    def __init__(self, view: memoryview) -> None:
        self._view = view
        self._sha = hashlib.sha256()
        self._hashed = 0
        self._job: asyncio.Future[None] | None = None

    def advance(self, filled: int) -> None:
        """Hash ``[hashed, filled)`` next, unless a job is still running (it catches up later)."""
        if self._job is not None:
            if not self._job.done():
                return
            self._job.result()
        if filled > self._hashed:
            start, self._hashed = self._hashed, filled
            self._job = asyncio.get_running_loop().run_in_executor(
                None, self._update, start, filled
            )

    async def finish(self, filled: int) -> str:
        """The digest of ``[0, filled)``, in the object store's notation."""
        if self._job is not None:
            await self._job
            self._job = None
        if filled > self._hashed:
            start, self._hashed = self._hashed, filled
            await asyncio.get_running_loop().run_in_executor(None, self._update, start, filled)
        return _DIGEST_PREFIX + base64.urlsafe_b64encode(self._sha.digest()).decode()

    def _update(self, start: int, end: int) -> None:
        # The slice is released here, before the job's future resolves, so the buffer's
        # owner can close it (an mmap refuses to close while a view of it is alive).
        with self._view[start:end] as part:
            self._sha.update(part)

    async def settle(self) -> None:
        """Wait out a running job (its buffer may be released next), ignoring its outcome."""
        if self._job is not None:
            await asyncio.wait([self._job])


async def _publish_chunks(
    nc: NATS, subject: str, view: memoryview, *, chunk_bytes: int, window: int, timeout_s: float
) -> int:
    """Publish ``view`` in chunks with at most ``window`` awaiting their JetStream acks."""
    loop = asyncio.get_running_loop()
    inbox = nc.new_inbox()
    waiting: dict[str, asyncio.Future[None]] = {}

    async def on_ack(msg: NatsMsg) -> None:
        fut = waiting.pop(msg.subject, None)
        if fut is None or fut.done():
            return
        err = _reply_error(msg, f"store chunk on {subject}")
        if err is None:
            fut.set_result(None)
        else:
            fut.set_exception(err)

    sub = await nc.subscribe(f"{inbox}.*", cb=on_ack)
    in_flight: deque[asyncio.Future[None]] = deque()
    count = 0
    try:
        for offset in range(0, len(view), chunk_bytes):
            if len(in_flight) >= window:
                await asyncio.wait_for(in_flight.popleft(), timeout_s)
            reply = f"{inbox}.{count}"
            fut: asyncio.Future[None] = loop.create_future()
            waiting[reply] = fut
            in_flight.append(fut)
            await nc.publish(subject, bytes(view[offset : offset + chunk_bytes]), reply=reply)
            count += 1
        while in_flight:
            await asyncio.wait_for(in_flight.popleft(), timeout_s)
    finally:
        if in_flight:
            # After a failure, let every chunk already sent be stored or refused first, so
            # the caller's purge cannot run before one of them lands.
            await asyncio.wait(in_flight, timeout=timeout_s)
            for fut in in_flight:
                if fut.done() and not fut.cancelled():
                    fut.exception()  # retrieved: the first failure is the one reported
                else:
                    fut.cancel()
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
    return count


async def _pull_chunks(
    js: JetStreamContext,
    obj: StoredObject,
    dest: memoryview,
    *,
    window_bytes: int,
    timeout_s: float,
) -> None:
    """Fill ``dest`` with the object's chunks, at most a window requested at a time."""
    hasher = _Hasher(dest)
    filled = 0
    try:
        if obj.chunks:
            filled = await _pull_into(
                js, obj, dest, hasher, window_bytes=window_bytes, timeout_s=timeout_s
            )
        if filled != obj.size_bytes:
            raise Internal(
                f"object {obj.name!r} gave {filled} bytes; its record says {obj.size_bytes}"
            )
        digest = await hasher.finish(filled)
    finally:
        await hasher.settle()
    if digest != obj.digest:
        raise Internal(f"object {obj.name!r} failed its digest check: {digest} != {obj.digest}")


async def _pull_into(
    js: JetStreamContext,
    obj: StoredObject,
    dest: memoryview,
    hasher: _Hasher,
    *,
    window_bytes: int,
    timeout_s: float,
) -> int:
    nc = _client(js)
    stream = _stream(obj.bucket)
    consumer = await js.add_consumer(
        stream,
        ConsumerConfig(
            filter_subject=_chunk_subject(obj.bucket, obj.nuid),
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.NONE,
            inactive_threshold=max(timeout_s, 5.0),  # the server drops it if we vanish
            mem_storage=True,
            num_replicas=1,
        ),
        timeout=timeout_s,
    )
    assert consumer.name is not None
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    # The JetStream API prefix is private in nats-py too; pull requests are raw publishes.
    next_subject = f"{js._prefix}.CONSUMER.MSG.NEXT.{stream}.{consumer.name}"
    window = max(1, window_bytes // obj.chunk_bytes)
    expires_ns = int(timeout_s * 1e9)
    requested = received = filled = 0
    try:
        while received < obj.chunks:
            in_flight = requested - received
            if requested < obj.chunks and in_flight <= window // 2:
                batch = min(window - in_flight, obj.chunks - requested)
                pull = json.dumps({"batch": batch, "expires": expires_ns}).encode()
                await nc.publish(next_subject, pull, reply=inbox)
                requested += batch
            msg = await sub.next_msg(timeout=timeout_s)
            status = msg.headers.get(Header.STATUS.value) if msg.headers else None
            if status is not None:
                raise await _interrupted(js, obj, status, msg.headers or {})
            end = filled + len(msg.data)
            if end > len(dest):
                raise Internal(f"object {obj.name!r} has more bytes than its record says")
            dest[filled:end] = msg.data
            filled = end
            received += 1
            hasher.advance(filled)
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
        with contextlib.suppress(nats.errors.Error):
            await js.delete_consumer(stream, consumer.name)
    return filled


async def _interrupted(
    js: JetStreamContext, obj: StoredObject, status: str, headers: dict[str, str]
) -> PlatformError:
    """Why chunks stopped coming: the object went away, or the server gave up waiting."""
    current = await _lookup(js, obj.bucket, obj.name)
    if current is None or current.nuid != obj.nuid:
        return NotFound(
            f"object {obj.name!r} was deleted or replaced while it was read", field="tube"
        )
    reason = headers.get(Header.DESCRIPTION.value, "")
    return DeadlineExceeded(f"reading object {obj.name!r} stopped: {status} {reason}".rstrip())
