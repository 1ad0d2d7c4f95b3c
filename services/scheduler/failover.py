"""Failover between scheduler replicas: what each accepted is in KV until answered, and a
survivor answers the callers of a replica that died.

Each replica records what it accepted under its own prefix of the inflight bucket and is
listed in the replicas bucket, with a liveness key (TTL) in the leases bucket renewed each
tick; so only a dead replica's prefix is ever read. Its live records are claimed
(compare-and-set, so one survivor answers each) and run again under the same dispatch id:
requests it had already sent on are answered from the worker's memory, not run twice.

A replica is dead when its liveness key lapsed, or, seconds sooner, when nothing has
answered on its own subject (``subjects.scheduler_replica``) for ``CONFIRM_DEAD_S``: NATS
drops a killed process's subscriptions at once, and a replica that reconnects after an
outage subscribes again within about a second, so one miss alone proves nothing. Were a
live replica taken for dead anyway, its callers would get the survivor's answer or its own,
whichever comes first (the same dispatch id: computed once), and it lists its name again.

A request that reached a replica in its last moments, before it was recorded, is in no
record: when a replica is found dead, gateways are told to send their invocations in
flight again (``SCHED_RECONNECTED``), so that it is answered, not left to its deadline.
"""

from __future__ import annotations

import contextlib
import enum
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import nats.errors
import nats.js.errors
import structlog
from msgspec.structs import replace as msgspec_replace
from nats.aio.msg import Msg as NatsMsg

from gpufaas.scheduler.host import Host
from gpufaas.shared import subjects
from gpufaas.shared.errors import InvalidArgument, PlatformError
from gpufaas.shared.kv import Bucket, Codec, Conflict
from gpufaas.shared.messages import (
    InflightRecord,
    InvokeRequest,
    Msg,
    Reconnected,
    decode,
    encode,
)
from gpufaas.shared.rpc import error_reply
from gpufaas.shared.service import REPLY_TO
from gpufaas.shared.workflows import WorkflowInflightRecord, WorkflowInvokeRequest

log = structlog.get_logger()
R = TypeVar("R")
Record = InflightRecord | WorkflowInflightRecord
# Runs a taken-over request again (under its dispatch id, until ``deadline``): its reply.
Rerun = Callable[[Record, float], Awaitable[Msg]]
PING_TIMEOUT_S = 0.5  # a replica that answers its subject this late is alive anyway
CONFIRM_DEAD_S = 1.0  # no responders on a replica's subject this long: it died


def decode_record(data: bytes) -> Record:
    """An inflight record: a function's invocation, or else a workflow's."""
    try:
        return decode(data, InflightRecord)
    except InvalidArgument:
        return decode(data, WorkflowInflightRecord)


INFLIGHT: Codec[Record] = Codec(encode, decode_record)


def token(replica: str) -> str:
    """A replica id as one KV key token (no dots or slashes)."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", replica)


class Claim(enum.Enum):
    """What a survivor does with one of a dead replica's records."""

    ADOPTED = "adopted"  # already being answered here: still pending
    GONE = "gone"  # answered (or unreadable) meanwhile: nothing to do
    EXPIRED = "expired"  # its caller has given up: forget it
    CLAIM = "claim"  # try to take it over


def claim_decision(key: str, record: Record | None, now: float, adopted: set[str]) -> Claim:
    """The takeover decision for one record, before any compare-and-set."""
    if key in adopted:
        return Claim.ADOPTED
    if record is None:
        return Claim.GONE
    if record.request.deadline and record.request.deadline < now:
        return Claim.EXPIRED
    return Claim.CLAIM


def gone_for_good(dead: str, pending: int, adopted: set[str]) -> bool:
    """Whether a dead replica has nothing left to answer, here or in KV."""
    return not pending and not any(k.startswith(f"{dead}.") for k in adopted)


class Failover:
    """This replica's inflight records and membership; the takeover of dead replicas'."""

    def __init__(self, host: Host, rerun: Rerun) -> None:
        self.host = host
        self.rerun = rerun
        self.adopted: set[str] = set()  # inflight keys taken over from dead replicas
        self.silent: dict[str, float] = {}  # replica -> when its subject first had no responder
        self.mourned: set[str] = set()  # dead replicas whose callers were told to resend
        self._member = False  # listed in the replicas bucket

    @property
    def me(self) -> str:
        return token(self.host.replica)

    @property
    def records(self) -> Bucket[Record]:
        return self.host.kv.view(self.host.kv.inflight, INFLIGHT)

    def inflight_key(self, dispatch_id: str, replica: str | None = None) -> str:
        return f"{token(replica or self.host.replica)}.{dispatch_id}"

    async def accepted(
        self,
        record_type: type[InflightRecord] | type[WorkflowInflightRecord],
        req: InvokeRequest | WorkflowInvokeRequest,
        run: Callable[[str, float], Awaitable[R]],
    ) -> R:
        """Run an accepted request under a new dispatch id, recorded meanwhile (with the
        caller's reply subject) under this replica's prefix of the inflight bucket, so a
        replica that outlives this one answers it; forgotten once answered.

        The record is a plain publish to the bucket's subject, not an acknowledged put: it
        leaves on this connection before the request does, so it is stored unless this
        process dies within that instant; an ack round trip per request cost 10-20% of the
        throughput of small batched requests (bench/batching.py)."""
        deadline = req.deadline or (time.time() + self.host.config.request_timeout_s)
        dispatch_id = uuid.uuid4().hex
        key = self.inflight_key(dispatch_id)
        reply_to = REPLY_TO.get()
        if reply_to:
            record = record_type(
                replica=self.host.replica,
                reply_to=reply_to,
                request=req,  # type: ignore[arg-type]
                dispatch_id=dispatch_id,
                accepted_at=time.time(),
            )
            await self.host.kv.inflight.publish(key, encode(record))
        try:
            return await run(dispatch_id, deadline)
        finally:
            if reply_to:  # once the reply is out (this runs after it is queued)
                self.host.after_reply(self.forget(key))

    async def forget(self, key: str) -> None:
        """Delete an answered request's record (a delete marker, published like the put;
        markers lapse with the bucket's age limit, or with the replica's prefix)."""
        with contextlib.suppress(nats.errors.Error):
            await self.host.kv.inflight.publish_delete(key)

    async def register(self) -> str:
        """This replica's liveness key (it lapses with the TTL unless renewed each tick)
        and, once, its name among the replicas; returns its token."""
        me = self.me
        await self.host.kv.leases.put(f"replica.{me}", b"1")
        if not self._member:
            await self.host.kv.replicas.put(me, self.host.replica)
            self._member = True
        return me

    async def on_ping(self, msg: NatsMsg) -> None:
        """A survivor asks whether this replica is alive (its own subject): it is."""
        with contextlib.suppress(nats.errors.Error):
            await msg.respond(b"")

    async def take_over(self, now: float) -> None:
        """Renew this replica's liveness; answer the callers of replicas that died.
        Once a dead replica has nothing left, its prefix and its name are purged."""
        me = await self.register()
        names = await self.host.kv.replicas.keys()
        if me not in names:  # purged by a survivor that took this replica for dead
            await self.host.kv.replicas.put(me, self.host.replica)
        for dead in names:
            if dead == me or not await self._dead(dead):
                continue
            if dead not in self.mourned:  # what it got but never recorded: sent again
                self.mourned.add(dead)
                await self.host.nc.publish(subjects.SCHED_RECONNECTED, encode(Reconnected()))
                log.warning("scheduler.replica_died", replica=dead)
            pending = 0
            for key in await self.records.keys(f"{dead}."):
                pending += await self.claim(key, now)
            if pending:
                log.info("scheduler.replica_dead", replica=dead, pending=pending)
            if gone_for_good(dead, pending, self.adopted):
                await self._purge(dead)
                self.silent.pop(dead, None)
                self.mourned.discard(dead)
                log.info("scheduler.replica_gone", replica=dead)

    async def _dead(self, replica: str) -> bool:
        """Whether another listed replica died: its liveness key lapsed, or nothing has
        answered on its subject for ``CONFIRM_DEAD_S`` (see the module's docstring)."""
        if await self.host.kv.leases.get(f"replica.{replica}") is None:
            return True
        try:
            await self.host.nc.request(
                subjects.scheduler_replica(replica), b"", timeout=PING_TIMEOUT_S
            )
        except nats.errors.NoRespondersError:
            first = self.silent.setdefault(replica, time.monotonic())
            return time.monotonic() - first >= CONFIRM_DEAD_S
        except (nats.errors.Error, ValueError):
            pass  # slow, NATS away, or not a token: not known dead; its key will tell
        self.silent.pop(replica, None)
        return False

    async def _purge(self, replica: str, *, lease: bool = False) -> None:
        """A replica's records and markers, then its name (whole subjects, so that no
        marker is left for the next tick to read); its liveness key too if ``lease``."""
        kv = self.host.kv
        targets: list[tuple[Bucket[Any], str]] = [
            (kv.inflight, f"{replica}.>"),
            (kv.replicas, replica),
        ]
        if lease:
            targets.append((kv.leases, f"replica.{replica}"))
        with contextlib.suppress(nats.errors.Error, PlatformError):
            for bucket, pattern in targets:
                await bucket.purge_matching(pattern)

    async def leave(self) -> None:
        """Leave cleanly (every request was answered or told we stopped): this replica's
        records, name and liveness key go, so no survivor answers them again."""
        await self._purge(self.me, lease=True)

    async def claim(self, key: str, now: float) -> int:
        """Claim one of a dead replica's records and answer it; 1 if it is still pending."""
        entry = await self.records.get(key)
        record = entry.value if entry is not None else None
        decision = claim_decision(key, record, now, self.adopted)
        if decision is Claim.ADOPTED:
            return 1
        if decision is Claim.EXPIRED:
            await self.forget(key)
        if decision is not Claim.CLAIM or entry is None:
            return 0
        mine = msgspec_replace(entry.value, replica=self.host.replica)
        try:
            await self.records.put_if(key, mine, entry.revision)
        except Conflict:
            return 1  # another replica claimed it
        log.warning(
            "invoke.taken_over",
            request_id=mine.request.request_id,
            from_replica=entry.value.replica,
        )
        self.adopted.add(key)
        self.host.spawn(self._answer(key, mine), f"takeover-{mine.dispatch_id}")
        return 1

    async def _answer(self, key: str, record: Record) -> None:
        """Run a dead replica's request again and answer its caller directly."""
        req = record.request
        deadline = req.deadline or (record.accepted_at + self.host.config.request_timeout_s)
        try:
            data, headers = encode(await self.rerun(record, deadline)), None
        except PlatformError as exc:
            data, headers = error_reply(exc)
        log.info("invoke.takeover_answered", request_id=req.request_id, error=headers is not None)
        with contextlib.suppress(nats.errors.Error):
            await self.host.nc.publish(record.reply_to, data, headers=headers)
        await self.forget(key)
        self.adopted.discard(key)
