"""What the scheduler's parts need of the service that wires them (a structural type).

Each part (request path, failover, autoscaling leader, ...) is its own object holding
its own state; they reach NATS, KV and the live worker set through this, never through
each other's internals.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, Protocol

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from gpufaas.shared.config import Config
from gpufaas.shared.kv import TypedBuckets


class Host(Protocol):
    """The scheduler service, as its parts see it."""

    config: Config
    replica: str  # this replica's id: node/pid/start time
    workers: dict[str, float]  # live node -> its worker's start time

    @property
    def nc(self) -> NATS: ...

    @property
    def js(self) -> JetStreamContext: ...

    @property
    def kv(self) -> TypedBuckets: ...

    async def publish_event(
        self,
        kind: str,
        data: dict[str, Any],
        *,
        request_id: str | None = None,
        dedupe_id: str | None = None,
        ack: bool = True,
    ) -> None: ...

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]: ...

    def after_reply(self, coro: Coroutine[Any, Any, None]) -> None: ...

    async def live_workers(self) -> list[str]:
        """The live nodes with a worker, sorted (``Unavailable`` when there is none)."""
        ...

    async def refresh_workers(self) -> None:
        """Read the live worker set again (no events announced)."""
        ...
