"""One typed layer over JetStream KV: ``Bucket[T]``.

Every read of a KV record goes through here, so that a missing key is ``None`` (never
a caught ``KeyNotFoundError``), a record that does not decode is logged, counted and
treated as absent (a malformed record never stops a service), and a read-modify-write
is one retried compare-and-set (:meth:`Bucket.update`) instead of a hand-written loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

import msgspec
import nats.js.errors
import structlog
from nats.js import JetStreamContext
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from gpufaas.shared import constants as c
from gpufaas.shared import subjects
from gpufaas.shared.apikeys import ApiKeyRecord
from gpufaas.shared.errors import PlatformError, ResourceExhausted, Unavailable
from gpufaas.shared.identity import FunctionRef
from gpufaas.shared.jetstream import Buckets, bucket_keys
from gpufaas.shared.messages import (
    FunctionRecord,
    FunctionSpec,
    Heartbeat,
    Msg,
    ProfileRecord,
    Tube,
    decode,
    decode_json,
    encode,
    encode_json,
)
from gpufaas.shared.workflows import WorkflowRecord, WorkflowSpec

log = structlog.get_logger()

T = TypeVar("T")
S = TypeVar("S", bound=Msg)

# Errors of a key that is absent (never written, deleted, purged, or not a valid key).
_MISSING = (
    nats.js.errors.KeyNotFoundError,
    nats.js.errors.KeyDeletedError,
    nats.js.errors.InvalidKeyError,
    ValueError,  # nats-py rejects some malformed keys with a plain ValueError
)


@contextlib.contextmanager
def _room(bucket: str) -> Iterator[None]:
    """A write refused because the bucket holds its ``max_bytes`` is a 507 naming the bucket
    (and how to raise it), not a 500."""
    try:
        yield
    except nats.js.errors.APIError as exc:
        if "maximum bytes" not in (exc.description or ""):
            raise
        raise ResourceExhausted(
            f"JetStream bucket {bucket} is full (its max_bytes; GPUFAAS_JETSTREAM_MAX_BYTES "
            f"raises it): {exc.description}",
            field="bucket",
        ) from None


class Codec(Generic[T]):
    """How a bucket's values become bytes and back; ``decode`` raises on a bad record.

    ``key_of`` (records that carry their own id): the key a record must be stored under;
    a record under any other key is malformed (a forged ``tubes`` record naming another
    tube, a function record under another tenant's key).
    """

    def __init__(
        self,
        encode: Callable[[T], bytes],
        decode: Callable[[bytes], T],
        key_of: Callable[[T], str] | None = None,
    ) -> None:
        self.encode = encode
        self.decode = decode
        self.key_of = key_of

    @staticmethod
    def json(typ: type[S], key_of: Callable[[S], str] | None = None) -> Codec[S]:
        """A message as JSON (what people read with ``nats kv get``)."""
        return Codec(encode_json, lambda data: decode_json(data, typ), key_of)

    @staticmethod
    def msgpack(typ: type[S]) -> Codec[S]:
        """A message as msgpack (records on a hot path)."""
        return Codec(encode, lambda data: decode(data, typ))


RAW: Codec[bytes] = Codec(bytes, bytes)
TEXT: Codec[str] = Codec(str.encode, bytes.decode)


@dataclass(frozen=True, slots=True)
class Entry(Generic[T]):
    """A decoded record and the revision to compare-and-set against."""

    key: str
    value: T
    revision: int


class Conflict(Exception):
    """A compare-and-set lost to another writer (raised by :meth:`Bucket.put_if`)."""


# Malformed records seen, per bucket: shown in a service's stats.
MALFORMED: dict[str, int] = {}


class Bucket(Generic[T]):
    """A KV bucket (or a typed view of one) whose values are ``T``."""

    def __init__(
        self, js: JetStreamContext, kv: KeyValue, name: str, codec: Codec[T], *, prefix: str = ""
    ) -> None:
        self.js = js
        self.kv = kv
        self.name = name
        self.codec = codec
        self.prefix = prefix  # a typed view of the keys under one prefix of a shared bucket

    def _decode(self, key: str, data: bytes) -> T | None:
        try:
            value = self.codec.decode(data)
        except (PlatformError, msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
            self._malformed(key, str(exc))
            return None
        own = None if self.codec.key_of is None else self.codec.key_of(value)
        if own is not None and own != key:
            self._malformed(key, f"the record is of {own[:100]!r}, not of its key")
            return None
        return value

    def _malformed(self, key: str, error: str) -> None:
        """Log and count a record that cannot be used; it reads as absent."""
        MALFORMED[self.name] = MALFORMED.get(self.name, 0) + 1
        log.warning("kv.malformed", bucket=self.name, key=key, error=error[:200])

    async def _raw(self, key: str) -> tuple[bytes | None, int | None]:
        try:
            entry = await self.kv.get(key)
        except _MISSING:
            return None, None
        return entry.value, entry.revision

    async def get(self, key: str) -> Entry[T] | None:
        """The record under ``key`` and its revision; ``None`` if absent or malformed."""
        data, revision = await self._raw(key)
        if data is None or revision is None:
            return None
        value = self._decode(key, data)
        return None if value is None else Entry(key, value, revision)

    async def value(self, key: str) -> T | None:
        """Just the value of :meth:`get`."""
        entry = await self.get(key)
        return None if entry is None else entry.value

    async def put(self, key: str, value: T) -> int:
        """Write unconditionally; the new revision."""
        with _room(self.name):
            return await self.kv.put(key, self.codec.encode(value))

    async def create(self, key: str, value: T) -> int | None:
        """Write only if the key holds nothing; the revision, or ``None`` if it exists."""
        try:
            with _room(self.name):
                return await self.kv.create(key, self.codec.encode(value))
        except nats.js.errors.KeyWrongLastSequenceError:
            return None

    async def put_if(self, key: str, value: T, revision: int) -> int:
        """Write if the record is still at ``revision`` (0: absent); else :class:`Conflict`."""
        try:
            with _room(self.name):
                if revision == 0:
                    return await self.kv.create(key, self.codec.encode(value))
                return await self.kv.update(key, self.codec.encode(value), last=revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            raise Conflict(key) from None

    async def delete(self, key: str, *, revision: int | None = None) -> bool:
        """Delete ``key`` (only at ``revision`` when given); False if that lost a race."""
        try:
            await self.kv.delete(key, last=revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            return False
        except _MISSING:
            pass
        return True

    async def purge(self, key: str) -> None:
        """Drop ``key`` and its history."""
        with contextlib.suppress(*_MISSING):
            await self.kv.purge(key)

    async def purge_matching(self, pattern: str) -> None:
        """Drop every key matching a subject pattern (``replica.>``) and its history, at once
        (no tombstones left behind, unlike a delete per key)."""
        await self.js.purge_stream(f"KV_{self.name}", subject=subjects.kv_key(self.name, pattern))

    async def publish(self, key: str, value: T) -> None:
        """Write without waiting for JetStream's acknowledgement (a plain NATS publish the
        bucket's stream stores): for records on a hot path that a lost write only delays."""
        await self.js._nc.publish(subjects.kv_key(self.name, key), self.codec.encode(value))

    async def publish_delete(self, key: str) -> None:
        """Delete without waiting for the acknowledgement (the marker, like :meth:`publish`)."""
        headers = {"KV-Operation": "DEL"}
        await self.js._nc.publish(subjects.kv_key(self.name, key), b"", headers=headers)

    async def update(
        self, key: str, change: Callable[[T | None], T | None], *, attempts: int = 10
    ) -> Entry[T] | None:
        """Read, ``change``, write back by compare-and-set; retried when another writer won.

        ``change`` gets the current value (``None`` when absent or malformed) and returns the
        new one, or ``None`` to leave the record as it is (then the current entry is
        returned); it may raise to give up. It must be a pure function of its argument: it
        runs again on each retry.
        """
        for _ in range(attempts):
            data, revision = await self._raw(key)
            current = None if data is None else self._decode(key, data)
            new = change(current)
            if new is None:
                if current is None or revision is None:
                    return None
                return Entry(key, current, revision)
            try:
                written = await self.put_if(key, new, revision or 0)
            except Conflict:
                await asyncio.sleep(0)
                continue
            return Entry(key, new, written)
        raise Unavailable(f"{self.name} record {key!r} is changing too often to update")

    async def keys(self, prefix: str = "") -> list[str]:
        """The keys under ``prefix`` (deleted ones included: a get then says so), sorted."""
        return await bucket_keys(self.js, self.name, self.prefix + prefix)

    async def items(self, prefix: str = "") -> list[Entry[T]]:
        """Every readable record under ``prefix``, sorted by key (malformed ones skipped)."""
        out = []
        for key in await self.keys(prefix):
            entry = await self.get(key)
            if entry is not None:
                out.append(entry)
        return out

    async def watch(
        self, keys: str = ">", on_skip: Callable[[], None] | None = None
    ) -> AsyncIterator[tuple[str, T | None]]:
        """Follow the bucket: ``(key, value)`` for each put, ``(key, None)`` for a delete.

        Malformed records are logged, counted and skipped; the iterator ends only when
        the caller stops it (or the watch's connection fails, which the caller's
        supervised loop retries).
        """
        watcher = await self.kv.watch(keys)
        try:
            async for entry in watcher:
                if entry is None:  # the end of the initial values
                    continue
                if entry.operation in (KV_DEL, KV_PURGE) or not entry.value:
                    yield entry.key, None
                    continue
                value = self._decode(entry.key, entry.value)
                if value is not None:
                    yield entry.key, value
                elif on_skip is not None:
                    on_skip()
        finally:
            # Bounded: while NATS is reconnecting an unsubscribe can wait a long time.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1):
                    await watcher.stop()  # type: ignore[no-untyped-call]


def _spec_key(spec: FunctionSpec | WorkflowSpec) -> str:
    """``tenant.name``: the key of a function's (or workflow's) records."""
    return FunctionRef(spec.tenant, spec.name).key


class TypedBuckets:
    """The platform's buckets, typed: ``service.kv.functions.get(ref.key)`` and so on.

    Buckets that hold records of several kinds (``memory``, ``tensors``) are raw bytes
    here; their owners make typed views with :class:`Bucket` and a :class:`Codec`.
    """

    def __init__(self, js: JetStreamContext, b: Buckets) -> None:
        self.js = js
        self.raw = b
        # Records that name themselves are read only under their own key (see Codec).
        functions = Codec.json(FunctionRecord, lambda r: _spec_key(r.spec))
        self.functions = Bucket(js, b.functions, c.KV_FUNCTIONS, functions)
        nodes = Codec.json(Heartbeat, lambda h: f"{h.node}.{h.service}")
        self.nodes = Bucket(js, b.nodes, c.KV_NODES, nodes)
        self.tubes = Bucket(js, b.tubes, c.KV_TUBES, Codec.json(Tube, lambda t: t.id))
        profiles = Codec.json(ProfileRecord, lambda r: _spec_key(r.spec))
        self.profiles = Bucket(js, b.profiles, c.KV_PROFILES, profiles)
        workflows = Codec.json(WorkflowRecord, lambda r: _spec_key(r.spec))
        self.workflows = Bucket(js, b.workflows, c.KV_WORKFLOWS, workflows)
        self.tensors = Bucket(js, b.tensors, c.KV_TENSORS, RAW)
        self.memory = Bucket(js, b.memory, c.KV_MEMORY, RAW)
        self.leases = Bucket(js, b.leases, c.KV_LEASES, RAW)
        self.inflight = Bucket(js, b.inflight, c.KV_INFLIGHT, RAW)
        self.replicas = Bucket(js, b.replicas, c.KV_REPLICAS, TEXT)
        self.keys = Bucket(js, b.keys, c.KV_KEYS, Codec.json(ApiKeyRecord))

    def view(self, raw: Bucket[bytes], codec: Codec[T], prefix: str = "") -> Bucket[T]:
        """A typed view of a raw bucket (one kind of record of ``memory`` or ``tensors``)."""
        return Bucket(self.js, raw.kv, raw.name, codec, prefix=prefix)


__all__ = [
    "MALFORMED",
    "RAW",
    "TEXT",
    "Bucket",
    "Codec",
    "Conflict",
    "Entry",
    "TypedBuckets",
]
