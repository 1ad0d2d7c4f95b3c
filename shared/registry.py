"""Reading the functions and nodes KV buckets (the scheduler, the gateway, transfer):
typed readers over :class:`~gpufaas.shared.kv.Bucket` s (``service.kv.functions``,
``service.kv.nodes``) and the record caches the invocation path reads."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable
from typing import Generic, TypeVar

from gpufaas.shared.identity import FunctionRef, gpu_number
from gpufaas.shared.kv import Bucket
from gpufaas.shared.messages import FunctionRecord, Heartbeat

R = TypeVar("R")
Functions = Bucket[FunctionRecord]
Nodes = Bucket[Heartbeat]


async def alive(nodes: Nodes, ttl_s: float, now: float | None = None) -> dict[str, list[Heartbeat]]:
    """Nodes with at least one fresh heartbeat: node id -> its services' heartbeats."""
    now = time.time() if now is None else now
    out: dict[str, list[Heartbeat]] = defaultdict(list)
    for entry in await nodes.items():
        if now - entry.value.updated_at <= ttl_s:
            out[entry.value.node].append(entry.value)
    return dict(out)


def node_gpus_of(beats: list[Heartbeat]) -> list[str]:
    """A node's GPUs as its heartbeats list them, by number ("gpu:0", "gpu:1", ...)."""
    names = {d.name for b in beats for d in b.devices if d.kind != "host"}
    return sorted(names, key=gpu_number)


def instance_devices(record: FunctionRecord, node: str, gpus: list[str]) -> list[str]:
    """The devices ``record``'s instances on ``node`` compute on: the GPUs placement chose
    (more than one: scaled out within the node), else the node's first GPU (a record from
    before placement was per GPU), else the host (``gpus``: the node's, by number)."""
    return list(record.gpus.get(node) or [gpus[0] if gpus else "host"])


def first_gpu(record: FunctionRecord, node: str) -> str | None:
    """The GPU of ``record``'s first instance on ``node``, where its record names one:
    where a request that finds no instance there builds it."""
    gpus = record.gpus.get(node)
    return gpus[0] if gpus else None


def instance_count(record: FunctionRecord, nodes: Iterable[str] | None = None) -> int:
    """``record``'s instances on ``nodes`` (all its nodes by default): one per GPU it names
    there, one on a node it names none for."""
    return sum(len(record.gpus.get(n) or [n]) for n in (record.nodes if nodes is None else nodes))


async def records(functions: Functions, tenant: str | None = None) -> list[FunctionRecord]:
    """Every deployed function (of one tenant when given), sorted by tenant and name."""
    prefix = "" if tenant is None else f"{tenant}."
    out = [e.value for e in await functions.items(prefix)]
    return sorted(out, key=lambda r: (r.spec.tenant, r.spec.name))


class Mirror(Generic[R]):
    """Records mirrored from a KV bucket by a watch (an informer), by key.

    The invocation path reads records without a round trip. A miss always falls back to
    KV, so a new record is never reported missing; a deleted one may still be read for
    the watch's propagation delay. A service follows the bucket with
    ``self.watch(bucket, mirror.on_change, name)``, the gateway with ``follow``.
    """

    def __init__(self, bucket: Bucket[R] | None = None) -> None:
        self._bucket = bucket
        self._records: dict[str, R] = {}

    def bind(self, bucket: Bucket[R]) -> None:
        """The bucket to read on a miss (for a cache made before its service started)."""
        self._bucket = bucket

    @property
    def bucket(self) -> Bucket[R]:
        assert self._bucket is not None, "record cache not bound to its bucket"
        return self._bucket

    def on_change(self, key: str, value: R | None) -> None:
        """One change of the bucket: a record written (or ``None``: deleted)."""
        if value is None:
            self._records.pop(key, None)
        else:
            self._records[key] = value

    async def record(self, ref: FunctionRef) -> R | None:
        """The record of ``ref``: the mirrored copy, else KV's."""
        found = self._records.get(ref.key)
        return found if found is not None else await self.bucket.value(ref.key)

    def put(self, key: str, value: R) -> None:
        """Take a record this process has just written (before the watch says so)."""
        self._records[key] = value

    def drop(self, key: str) -> None:
        """Forget a record this process has just deleted (before the watch says so)."""
        self._records.pop(key, None)


class FunctionCache(Mirror[FunctionRecord]):
    """Function records mirrored from the functions bucket (see :class:`Mirror`). The
    worker refuses to cold-start a function that is no longer in KV, so the window in
    which a deleted one may still be read cannot bring an instance back."""

    async def get(self, tenant: str, name: str) -> FunctionRecord | None:
        return await self.record(FunctionRef(tenant, name))

    def remember(self, record: FunctionRecord) -> None:
        """Take a record this process has just written (before the watch says so)."""
        self.put(FunctionRef(record.spec.tenant, record.spec.name).key, record)

    def forget(self, tenant: str, name: str) -> None:
        """Drop a record this process has just deleted (before the watch says so)."""
        self.drop(FunctionRef(tenant, name).key)
