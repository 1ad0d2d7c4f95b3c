"""Reading the functions and nodes KV buckets (used by the scheduler and the gateway)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from gpufaas.shared.constants import KV_FUNCTIONS, KV_NODES
from gpufaas.shared.jetstream import bucket_keys
from gpufaas.shared.messages import FunctionRecord, Heartbeat, decode_json


def function_key(tenant: str, name: str) -> str:
    return f"{tenant}.{name}"


async def get_function(kv: KeyValue, tenant: str, name: str) -> FunctionRecord | None:
    """The record of a deployed function, or ``None``."""
    try:
        entry = await kv.get(function_key(tenant, name))
    except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
        return None
    return None if entry.value is None else decode_json(entry.value, FunctionRecord)


async def live_nodes(
    js: JetStreamContext, kv: KeyValue, ttl_s: float, now: float | None = None
) -> dict[str, list[Heartbeat]]:
    """Nodes with at least one fresh heartbeat: node id -> its services' heartbeats."""
    now = time.time() if now is None else now
    nodes: dict[str, list[Heartbeat]] = defaultdict(list)
    for key in await bucket_keys(js, KV_NODES):
        try:
            entry = await kv.get(key)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            continue
        if entry.value is None:
            continue
        beat = decode_json(entry.value, Heartbeat)
        if now - beat.updated_at <= ttl_s:
            nodes[beat.node].append(beat)
    return dict(nodes)


async def list_functions(
    js: JetStreamContext, kv: KeyValue, tenant: str | None = None
) -> list[FunctionRecord]:
    """Every deployed function (of one tenant when given), sorted by name."""
    out = []
    for key in await bucket_keys(js, KV_FUNCTIONS):
        t, _, name = key.partition(".")
        if tenant is not None and t != tenant:
            continue
        rec = await get_function(kv, t, name)
        if rec is not None:
            out.append(rec)
    return sorted(out, key=lambda r: (r.spec.tenant, r.spec.name))


class FunctionCache:
    """Function records mirrored from the functions bucket by a KV watch (an informer).

    The invocation path reads records without a round trip. A miss always falls back to
    KV, so a new function is never reported missing; a deleted one may still be served
    for the watch's propagation delay (the worker refuses to cold-start a function that
    is no longer in KV, so that window cannot bring an instance back).
    """

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv
        self._records: dict[str, FunctionRecord] = {}

    async def run(self) -> None:
        """Follow the bucket until cancelled; run it as an owned background task."""
        watcher = await self._kv.watchall()
        try:
            async for entry in watcher:
                if entry is None:  # the end of the initial values: nothing to do
                    continue
                if entry.operation in (KV_DEL, KV_PURGE) or not entry.value:
                    self._records.pop(entry.key, None)
                else:
                    self._records[entry.key] = decode_json(entry.value, FunctionRecord)
        finally:
            # Bounded: while NATS is reconnecting an unsubscribe can wait a long time.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1):
                    await watcher.stop()  # type: ignore[no-untyped-call]

    async def get(self, tenant: str, name: str) -> FunctionRecord | None:
        record = self._records.get(function_key(tenant, name))
        return record if record is not None else await get_function(self._kv, tenant, name)

    def remember(self, record: FunctionRecord) -> None:
        """Take a record this process has just written (before the watch says so)."""
        self._records[function_key(record.spec.tenant, record.spec.name)] = record

    def forget(self, tenant: str, name: str) -> None:
        """Drop a record this process has just deleted (before the watch says so)."""
        self._records.pop(function_key(tenant, name), None)
