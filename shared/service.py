"""Base class of every service: lifecycle, NATS wiring, request serving, heartbeats.

``start()`` and ``stop()`` are idempotent. ``stop()`` shuts down in order: stop
accepting requests, drain in-flight handlers, cancel background tasks, run the
service's own clean-up, remove its heartbeat, flush and close NATS.
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
from pathlib import Path
from typing import Any, ClassVar

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
from gpufaas.shared.jetstream import Buckets, ensure_jetstream
from gpufaas.shared.logging import configure_logging
from gpufaas.shared.messages import (
    DeviceInfo,
    Heartbeat,
    M,
    Msg,
    Ping,
    Pong,
    decode,
    encode,
    encode_json,
    new_event,
)
from gpufaas.shared.rpc import error_reply

log = structlog.get_logger()

Handler = Callable[[M], Awaitable[Msg]]


async def connect_nats(config: Config, name: str) -> NATS:
    """Connect, retrying until ``connect_deadline_s`` so services may start before NATS."""
    deadline = time.monotonic() + config.connect_deadline_s
    servers = [s.strip() for s in config.nats_url.split(",") if s.strip()]
    while True:
        try:
            return await nats.connect(
                servers=servers,
                name=name,
                connect_timeout=2,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
            )
        except (OSError, nats.errors.NoServersError, TimeoutError) as exc:
            if time.monotonic() >= deadline:
                raise Unavailable(f"cannot reach NATS at {config.nats_url}: {exc}") from None
            await asyncio.sleep(0.2)


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
    def running(self) -> bool:
        return self._state == "running"

    @property
    def looping(self) -> bool:
        """Whether background loops should go on (false from the moment stop begins)."""
        return self._state in ("starting", "running")

    # --- hooks -------------------------------------------------------------------------

    async def on_start(self) -> None:
        """Subscribe handlers and start background work (called once)."""

    async def on_stop(self) -> None:
        """Release resources after handlers have drained (called once)."""

    def devices(self) -> list[DeviceInfo]:
        """Devices this service reports in its heartbeat."""
        return []

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, set up JetStream, run ``on_start``, announce readiness. Idempotent."""
        if self._state != "new":
            return
        self._state = "starting"
        structlog.contextvars.bind_contextvars(node=self.config.node_id)
        self._nc = await connect_nats(self.config, f"gpufaas-{self.name}")
        self._js = self._nc.jetstream()
        self._buckets = await ensure_jetstream(
            self._js, node_ttl_s=self.config.node_ttl_s, tube_ttl_s=self.config.tube_ttl_s
        )
        await self.on_start()
        ping = (
            subjects.node(self.config.node_id, self.name, subjects.PING)
            if self.node_scoped
            else subjects.cluster(self.name, subjects.PING)
        )
        await self.serve(ping, Ping, self._ping)
        if self.node_scoped:
            await self._heartbeat_once()
            self.spawn(self._heartbeat_loop(), "heartbeat")
        await self.nc.flush()
        self._state = "running"
        if self.config.ready_file:
            await asyncio.to_thread(Path(self.config.ready_file).write_text, str(os.getpid()))
        log.info("service.started", pid=os.getpid())

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

    async def serve(
        self, subject: str, req_type: type[M], handler: Handler[M], *, queue: str = ""
    ) -> None:
        """Answer requests on ``subject``: each in its own task, with typed errors."""

        async def on_msg(msg: NatsMsg) -> None:
            if self._state not in ("starting", "running"):
                if msg.reply:  # never silence: tell the caller to retry elsewhere
                    data, headers = error_reply(Unavailable(f"{self.name} is stopping"))
                    with contextlib.suppress(nats.errors.Error):
                        await self.nc.publish(msg.reply, data, headers=headers)
                return
            task = asyncio.create_task(self._handle(msg, req_type, handler))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

        self._subs.append(await self.nc.subscribe(subject, queue=queue, cb=on_msg))

    async def _handle(self, msg: NatsMsg, req_type: type[M], handler: Handler[M]) -> None:
        request_id = (msg.headers or {}).get(c.HDR_REQUEST_ID)
        REPLY_TO.set(msg.reply or None)
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

    async def _ping(self, _: Ping) -> Pong:
        return Pong(service=self.name, node=self.config.node_id, pid=os.getpid())

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
        )
        await self.buckets.nodes.put(self._heartbeat_key, encode_json(beat))

    async def _heartbeat_loop(self) -> None:
        while self.looping:
            await asyncio.sleep(self.config.heartbeat_s)
            try:
                await self._heartbeat_once()
            except (nats.errors.Error, TimeoutError) as exc:
                log.warning("heartbeat.failed", error=repr(exc))

    @staticmethod
    async def _cancel(tasks: set[asyncio.Task[None]], deadline_s: float = 5.0) -> None:
        await cancel_and_wait(tasks, deadline_s)


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
