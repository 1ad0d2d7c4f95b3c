"""Base class of every service: lifecycle, NATS wiring, request serving, heartbeats.

``start()`` and ``stop()`` are idempotent. ``stop()`` shuts down in order: stop
accepting requests, drain in-flight handlers, cancel background tasks, run the
service's own clean-up, remove its heartbeat, flush and close NATS.

A service declares, and the base does the rest:

* its **endpoints** as one table (``endpoints()``: verb, request type, handler); the base
  subscribes them, decodes, replies with typed errors and counts requests, errors and
  latency per endpoint (``service_stats`` verb, and the gateway's ``/metrics``);
* its **background work** as supervised loops (``every(interval, step, name)``) and KV
  watches (``watch(bucket, on_change, name)``): a transient failure (NATS or JetStream
  timeouts, no responders, a closed or reconnecting connection, a ``PlatformError``) is
  logged, counted and retried with backoff and never stops the service; only a
  programming error does, with its traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import nats
import nats.errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg as NatsMsg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

from gpufaas.shared import constants as c
from gpufaas.shared import subjects
from gpufaas.shared.config import Config
from gpufaas.shared.errors import Internal, PlatformError, Unavailable
from gpufaas.shared.jetstream import Buckets, cluster_replicas, wait_for_jetstream
from gpufaas.shared.kv import MALFORMED, Bucket, TypedBuckets
from gpufaas.shared.logging import configure_logging
from gpufaas.shared.messages import (
    DeviceInfo,
    Heartbeat,
    LinkInfo,
    M,
    Msg,
    Ping,
    Pong,
    ServiceStatsReply,
    ServiceStatsRequest,
    decode,
    encode,
    encode_json,
    new_event,
)
from gpufaas.shared.nats_auth import connect_options
from gpufaas.shared.rpc import Link, attach, error_reply, link_of
from gpufaas.shared.stats import EndpointCounter, LoopCounter

log = structlog.get_logger()

Handler = Callable[[M], Awaitable[Msg]]
T = TypeVar("T")

# Failures a background loop waits out (logged, counted, retried with backoff): the bus
# being slow, restarting or unreachable, and the platform's own typed errors. Anything
# else is a programming error and stops the service with its traceback.
TRANSIENT: tuple[type[BaseException], ...] = (
    nats.errors.Error,  # timeouts, no responders, closed/draining connection, JetStream
    TimeoutError,
    ConnectionError,
    PlatformError,
)
LOOP_BACKOFF_CAP_S = 30.0


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One row of a service's endpoint table (build it with :func:`endpoint`)."""

    name: str
    subject: str
    request: type[Msg]
    handler: Callable[[Any], Awaitable[Msg]]
    queue: str = ""


def endpoint(
    subject: str, request: type[M], handler: Handler[M], *, queue: str = "", name: str = ""
) -> Endpoint:
    """A typed row: ``handler`` is checked against ``request`` here, once."""
    return Endpoint(name or subject.rsplit(".", 1)[-1], subject, request, handler, queue)


async def _nats_error(exc: Exception) -> None:
    """nats-py's asynchronous errors (a server gone, a reconnect refused) as one
    structured line each, not a traceback in the JSON log."""
    log.warning("nats.error", error=repr(exc))


async def connect_nats(config: Config, name: str) -> NATS:
    """Connect as this process's NATS identity (``nats_auth.connect_options``), retrying
    until ``connect_deadline_s`` so services may start before NATS."""
    deadline = time.monotonic() + config.connect_deadline_s
    servers = [s.strip() for s in config.nats_url.split(",") if s.strip()]
    identity = await asyncio.to_thread(connect_options, config)
    while True:
        link = Link()
        try:
            nc = await nats.connect(
                servers=servers,
                name=name,
                connect_timeout=2,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                disconnected_cb=link.disconnected,
                reconnected_cb=link.reconnected,
                error_cb=_nats_error,
                **identity,
            )
        except (OSError, nats.errors.NoServersError, TimeoutError) as exc:
            if time.monotonic() >= deadline:
                raise Unavailable(f"cannot reach NATS at {config.nats_url}: {exc}") from None
            await asyncio.sleep(0.2)
        else:
            attach(nc, link)
            return nc


async def close_nats(nc: NATS, *, drain: bool = False, timeout: float = 5.0) -> None:
    """Flush (or drain) and close within ``timeout``; a broken connection is just dropped.

    The close runs in its own task and is waited for with a deadline rather than
    cancelled at it: nats-py's internal ``wait_for`` can swallow a cancellation on Python
    3.11, and a stuck server must not stall a shutdown.
    """
    if nc.is_closed:
        return

    async def close() -> None:
        try:
            if nc.is_connected and drain:
                await nc.drain()  # drains subscriptions, flushes, closes
                return
            if nc.is_connected:
                await nc.flush(timeout=max(1, int(timeout / 2)))
            await nc.close()
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            log.warning("nats.close_failed", error=repr(exc))

    task = asyncio.create_task(close())
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        log.warning("nats.close_timed_out", timeout_s=timeout)
        task.cancel()  # best effort; not waited for


async def cancel_and_wait(tasks: set[asyncio.Task[None]], deadline_s: float = 5.0) -> None:
    """Cancel and await ``tasks``, cancelling again until they end or the deadline.

    Again, because asyncio.wait_for on Python 3.11 (used inside nats-py) can turn a
    cancellation into a TimeoutError that a retry loop then swallows.
    """
    end = time.monotonic() + deadline_s
    pending = [t for t in tasks if not t.done()]
    while pending and time.monotonic() < end:
        for t in pending:
            t.cancel()
        await asyncio.wait(pending, timeout=0.25)
        pending = [t for t in pending if not t.done()]
    if pending:
        log.error("tasks.not_cancelled", tasks=[t.get_name() for t in pending])


# The reply subject of the request a handler is serving (None for a plain publish): what
# a scheduler replica records so that another can answer the caller if it dies.
REPLY_TO: ContextVar[str | None] = ContextVar("gpufaas_reply_to", default=None)


class Service:
    """A NATS service; subclasses set ``name`` and override the ``on_*`` hooks."""

    name: ClassVar[str] = "service"
    node_scoped: ClassVar[bool] = True  # node services heartbeat into the nodes bucket

    def __init__(self, config: Config) -> None:
        self.config = config
        self.started_at = time.time()
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._buckets: Buckets | None = None
        self._subs: list[Subscription] = []
        self._inflight: set[asyncio.Task[None]] = set()
        self._background: set[asyncio.Task[None]] = set()
        self._state = "new"  # new -> starting -> running -> stopping -> stopped
        self._stopped = asyncio.Event()
        self.fatal: BaseException | None = None
        self._kv: TypedBuckets | None = None
        self.endpoint_stats: dict[str, EndpointCounter] = {}  # subject -> its counters
        self.loop_stats: dict[str, LoopCounter] = {}  # loop name -> its counters

    # --- accessors ---------------------------------------------------------------------

    @property
    def nc(self) -> NATS:
        assert self._nc is not None, "service not started"
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        assert self._js is not None, "service not started"
        return self._js

    @property
    def buckets(self) -> Buckets:
        assert self._buckets is not None, "service not started"
        return self._buckets

    @property
    def kv(self) -> TypedBuckets:
        """The platform's KV buckets, typed (see ``shared/kv.py``)."""
        assert self._kv is not None, "service not started"
        return self._kv

    @property
    def replicas(self) -> int:
        """Replicas for a JetStream resource this service creates (config, capped by the
        cluster's size)."""
        return cluster_replicas(self.nc, self.config.nats_replicas)

    @property
    def running(self) -> bool:
        return self._state == "running"

    @property
    def looping(self) -> bool:
        """Whether background loops should go on (false from the moment stop begins)."""
        return self._state in ("starting", "running")

    # --- hooks -------------------------------------------------------------------------

    async def on_start(self) -> None:
        """Prepare state and start background work (called once, before the endpoints)."""

    def endpoints(self) -> list[Endpoint]:
        """The service's endpoint table, subscribed right after ``on_start``."""
        return []

    async def on_ready(self) -> None:
        """Called once when started: endpoints live, heartbeat written (announce here)."""

    async def on_stop(self) -> None:
        """Release resources after handlers have drained (called once)."""

    def devices(self) -> list[DeviceInfo]:
        """Devices this service reports in its heartbeat."""
        return []

    def gpu_links(self) -> list[LinkInfo]:
        """Links between the node's GPUs this service reports in its heartbeat."""
        return []

    def reconnect_announcement(self) -> tuple[str, Msg] | None:
        """What to publish when this service's NATS connection comes back after a drop,
        for a responder whose callers should send again what it may have missed (see
        ``shared.rpc``); None: nothing."""
        return None

    async def _announce_reconnect(self) -> None:
        said = self.reconnect_announcement()
        if said is not None:
            subject, msg = said
            await self.nc.publish(subject, encode(msg))
            log.info("service.reconnect_announced", subject=subject)

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, set up JetStream, run ``on_start``, announce readiness. Idempotent."""
        if self._state != "new":
            return
        self._state = "starting"
        structlog.contextvars.bind_contextvars(node=self.config.node_id)
        self._nc = await connect_nats(self.config, f"gpufaas-{self.name}")
        if (link := link_of(self._nc)) is not None:
            link.on_reconnect.append(self._announce_reconnect)
        self._js = self._nc.jetstream()
        self._buckets = await wait_for_jetstream(self._nc, self.config)
        self._kv = TypedBuckets(self._js, self._buckets)
        await self.on_start()
        await self.serve_endpoints(self.endpoints())
        await self.serve_endpoints(self._base_endpoints())
        if self.node_scoped:
            await self._heartbeat_once()
            # Retried at its own pace, never backed off past it: a heartbeat that lapses
            # (the nodes bucket failing over to another server) makes the node look gone.
            beat = self.config.heartbeat_s
            self.every(beat, self._heartbeat_once, "heartbeat", backoff_cap=beat)
        await self.nc.flush()
        self._state = "running"
        if self.config.ready_file:
            await asyncio.to_thread(Path(self.config.ready_file).write_text, str(os.getpid()))
        log.info("service.started", pid=os.getpid())
        await self.on_ready()

    async def stop(self) -> None:
        """Ordered shutdown; safe to call more than once and from signal handlers."""
        if self._state in ("stopping", "stopped"):
            await self._stopped.wait()
            return
        if self._state == "new":
            self._state = "stopped"
            self._stopped.set()
            return
        self._state = "stopping"
        log.info("service.stopping")
        try:
            for sub in self._subs:  # 1. stop accepting
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
            self._subs.clear()
            if self._inflight:  # 2. drain in-flight handlers
                await asyncio.wait(set(self._inflight), timeout=self.config.shutdown_deadline_s / 2)
            await self._cancel(self._background)  # 3. background tasks
            await self._cancel(self._inflight)
            await self.on_stop()  # 4. service clean-up
            if self.node_scoped and self._buckets is not None:  # 5. leave the node registry
                with contextlib.suppress(Exception):
                    await self._buckets.nodes.delete(self._heartbeat_key)
            if self._nc is not None:  # 6. flush and close
                await close_nats(self._nc)
        finally:
            self._state = "stopped"
            self._stopped.set()
            log.info("service.stopped")

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    # --- helpers for subclasses --------------------------------------------------------

    async def serve_endpoints(self, table: list[Endpoint]) -> None:
        """Subscribe every row of an endpoint table."""
        for ep in table:
            await self.serve(ep.subject, ep.request, ep.handler, queue=ep.queue, name=ep.name)

    async def serve(
        self,
        subject: str,
        req_type: type[M],
        handler: Handler[M],
        *,
        queue: str = "",
        name: str = "",
    ) -> None:
        """Answer requests on ``subject``: each in its own task, typed errors, counted."""
        stats = self.endpoint_stats.setdefault(
            subject, EndpointCounter(name or subject.rsplit(".", 1)[-1], subject)
        )

        async def on_msg(msg: NatsMsg) -> None:
            if self._state not in ("starting", "running"):
                if msg.reply:  # never silence: tell the caller to retry elsewhere
                    data, headers = error_reply(Unavailable(f"{self.name} is stopping"))
                    with contextlib.suppress(nats.errors.Error):
                        await self.nc.publish(msg.reply, data, headers=headers)
                return
            task = asyncio.create_task(self._handle(msg, req_type, handler, stats))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

        self._subs.append(await self.nc.subscribe(subject, queue=queue, cb=on_msg))

    async def _handle(
        self, msg: NatsMsg, req_type: type[M], handler: Handler[M], stats: EndpointCounter
    ) -> None:
        request_id = (msg.headers or {}).get(c.HDR_REQUEST_ID)
        REPLY_TO.set(msg.reply or None)
        t0 = time.perf_counter()
        with structlog.contextvars.bound_contextvars(request_id=request_id):
            try:
                reply = await handler(decode(msg.data, req_type))
                data, headers = encode(reply), None
            except asyncio.CancelledError:  # stopped mid-request: say so rather than go silent
                if msg.reply:
                    data, headers = error_reply(Unavailable(f"{self.name} stopped mid-request"))
                    with contextlib.suppress(nats.errors.Error):
                        await self.nc.publish(msg.reply, data, headers=headers)
                raise
            except PlatformError as exc:
                log.info("request.failed", subject=msg.subject, code=exc.code, error=exc.message)
                data, headers = error_reply(exc)
            except Exception as exc:
                log.exception("request.crashed", subject=msg.subject)
                data, headers = error_reply(Internal(f"{self.name} failed: {type(exc).__name__}"))
            stats.record(time.perf_counter() - t0, error=headers is not None)
            if msg.reply:
                with contextlib.suppress(nats.errors.ConnectionClosedError):
                    await self.nc.publish(msg.reply, data, headers=headers)

    def after_reply(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run follow-up work of a request (logs, events) without delaying its reply.

        Drained at shutdown like a request handler.
        """

        async def after() -> None:
            # A timer, not just a yield: the reply's publish and the NATS client's flush
            # are already queued and run first, so logging or formatting delays nobody.
            try:
                await asyncio.sleep(0.001)
            except asyncio.CancelledError:
                coro.close()
                raise
            await coro

        task = asyncio.create_task(after())
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Run a background task owned by the service; if it dies, the service stops."""
        task = asyncio.create_task(coro, name=f"{self.name}:{name}")
        self._background.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._background.discard(t)
            if t.cancelled() or self._state in ("stopping", "stopped"):
                return
            exc = t.exception()
            if exc is not None:
                log.error("task.died", task=name, error=repr(exc), exc_info=exc)
                self.fatal = exc
                asyncio.get_running_loop().create_task(self.stop())

        task.add_done_callback(done)
        return task

    def every(
        self,
        interval: float | Callable[[], float],
        step: Callable[[], Awaitable[None]],
        name: str,
        *,
        first: float | None = None,
        backoff_cap: float = LOOP_BACKOFF_CAP_S,
    ) -> asyncio.Task[None]:
        """Run ``step`` every ``interval`` seconds (the first after ``first``, default one
        interval) until the service stops: the one way a service runs background work.

        A transient failure (``TRANSIENT``) is logged and counted, and the next step waits
        twice as long each time it happens again (up to ``backoff_cap``: a lease renewal
        passes its interval, so that it never waits past its lease); a programming error
        ends the loop and, through :meth:`spawn`, stops the service with its traceback.
        """
        stats = self.loop_stats.setdefault(name, LoopCounter(name))

        def period() -> float:
            return interval() if callable(interval) else interval

        async def loop() -> None:
            delay = period() if first is None else first
            while True:
                await asyncio.sleep(delay)
                if not self.looping:
                    return
                try:
                    await step()
                except TRANSIENT as exc:
                    stats.failed(exc)
                    delay = stats.backoff(period(), max(backoff_cap, period()))
                    log.warning(
                        "loop.failed", loop=name, error=repr(exc), retry_in_s=round(delay, 3)
                    )
                    continue
                stats.ok()
                delay = period()

        return self.spawn(loop(), name)

    async def bounded(self, name: str, step: Callable[[], Awaitable[T]], default: T) -> T:
        """One manager's step of a tick in its own error boundary (Ray Serve's controller
        updates each state manager so): a transient failure is logged and counted under
        ``name`` in ``loop_stats`` and ``default`` returned, so the tick's other steps still
        run; a programming error propagates."""
        stats = self.loop_stats.setdefault(name, LoopCounter(name))
        try:
            result = await step()
        except TRANSIENT as exc:
            stats.failed(exc)
            if isinstance(exc, Unavailable):  # e.g. a peer not up yet: nothing to act on
                log.info("step.skipped", step=name, error=str(exc))
            else:
                log.warning("step.failed", step=name, error=repr(exc))
            return default
        stats.ok()
        return result

    def watch(
        self,
        bucket: Bucket[T],
        on_change: Callable[[str, T | None], None],
        name: str,
        *,
        keys: str = ">",
    ) -> asyncio.Task[None]:
        """Follow ``bucket`` (every current record, then each change) into ``on_change``
        (a key and its value, or ``None`` when deleted), supervised like :meth:`every`:
        a malformed record is logged, counted and skipped, a broken watch is started
        again after a backoff."""
        stats = self.loop_stats.setdefault(name, LoopCounter(name))
        return self.spawn(follow(bucket, on_change, stats, keys, lambda: self.looping), name)

    def service_stats(self) -> ServiceStatsReply:
        """What the ``service_stats`` verb answers: per endpoint and per loop."""
        return ServiceStatsReply(
            service=self.name,
            node=self.config.node_id,
            pid=os.getpid(),
            uptime_s=round(time.time() - self.started_at, 3),
            endpoints=[e.snapshot() for e in self.endpoint_stats.values()],
            loops=[lp.snapshot() for lp in self.loop_stats.values()],
            malformed_records=dict(MALFORMED),
        )

    async def publish_event(
        self,
        kind: str,
        data: dict[str, Any],
        *,
        request_id: str | None = None,
        dedupe_id: str | None = None,
        ack: bool = True,
    ) -> None:
        """Publish an event into the EVENTS stream; failures are logged, never raised.

        With ``ack=False`` (the invocation hot path) the event is a plain NATS publish that
        the stream stores without a round trip back to us.
        """
        event = new_event(kind, f"{self.name}@{self.config.node_id}", data, request_id)
        headers = {c.HDR_MSG_ID: dedupe_id} if dedupe_id else None
        try:
            if ack:
                await self.js.publish(subjects.event(kind), encode_json(event), headers=headers)
            else:
                await self.nc.publish(subjects.event(kind), encode_json(event), headers=headers)
        except Exception as exc:  # events are best effort; the request itself succeeded
            log.warning("event.publish_failed", kind=kind, error=repr(exc))

    # --- internals -----------------------------------------------------------------------

    def _base_endpoints(self) -> list[Endpoint]:
        """Every service's own verbs: ping, its statistics (also on the broadcast)."""

        def own(verb: str) -> str:
            if self.node_scoped:
                return subjects.node(self.config.node_id, self.name, verb)
            return subjects.cluster(self.name, verb)

        return [
            endpoint(own(subjects.PING), Ping, self._ping),
            endpoint(own(subjects.SERVICE_STATS), ServiceStatsRequest, self._stats),
            endpoint(subjects.STATS_ALL, ServiceStatsRequest, self._stats, name="stats_all"),
        ]

    async def _ping(self, _: Ping) -> Pong:
        return Pong(service=self.name, node=self.config.node_id, pid=os.getpid())

    async def _stats(self, _: ServiceStatsRequest) -> ServiceStatsReply:
        return self.service_stats()

    @property
    def _heartbeat_key(self) -> str:
        return f"{self.config.node_id}.{self.name}"

    async def _heartbeat_once(self) -> None:
        beat = Heartbeat(
            node=self.config.node_id,
            service=self.name,
            pid=os.getpid(),
            started_at=self.started_at,
            updated_at=time.time(),
            devices=self.devices(),
            links=self.gpu_links(),
        )
        await self.buckets.nodes.put(self._heartbeat_key, encode_json(beat))

    @staticmethod
    async def _cancel(tasks: set[asyncio.Task[None]], deadline_s: float = 5.0) -> None:
        await cancel_and_wait(tasks, deadline_s)


async def follow(
    bucket: Bucket[T],
    on_change: Callable[[str, T | None], None],
    stats: LoopCounter,
    keys: str = ">",
    looping: Callable[[], bool] = lambda: True,
) -> None:
    """Follow ``bucket`` into ``on_change`` while ``looping()``: a malformed record is
    skipped and counted, a watch broken by a transient failure is started again (each
    start delivers the current records again: ``on_change`` must be idempotent). The body
    of :meth:`Service.watch`, for owners that are not a ``Service`` (the gateway)."""

    def skipped() -> None:
        stats.skipped += 1

    while looping():
        try:
            async for key, value in bucket.watch(keys, skipped):
                on_change(key, value)
                stats.ok()
        except TRANSIENT as exc:
            stats.failed(exc)
            log.warning("watch.failed", watch=stats.name, error=repr(exc))
        await asyncio.sleep(stats.backoff(0.1, LOOP_BACKOFF_CAP_S))


def stop_signals() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM (call from the running loop of an entry point)."""
    loop = asyncio.get_running_loop()
    event = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, event.set)
    return event


async def run_service(service: Service) -> int:
    """Entry point body: start, wait for SIGINT/SIGTERM or a fatal error, stop in time."""
    stop_requested = stop_signals()
    try:
        await service.start()
    except PlatformError as exc:
        log.error("service.start_failed", code=exc.code, error=exc.message)
        await service.stop()
        return 1
    waiter = asyncio.create_task(stop_requested.wait())
    stopped = asyncio.create_task(service.wait_stopped())
    await asyncio.wait({waiter, stopped}, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    try:
        async with asyncio.timeout(service.config.shutdown_deadline_s):
            await service.stop()
    except TimeoutError:
        log.error("service.stop_timeout", deadline_s=service.config.shutdown_deadline_s)
        return 1
    return 1 if service.fatal is not None else 0


def main(factory: Callable[[Config], Service]) -> None:
    """``python -m gpufaas.<service>``: config from env, logging, run until signalled.

    A bad setting (a malformed ``GPUFAAS_*`` value, an unknown topology) exits with
    status 2 and one line naming it, not a traceback.
    """
    try:
        config = Config.from_env()
        configure_logging(config.log_format, config.log_level)
        service = factory(config)
    except PlatformError as exc:
        print(f"error: {exc.message} ({exc.field})", file=sys.stderr)
        raise SystemExit(2) from None
    structlog.contextvars.bind_contextvars(service=service.name)
    raise SystemExit(asyncio.run(run_service(service)))
