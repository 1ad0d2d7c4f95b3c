"""JetStream resources the platform needs: KV buckets and the EVENTS stream.

Created idempotently by every service at start-up, so any start order works.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, StorageType, StreamConfig
from nats.js.kv import KeyValue

from gpufaas.shared import constants as c
from gpufaas.shared import subjects
from gpufaas.shared.config import Config
from gpufaas.shared.errors import InvalidArgument, ResourceExhausted, Unavailable

log = structlog.get_logger()
T = TypeVar("T")
ADMIN_USER = "admin"  # nats_auth.user_name("admin"): the one role that may update streams

# JetStream errors that mean "not this many replicas here": no suitable peers for
# placement, insufficient resources, replicas > 1 on a server that is not clustered.
PLACEMENT_ERRORS = frozenset({10005, 10023, 10074})
NO_STORAGE = 10047  # "insufficient storage resources available": max_bytes beyond the store
# What JetStream answers while it is not ready: a cluster that has just formed has no
# meta leader yet, a restarted server is still recovering its store.
NOT_READY: tuple[type[BaseException], ...] = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.js.errors.ServiceUnavailableError,
    TimeoutError,
)


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


def cluster_replicas(nc: NATS, wanted: int) -> int:
    """``wanted`` replicas capped by the servers of the cluster ``nc`` is connected to
    (the client URLs its INFO lists, itself included); a single server gets 1."""
    info = nc._server_info  # nats-py keeps the server's INFO only here
    if not info.get("cluster"):
        return 1
    size = len(info.get("connect_urls") or []) or wanted  # none listed: let placement say
    return max(1, min(wanted, size))


async def placed(create: Callable[[int], Awaitable[T]], replicas: int, what: str) -> T:
    """``create(replicas)``, with fewer replicas while the cluster cannot place that many
    (servers down); a later start raises them again (:func:`raise_replicas`)."""
    while True:
        try:
            return await create(replicas)
        except nats.js.errors.APIError as exc:
            if exc.err_code == NO_STORAGE:
                raise no_storage(what) from None
            if replicas <= 1 or exc.err_code not in PLACEMENT_ERRORS:
                raise
            log.warning("jetstream.fewer_replicas", stream=what, replicas=replicas - 1)
            replicas -= 1


def no_storage(stream: str) -> ResourceExhausted:
    """The error of a stream whose ``max_bytes`` the server's JetStream store cannot reserve
    (the server reserves every stream's ``max_bytes`` up front)."""
    total = sum(c.DEFAULT_STREAM_MAX_BYTES.values()) / 2**30
    return ResourceExhausted(
        f"NATS cannot reserve the max_bytes of {stream}: its JetStream store is too small "
        f"for the platform's streams (about {total:.1f} GiB by default). Give the server "
        "more (jetstream max_file_store, and disk) or lower the streams' limits with "
        "GPUFAAS_JETSTREAM_MAX_BYTES (a JSON object of stream: bytes)",
        field="GPUFAAS_JETSTREAM_MAX_BYTES",
    )


async def raise_replicas(js: JetStreamContext, stream: str, replicas: int) -> None:
    """Update an existing stream made with fewer than ``replicas`` replicas, where the
    server allows it (a refusal is logged: the stream keeps working as it is)."""
    if replicas <= 1:
        return
    config = (await js.stream_info(stream)).config
    if (config.num_replicas or 1) >= replicas:
        return
    try:
        await js.update_stream(dataclasses.replace(config, num_replicas=replicas))
    except nats.js.errors.APIError as exc:
        log.warning("jetstream.replicas_kept", stream=stream, wanted=replicas, error=repr(exc))
    else:
        log.info("jetstream.replicas_raised", stream=stream, replicas=replicas)


def may_reshape(config: Config) -> bool:
    """Whether this identity may update streams: the admin's (or an anonymous mesh's)
    alone; for another role the request would be dropped and time out."""
    return config.nats_user in ("", ADMIN_USER)


def stream_max_bytes(config: Config) -> dict[str, int]:
    """Each stream's ``max_bytes``: ``c.DEFAULT_STREAM_MAX_BYTES`` with the JSON of
    ``GPUFAAS_JETSTREAM_MAX_BYTES`` over it (``InvalidArgument`` naming it if malformed)."""
    limits = dict(c.DEFAULT_STREAM_MAX_BYTES)
    if not config.jetstream_max_bytes:
        return limits
    field = "GPUFAAS_JETSTREAM_MAX_BYTES"
    try:
        given = json.loads(config.jetstream_max_bytes)
    except ValueError:
        raise InvalidArgument(f"{field} is not JSON", field=field) from None
    if not isinstance(given, dict):
        raise InvalidArgument(f"{field} must be a JSON object of stream: bytes", field=field)
    for stream, n in given.items():
        if stream not in limits:
            raise InvalidArgument(f"{field}: unknown stream {stream!r}", field=field)
        if type(n) is not int or n < 1:
            raise InvalidArgument(f"{field}: {stream} must be a positive integer", field=field)
        limits[stream] = n
    return limits


def kv_stream_config(
    bucket: str,
    *,
    history: int,
    ttl: float | None,
    max_bytes: int,
    replicas: int,
    discard: DiscardPolicy = DiscardPolicy.NEW,
) -> StreamConfig:
    """A KV bucket's stream, as nats-py's ``create_key_value`` makes it, with a byte limit
    and a discard policy of our choosing (a KV bucket otherwise always refuses when full)."""
    return StreamConfig(
        name=f"KV_{bucket}",
        subjects=[f"$KV.{bucket}.>"],
        allow_direct=True,
        allow_rollup_hdrs=True,
        deny_delete=True,
        discard=discard,
        duplicate_window=min(120.0, ttl) if ttl else 120.0,
        max_age=ttl,
        max_bytes=max_bytes,
        max_consumers=-1,
        max_msgs=-1,
        max_msgs_per_subject=history,
        num_replicas=replicas,
        storage=StorageType.FILE,
    )


async def reconcile_limits(
    js: JetStreamContext,
    stream: str,
    *,
    max_bytes: int,
    max_age: float | None = None,
    discard: DiscardPolicy | None = None,
) -> None:
    """Update an existing stream whose ``max_bytes`` (and ``max_age``, ``discard`` when
    given) differ from these; a refusal is logged: the stream keeps working as it is."""
    config = (await js.stream_info(stream)).config
    age = config.max_age or 0.0
    want = dataclasses.replace(
        config,
        max_bytes=max_bytes,
        max_age=age if max_age is None else max_age,
        discard=config.discard if discard is None else discard,
    )
    if want.max_age and (config.duplicate_window or 0.0) > want.max_age:
        want = dataclasses.replace(want, duplicate_window=want.max_age)
    if (
        config.max_bytes == want.max_bytes
        and math.isclose(age, want.max_age or 0.0, abs_tol=1e-3)
        and config.discard == want.discard
    ):
        return
    try:
        await js.update_stream(want)
    except nats.js.errors.APIError as exc:
        log.warning("jetstream.limits_kept", stream=stream, error=repr(exc))
    else:
        log.info("jetstream.limits_updated", stream=stream, max_bytes=max_bytes, max_age=max_age)


async def _kv(
    js: JetStreamContext,
    bucket: str,
    *,
    ttl: float | None = None,
    history: int = 1,
    replicas: int = 1,
    reshape: bool = False,
    limits: Mapping[str, int] = c.DEFAULT_STREAM_MAX_BYTES,
    discard: DiscardPolicy = DiscardPolicy.NEW,
) -> KeyValue:
    stream, max_bytes = f"KV_{bucket}", limits[f"KV_{bucket}"]
    try:
        kv = await js.key_value(bucket)
    except nats.js.errors.BucketNotFoundError:
        pass
    else:
        if reshape:
            await raise_replicas(js, stream, replicas)
            await reconcile_limits(js, stream, max_bytes=max_bytes, max_age=ttl, discard=discard)
        return kv

    async def create(r: int) -> KeyValue:
        await js.add_stream(
            kv_stream_config(
                bucket, history=history, ttl=ttl, max_bytes=max_bytes, replicas=r, discard=discard
            )
        )
        return await js.key_value(bucket)

    try:
        return await placed(create, replicas, f"KV_{bucket}")
    except nats.js.errors.BadRequestError:
        # Another service created it between our lookup and create.
        return await js.key_value(bucket)


async def ensure_kv(
    js: JetStreamContext,
    bucket: str,
    *,
    replicas: int = 1,
    reshape: bool = False,
    limits: Mapping[str, int] = c.DEFAULT_STREAM_MAX_BYTES,
) -> KeyValue:
    """Create (or open) one more KV bucket (history 1, no TTL) like those of
    :func:`ensure_jetstream`: for buckets only some services use (the gateway's uploads)."""
    return await _kv(js, bucket, replicas=replicas, reshape=reshape, limits=limits)


async def ensure_jetstream(
    js: JetStreamContext,
    *,
    node_ttl_s: float,
    tube_ttl_s: float,
    replicas: int = 1,
    reshape: bool = False,
    limits: Mapping[str, int] = c.DEFAULT_STREAM_MAX_BYTES,
) -> Buckets:
    """Create (or open) every bucket and the EVENTS stream, with ``replicas`` replicas
    (see :func:`cluster_replicas`) and ``limits`` (``max_bytes`` by stream); with
    ``reshape`` (an identity allowed to update streams), bring existing ones' replicas and
    limits up to date too. Safe to call concurrently."""
    await ensure_events_stream(js, replicas=replicas, reshape=reshape, limits=limits)
    r, u, lim = replicas, reshape, limits
    old = DiscardPolicy.OLD  # the inflight bucket's oldest entries: markers of answered ones
    return Buckets(
        functions=await _kv(js, c.KV_FUNCTIONS, history=5, replicas=r, reshape=u, limits=lim),
        nodes=await _kv(js, c.KV_NODES, ttl=node_ttl_s, replicas=r, reshape=u, limits=lim),
        tubes=await _kv(js, c.KV_TUBES, ttl=tube_ttl_s, replicas=r, reshape=u, limits=lim),
        tensors=await _kv(js, c.KV_TENSORS, replicas=r, reshape=u, limits=lim),
        memory=await _kv(js, c.KV_MEMORY, replicas=r, reshape=u, limits=lim),
        profiles=await _kv(js, c.KV_PROFILES, replicas=r, reshape=u, limits=lim),
        workflows=await _kv(js, c.KV_WORKFLOWS, history=5, replicas=r, reshape=u, limits=lim),
        leases=await _kv(js, c.KV_LEASES, ttl=node_ttl_s, replicas=r, reshape=u, limits=lim),
        inflight=await _kv(
            js,
            c.KV_INFLIGHT,
            ttl=c.KV_INFLIGHT_MAX_AGE_S,
            replicas=r,
            reshape=u,
            limits=lim,
            discard=old,
        ),
        replicas=await _kv(js, c.KV_REPLICAS, replicas=r, reshape=u, limits=lim),
        keys=await _kv(js, c.KV_KEYS, history=5, replicas=r, reshape=u, limits=lim),
    )


async def wait_for_jetstream(nc: NATS, config: Config) -> Buckets:
    """:func:`ensure_jetstream` with ``config``'s replicas, retried with backoff while
    JetStream is not ready (a cluster electing its leader, a server recovering its store)
    until ``connect_deadline_s``; then ``Unavailable`` naming what it waited for."""
    deadline = time.monotonic() + config.connect_deadline_s
    delay = 0.1
    while True:
        try:
            return await ensure_jetstream(
                nc.jetstream(),
                node_ttl_s=config.node_ttl_s,
                tube_ttl_s=config.tube_ttl_s,
                replicas=cluster_replicas(nc, config.nats_replicas),
                # Updating a stream is the admin's (or an anonymous mesh's) alone: for
                # another role the request would be dropped and time out.
                reshape=may_reshape(config),
                limits=stream_max_bytes(config),
            )
        except NOT_READY as exc:
            if time.monotonic() + delay > deadline:
                raise Unavailable(
                    f"JetStream at {config.nats_url} not ready after "
                    f"{config.connect_deadline_s:g} s (GPUFAAS_CONNECT_DEADLINE_S): {exc!r}"
                ) from None
            log.warning("waiting for JetStream", at=config.nats_url, error=repr(exc))
        await asyncio.sleep(delay)
        delay = min(delay * 2, 2.0)


async def bucket_keys(js: JetStreamContext, bucket: str, prefix: str = "") -> list[str]:
    """The keys of a KV bucket (deleted ones included: a get then says so), sorted.

    Read from the bucket stream's subject list in one request. nats-py's ``kv.keys()``
    watches instead, and can report no keys at all when its consumer-info check races
    the first delivery, which under load made every node look gone.
    """
    info = await js.stream_info(f"KV_{bucket}", subjects_filter=f"$KV.{bucket}.{prefix}>")
    start = f"$KV.{bucket}."
    return sorted(s[len(start) :] for s in (info.state.subjects or {}))


async def ensure_events_stream(
    js: JetStreamContext,
    *,
    replicas: int = 1,
    reshape: bool = False,
    limits: Mapping[str, int] = c.DEFAULT_STREAM_MAX_BYTES,
) -> None:
    """The EVENTS stream on ``gpufaas.v1.events.>``: a week of history (and at most its
    ``limits`` bytes), oldest dropped first."""
    config = StreamConfig(
        name=c.EVENTS_STREAM,
        subjects=[subjects.EVENTS_ALL],
        max_age=c.EVENTS_MAX_AGE_S,
        max_bytes=limits[c.EVENTS_STREAM],
        discard=DiscardPolicy.OLD,
        storage=StorageType.FILE,
        duplicate_window=120.0,
    )
    try:
        await js.stream_info(c.EVENTS_STREAM)
    except nats.js.errors.NotFoundError:

        async def create(r: int) -> None:
            await js.add_stream(dataclasses.replace(config, num_replicas=r))

        try:
            await placed(create, replicas, c.EVENTS_STREAM)
        except nats.js.errors.BadRequestError:
            await js.stream_info(c.EVENTS_STREAM)
    else:
        if reshape:
            await raise_replicas(js, c.EVENTS_STREAM, replicas)
            await reconcile_limits(
                js, c.EVENTS_STREAM, max_bytes=limits[c.EVENTS_STREAM], max_age=c.EVENTS_MAX_AGE_S
            )
