"""Reading the functions and nodes KV buckets (used by the scheduler and the gateway)."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import nats.js.errors
from nats.js.kv import KeyValue

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
    kv: KeyValue, ttl_s: float, now: float | None = None
) -> dict[str, list[Heartbeat]]:
    """Nodes with at least one fresh heartbeat: node id -> its services' heartbeats."""
    now = time.time() if now is None else now
    nodes: dict[str, list[Heartbeat]] = defaultdict(list)
    keys: list[str] = []
    with contextlib.suppress(nats.js.errors.NoKeysError):
        keys = await kv.keys()
    for key in keys:
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


async def list_functions(kv: KeyValue, tenant: str | None = None) -> list[FunctionRecord]:
    """Every deployed function (of one tenant when given), sorted by name."""
    keys: list[str] = []
    with contextlib.suppress(nats.js.errors.NoKeysError):
        keys = await kv.keys()
    out = []
    for key in keys:
        t, _, name = key.partition(".")
        if tenant is not None and t != tenant:
            continue
        rec = await get_function(kv, t, name)
        if rec is not None:
            out.append(rec)
    return sorted(out, key=lambda r: (r.spec.tenant, r.spec.name))
