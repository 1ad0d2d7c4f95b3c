"""Direct routes: a warm function's requests sent by the gateway straight to its worker.

A scheduler that ran a gateway's request on a warm instance grants the gateway a
``Route`` with its reply: the node, how many requests may be in flight on it from this
gateway (twice the instance's batch x concurrency), the batching configuration, and how
long the grant lasts (``GPUFAAS_DIRECT_ROUTE_TTL_S``, 1 s). Until it lapses, the gateway sends that
function's requests to the tenant's worker on that node itself: two NATS hops and a
scheduler's work fewer per request. Everything else still goes through a scheduler: the
first request after a grant lapses (which renews it, and tells the scheduler how many ran
directly, so the autoscaler counts them as arrivals), the requests beyond the slots (so a
queue forms where admission and scaling see it), and any request whose direct send fails.

What keeps the scheduler's guarantees:
- the worker's batcher orders every request by deadline slack and drops one whose
  deadline passed, direct or not;
- a worker runs a direct request only on an instance of that exact spec already built
  there (``WorkerRunRequest.direct``), never a cold start the scheduler did not place;
  otherwise it answers ``Unavailable``;
- a direct send that finds no worker, an overloaded one, or whose process dies or
  reconnects under it (the pool's ``worker.exited``, the worker's reconnect notice) drops
  the route and goes through a scheduler within the same deadline;
- a scheduler replica's death does not touch direct requests: none passed through it.
"""

from __future__ import annotations

import itertools
import time
import uuid
from dataclasses import dataclass

import structlog
from aiohttp import web

from gpufaas.gateway import app as gw
from gpufaas.shared import constants as c
from gpufaas.shared import subjects
from gpufaas.shared.errors import Overloaded, Unavailable
from gpufaas.shared.identity import FunctionRef
from gpufaas.shared.messages import (
    FunctionSpec,
    InvokeReply,
    Route,
    TensorPayload,
    WorkerRunRequest,
    completed,
)
from gpufaas.shared.rpc import Interrupted, request
from gpufaas.shared.worker_deaths import Deaths

log = structlog.get_logger()

MAX_GRANTS = 4096  # functions with a route held at once (the oldest dropped past it)
# Dispatch ids of this process's direct sends: unique without a random draw per request.
_PROCESS = uuid.uuid4().hex
_SENT = itertools.count()


@dataclass(slots=True)
class Grant:
    """One route as this gateway holds it, and its requests in flight."""

    route: Route
    until: float  # time.monotonic() at which it lapses
    inflight: int = 0


class DirectRoutes:
    """This gateway's routes by function, the direct requests run since each function's last
    request through a scheduler, and the direct sends in flight by ``(node, tenant)``."""

    def __init__(self) -> None:
        self.grants: dict[str, Grant] = {}  # FunctionRef.key -> its route
        self.served: dict[str, int] = {}  # key -> direct requests since the last renewal
        self.deaths = Deaths()
        self.sent = 0  # direct requests answered
        self.fell_back = 0  # direct sends that went through a scheduler instead

    def take(self, key: str, now: float) -> Grant | None:
        """A slot on ``key``'s route (the caller gives it back on the grant it got), or
        None: no route, it lapsed, or its slots are all in flight. A lapsed grant stays
        until its renewal, which keeps counting the requests still in flight on it."""
        grant = self.grants.get(key)
        if grant is None or now >= grant.until or grant.inflight >= grant.route.slots:
            return None
        grant.inflight += 1
        return grant

    def grant(self, key: str, route: Route, now: float) -> None:
        """A scheduler's grant. A renewal to the same node updates the grant in place, so
        the requests in flight on it, which give their slots back to that object, stay
        counted; a route to another node starts with none."""
        old = self.grants.pop(key, None)
        if old is not None and old.route.node == route.node:
            old.route, old.until = route, now + route.ttl_s
            self.grants[key] = old  # re-inserted: the oldest grants go first past the cap
        else:
            self.grants[key] = Grant(route, now + route.ttl_s)
        while len(self.grants) > MAX_GRANTS:
            del self.grants[next(iter(self.grants))]

    def drop(self, key: str, grant: Grant) -> None:
        """Stop using ``grant`` (its worker is gone or refused): the next request of the
        function goes through a scheduler."""
        if self.grants.get(key) is grant:
            del self.grants[key]

    def renewal(self, key: str) -> int:
        """The direct requests to report with a request through a scheduler (then zero)."""
        return self.served.pop(key, 0)

    def count(self, key: str) -> None:
        """One more direct request of ``key`` to report at the next renewal."""
        if key in self.served or len(self.served) < MAX_GRANTS:
            self.served[key] = self.served.get(key, 0) + 1


ROUTES = web.AppKey("direct_routes", DirectRoutes)


async def invoke(
    app: web.Application,
    request_id: str,
    spec: FunctionSpec,
    payloads: list[TensorPayload],
    deadline: float,
) -> InvokeReply | None:
    """The function's reply through its direct route; None when it has none with a free
    slot, or the send failed in a way a scheduler may fix (see the module's doc)."""
    routes = app[ROUTES]
    key = FunctionRef(spec.tenant, spec.name).key
    grant = routes.take(key, time.monotonic())
    if grant is None:
        return None
    route = grant.route
    run = WorkerRunRequest(
        spec=spec,
        request_id=request_id,
        inputs=payloads,
        deadline=deadline,
        max_batch=route.max_batch,
        concurrency=route.concurrency,
        dispatch_id=f"direct-{_PROCESS}-{next(_SENT)}",
        direct=True,
    )
    try:
        with routes.deaths.watching(route.node, spec.tenant, None) as died:
            reply = await request(
                gw.connected_nats(app),
                subjects.worker(route.node, spec.tenant, subjects.WORKER_RUN),
                run,
                InvokeReply,
                timeout=max(deadline - time.time(), 0.001) + c.WORKER_ANSWER_GRACE_S,
                request_id=request_id,
                what=f"worker of node {route.node}",
                resend=True,  # the worker answers a dispatch id once
                interrupt=died,  # its process died or reconnected
            )
    except (Unavailable, Overloaded, Interrupted) as exc:
        routes.drop(key, grant)
        routes.fell_back += 1
        app[gw.METRICS].direct.labels("fell_back").inc()
        log.info("direct.fell_back", function=key, node=route.node, error=repr(exc))
        return None
    finally:
        grant.inflight -= 1
    routes.sent += 1
    routes.count(key)
    app[gw.METRICS].direct.labels("answered").inc()
    event = completed(spec.name, spec.tenant, reply) | {"route": "direct"}
    await gw.publish_app_event(app, request_id, "invocation.completed", event)
    return reply
