"""JetStream resources the platform needs: KV buckets and the EVENTS stream.

Created idempotently by every service at start-up, so any start order works.
"""

from __future__ import annotations

from dataclasses import dataclass

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, StorageType, StreamConfig
from nats.js.kv import KeyValue

from gpufaas.shared import constants as c
from gpufaas.shared import subjects


@dataclass(frozen=True, slots=True)
class Buckets:
    """Handles on the KV buckets."""

    functions: KeyValue
    nodes: KeyValue
    tubes: KeyValue
    tensors: KeyValue
    memory: KeyValue
    profiles: KeyValue
    workflows: KeyValue
    leases: KeyValue
    inflight: KeyValue
    replicas: KeyValue
    keys: KeyValue


async def _kv(
    js: JetStreamContext, bucket: str, *, ttl: float | None = None, history: int = 1
) -> KeyValue:
    try:
        return await js.key_value(bucket)
    except nats.js.errors.BucketNotFoundError:
        pass
    try:
        return await js.create_key_value(
            bucket=bucket, history=history, ttl=ttl, storage=StorageType.FILE
        )
    except nats.js.errors.BadRequestError:
        # Another service created it between our lookup and create.
        return await js.key_value(bucket)


async def ensure_jetstream(
    js: JetStreamContext, *, node_ttl_s: float, tube_ttl_s: float
) -> Buckets:
    """Create (or open) every bucket and the EVENTS stream; safe to call concurrently."""
    await ensure_events_stream(js)
    return Buckets(
        functions=await _kv(js, c.KV_FUNCTIONS, history=5),
        nodes=await _kv(js, c.KV_NODES, ttl=node_ttl_s),
        tubes=await _kv(js, c.KV_TUBES, ttl=tube_ttl_s),
        tensors=await _kv(js, c.KV_TENSORS),
        memory=await _kv(js, c.KV_MEMORY),
        profiles=await _kv(js, c.KV_PROFILES),
        workflows=await _kv(js, c.KV_WORKFLOWS, history=5),
        leases=await _kv(js, c.KV_LEASES, ttl=node_ttl_s),
        inflight=await _kv(js, c.KV_INFLIGHT, ttl=c.KV_INFLIGHT_MAX_AGE_S),
        replicas=await _kv(js, c.KV_REPLICAS),
        keys=await _kv(js, c.KV_KEYS, history=5),
    )


async def bucket_keys(js: JetStreamContext, bucket: str, prefix: str = "") -> list[str]:
    """The keys of a KV bucket (deleted ones included: a get then says so), sorted.

    Read from the bucket stream's subject list in one request. nats-py's ``kv.keys()``
    watches instead, and can report no keys at all when its consumer-info check races
    the first delivery, which under load made every node look gone.
    """
    info = await js.stream_info(f"KV_{bucket}", subjects_filter=f"$KV.{bucket}.{prefix}>")
    start = f"$KV.{bucket}."
    return sorted(s[len(start) :] for s in (info.state.subjects or {}))


async def ensure_events_stream(js: JetStreamContext) -> None:
    """The EVENTS stream on ``gpufaas.v1.events.>``: a week of history, oldest dropped first."""
    config = StreamConfig(
        name=c.EVENTS_STREAM,
        subjects=[subjects.EVENTS_ALL],
        max_age=c.EVENTS_MAX_AGE_S,
        max_bytes=1024 * 1024 * 1024,
        discard=DiscardPolicy.OLD,
        storage=StorageType.FILE,
        duplicate_window=120.0,
    )
    try:
        await js.stream_info(c.EVENTS_STREAM)
    except nats.js.errors.NotFoundError:
        try:
            await js.add_stream(config)
        except nats.js.errors.BadRequestError:
            await js.stream_info(c.EVENTS_STREAM)
