"""Requests to a node's worker of a tenant, binding a worker process when none answers,
and sending a request again when the process it was sent to dies, or says its NATS
connection dropped and came back (``shared.worker_deaths``)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog

from gpufaas.scheduler.host import Host
from gpufaas.shared import subjects
from gpufaas.shared.errors import PlatformError, Unavailable
from gpufaas.shared.identity import FunctionRef
from gpufaas.shared.messages import (
    Msg,
    WorkerBindReply,
    WorkerBindRequest,
    WorkerUnloadReply,
    WorkerUnloadRequest,
)
from gpufaas.shared.rpc import Interrupted, request
from gpufaas.shared.worker_deaths import Deaths, Loss, WorkerLost

__all__ = ["Deaths", "Loss", "WorkerClient", "WorkerLost"]

log = structlog.get_logger()
R = TypeVar("R", bound=Msg)
T = TypeVar("T")

# A request whose worker process dies under it this many times in a row fails (503): a
# crash loop (say, a model that kills its process) is not retried for ever.
MAX_RESENDS = 2
# A process's notices that its connection came back (it may have missed a request, or its
# reply been lost) make its sends go again at most once a RECONNECT_GAP_S; they are not
# counted against MAX_RESENDS (a request's deadline bounds them).
RECONNECT_GAP_S = 1.0


def merged(first: WorkerBindReply | None, then: WorkerBindReply | None) -> WorkerBindReply | None:
    """What two binds of one request cost together (the later process serves it)."""
    if first is None or then is None:
        return then or first
    return WorkerBindReply(
        worker=then.worker,
        waited_us=first.waited_us + then.waited_us,
        new_process=first.new_process or then.new_process,
    )


class WorkerClient:
    """Sends worker verbs to ``(node, tenant)``; the bind's reply says what it cost."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.deaths = Deaths()
        self.resent = 0  # requests sent again because their process died or reconnected
        self._reconnects: dict[tuple[str, str | None], float] = {}

    async def call(
        self,
        node: str,
        tenant: str,
        verb: str,
        msg: Msg,
        reply_type: type[R],
        *,
        timeout: float,
        request_id: str | None = None,
        bind: bool = True,
    ) -> tuple[R, WorkerBindReply | None]:
        """A worker verb for ``tenant`` on ``node`` (see ``_call_once``). Should the
        process die before it answers (the pool's ``worker.exited``, see ``lost``), the
        same message (same dispatch id) is sent again at once, to the process the pool
        binds next, within the same deadline, at most ``MAX_RESENDS`` times."""
        until = time.monotonic() + timeout
        send = self._sender(node, tenant, verb, msg, reply_type, until=until, request_id=request_id)
        deaths = 0
        while True:
            try:
                return await self._call_once(node, tenant, send, request_id, bind=bind)
            except WorkerLost as lost:
                deaths += lost.died
                if lost.died and (not bind or deaths > MAX_RESENDS):
                    raise Unavailable(
                        f"the worker process of tenant {tenant!r} on node {node} died "
                        f"{deaths} times while it ran this request"
                    ) from None
                self.resent += 1
                log.warning(
                    "worker.lost_request_resent",
                    node=node,
                    tenant=tenant,
                    worker=lost.worker,
                    died=lost.died,
                    request_id=request_id,
                )

    def lost(self, node: str, tenant: str | None, worker: str) -> None:
        """A worker process died (``tenant`` None: the node's pool, with all of them)."""
        told = self.deaths.died(node, tenant, worker)
        log.info("worker.lost", node=node, tenant=tenant, worker=worker, requests=told)

    def reconnected(self, node: str, tenant: str | None, worker: str) -> None:
        """A worker process's NATS connection dropped and came back: what was sent to it
        meanwhile may be lost, so its sends in flight go again (answered once, by dispatch
        id). A process's notices count at most once a ``RECONNECT_GAP_S``, so that a
        process repeating them cannot make another tenant's requests fail."""
        now, key = time.monotonic(), (node, tenant)
        if now - self._reconnects.get(key, -RECONNECT_GAP_S) < RECONNECT_GAP_S:
            return
        if len(self._reconnects) > 4096:  # bounded: old entries dropped
            self._reconnects.clear()
        self._reconnects[key] = now
        told = self.deaths.died(node, tenant, worker, died=False)
        log.info("worker.reconnected", node=node, tenant=tenant, worker=worker, requests=told)

    async def _call_once(
        self,
        node: str,
        tenant: str,
        send: Callable[[str | None], Awaitable[R]],
        request_id: str | None,
        *,
        bind: bool,
    ) -> tuple[R, WorkerBindReply | None]:
        """When no process of the tenant answers on ``node`` (its first function there, or
        its process went idle and exited), the node's pool binds one (a warm spare, else a
        new process) and the request is sent again. The pool never returns a process that
        is retiring (see ``gpufaas.worker.pool``); should the bound one still not answer
        (it crashed meanwhile), the pool is asked once more."""
        try:
            return await send(None), None
        except Unavailable as exc:
            if not bind:
                raise
            try:
                bound = await self._bind(node, tenant, request_id)
            except Unavailable:
                raise exc from None  # no pool on that node: the first error stands
        try:
            return await send(bound.worker), bound
        except Unavailable:
            log.warning("worker.bound_not_answering", node=node, tenant=tenant, worker=bound.worker)
        again = await self._bind(node, tenant, request_id)
        return await send(again.worker), merged(bound, again)

    def _sender(
        self,
        node: str,
        tenant: str,
        verb: str,
        msg: Msg,
        reply_type: type[R],
        *,
        until: float,
        request_id: str | None,
    ) -> Callable[[str | None], Awaitable[R]]:
        """Sends ``msg`` to the tenant's process (``worker``: the one a bind just gave, or
        None), waiting for its reply until ``until`` or until that process dies."""
        subject = subjects.worker(node, tenant, verb)

        async def send(worker: str | None) -> R:
            with self.deaths.watching(node, tenant, worker) as died:
                try:
                    return await request(
                        self.host.nc,
                        subject,
                        msg,
                        reply_type,
                        timeout=max(until - time.monotonic(), 0.001),
                        request_id=request_id,
                        what=f"worker of node {node}",
                        resend=True,  # the worker answers a dispatch id once
                        interrupt=died,
                    )
                except Interrupted as stop:
                    raise WorkerLost(stop.why) from None

        return send

    async def _bind(self, node: str, tenant: str, request_id: str | None) -> WorkerBindReply:
        bound = await request(
            self.host.nc,
            subjects.node(node, "worker", subjects.WORKER_BIND),
            WorkerBindRequest(tenant=tenant),
            WorkerBindReply,
            timeout=self.host.config.deploy_timeout_s,
            request_id=request_id,
            what=f"worker of node {node}",
        )
        log.info(
            "worker.bound",
            node=node,
            tenant=tenant,
            worker=bound.worker,
            waited_us=bound.waited_us,
            new_process=bound.new_process,
        )
        return bound

    async def unload(self, node: str, ref: FunctionRef, gpu: str | None = None) -> None:
        """Unload a function's instances from ``node`` (only the one on ``gpu``, when
        given); nothing there is fine."""
        try:
            await self.call(
                node,
                ref.tenant,
                subjects.WORKER_UNLOAD,
                WorkerUnloadRequest(function=ref.name, tenant=ref.tenant, device=gpu),
                WorkerUnloadReply,
                timeout=5,
                bind=False,
            )
        except Unavailable:
            pass  # no process of the tenant there: nothing loaded
        except PlatformError as exc:
            log.warning("unload.failed", node=node, function=ref.key, error=exc.message)
