"""Requests to a node's worker of a tenant, binding a worker process when none answers."""

from __future__ import annotations

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
from gpufaas.shared.rpc import request

log = structlog.get_logger()
R = TypeVar("R", bound=Msg)


class WorkerClient:
    """Sends worker verbs to ``(node, tenant)``; the bind's reply says what it cost."""

    def __init__(self, host: Host) -> None:
        self.host = host

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
        """A worker verb for ``tenant`` on ``node``. When no process of the tenant answers
        there (its first function on the node, or its process went idle and exited), the
        node's pool binds one (a warm spare, else a new process) and the request is sent
        again. The pool never returns a process that is retiring (see
        ``gpufaas.worker.pool``); should the bound one still not answer (it crashed
        meanwhile), the pool is asked once more."""
        subject = subjects.worker(node, tenant, verb)

        async def send() -> R:
            return await request(
                self.host.nc,
                subject,
                msg,
                reply_type,
                timeout=timeout,
                request_id=request_id,
                what=f"worker of node {node}",
            )

        try:
            return await send(), None
        except Unavailable as exc:
            if not bind:
                raise
            try:
                bound = await self._bind(node, tenant, request_id)
            except Unavailable:
                raise exc from None  # no pool on that node: the first error stands
        try:
            return await send(), bound
        except Unavailable:
            log.warning("worker.bound_not_answering", node=node, tenant=tenant, worker=bound.worker)
        again = await self._bind(node, tenant, request_id)
        bound = WorkerBindReply(
            worker=again.worker,
            waited_us=bound.waited_us + again.waited_us,
            new_process=bound.new_process or again.new_process,
        )
        return await send(), bound

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

    async def unload(self, node: str, ref: FunctionRef) -> None:
        """Unload a function's instance from ``node`` (nothing there is fine)."""
        try:
            await self.call(
                node,
                ref.tenant,
                subjects.WORKER_UNLOAD,
                WorkerUnloadRequest(function=ref.name, tenant=ref.tenant),
                WorkerUnloadReply,
                timeout=5,
                bind=False,
            )
        except Unavailable:
            pass  # no process of the tenant there: nothing loaded
        except PlatformError as exc:
            log.warning("unload.failed", node=node, function=ref.key, error=exc.message)
