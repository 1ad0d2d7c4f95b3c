"""Reading the functions and nodes KV buckets (the scheduler, the gateway, transfer):
typed readers over :class:`~gpufaas.shared.kv.Bucket` s (``service.kv.functions``,
``service.kv.nodes``) and the function cache the invocation path reads."""

from __future__ import annotations

import time
from collections import defaultdict

from gpufaas.shared.identity import FunctionRef
from gpufaas.shared.kv import Bucket
from gpufaas.shared.messages import FunctionRecord, Heartbeat

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


async def records(functions: Functions, tenant: str | None = None) -> list[FunctionRecord]:
    """Every deployed function (of one tenant when given), sorted by tenant and name."""
    prefix = "" if tenant is None else f"{tenant}."
    out = [e.value for e in await functions.items(prefix)]
    return sorted(out, key=lambda r: (r.spec.tenant, r.spec.name))


class FunctionCache:
    """Function records mirrored from the functions bucket by a KV watch (an informer).

    The invocation path reads records without a round trip. A miss always falls back to
    KV, so a new function is never reported missing; a deleted one may still be served
    for the watch's propagation delay (the worker refuses to cold-start a function that
    is no longer in KV, so that window cannot bring an instance back). A service follows
    the bucket with ``self.watch(self.kv.functions, cache.on_change, name)``, the gateway
    with ``follow``.
    """

    def __init__(self, functions: Functions | None = None) -> None:
        self._bucket = functions
        self._records: dict[str, FunctionRecord] = {}

    def bind(self, functions: Functions) -> None:
        """The bucket to read on a miss (for a cache made before its service started)."""
        self._bucket = functions

    @property
    def bucket(self) -> Functions:
        assert self._bucket is not None, "function cache not bound to its bucket"
        return self._bucket

    def on_change(self, key: str, value: FunctionRecord | None) -> None:
        """One change of the bucket: a record written (or ``None``: deleted)."""
        if value is None:
            self._records.pop(key, None)
        else:
            self._records[key] = value

    async def record(self, ref: FunctionRef) -> FunctionRecord | None:
        """The function's record: the mirrored copy, else KV's."""
        found = self._records.get(ref.key)
        return found if found is not None else await self.bucket.value(ref.key)

    async def get(self, tenant: str, name: str) -> FunctionRecord | None:
        return await self.record(FunctionRef(tenant, name))

    def remember(self, record: FunctionRecord) -> None:
        """Take a record this process has just written (before the watch says so)."""
        self._records[FunctionRef(record.spec.tenant, record.spec.name).key] = record

    def forget(self, tenant: str, name: str) -> None:
        """Drop a record this process has just deleted (before the watch says so)."""
        self._records.pop(FunctionRef(tenant, name).key, None)
