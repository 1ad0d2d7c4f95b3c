"""The gateway's table of direct routes: slots, lapses and renewals (no NATS needed)."""

from __future__ import annotations

import pytest

from gpufaas.gateway.direct import DirectRoutes
from gpufaas.shared.messages import Route

pytestmark = pytest.mark.unit

KEY = "t/f"


def route(node: str = "node-0", slots: int = 2) -> Route:
    return Route(node=node, slots=slots, ttl_s=1.0)


def test_slots_bound_the_requests_in_flight_and_come_back() -> None:
    routes = DirectRoutes()
    assert routes.take(KEY, 0.0) is None  # no grant yet
    routes.grant(KEY, route(slots=2), now=0.0)
    a, b = routes.take(KEY, 0.1), routes.take(KEY, 0.1)
    assert a is not None
    assert b is a
    assert routes.take(KEY, 0.1) is None  # both slots in flight: through a scheduler
    a.inflight -= 1
    assert routes.take(KEY, 0.2) is a


def test_a_lapsed_grant_sends_through_a_scheduler_until_renewed() -> None:
    routes = DirectRoutes()
    routes.grant(KEY, route(), now=0.0)
    assert routes.take(KEY, 1.0) is None  # lapsed at 1 s
    routes.grant(KEY, route(), now=1.0)
    assert routes.take(KEY, 1.5) is not None


def test_a_renewal_keeps_counting_the_requests_in_flight() -> None:
    """Requests in flight across a renewal give their slots back to the grant they took,
    which is the renewed one: the count neither leaks nor resets."""
    routes = DirectRoutes()
    routes.grant(KEY, route(slots=2), now=0.0)
    held = [routes.take(KEY, 0.5), routes.take(KEY, 0.5)]
    for _ in range(5):  # renewed while both are in flight
        routes.grant(KEY, route(slots=2), now=0.9)
        assert routes.take(KEY, 0.95) is None
    for g in held:
        assert g is not None
        g.inflight -= 1
    assert routes.grants[KEY].inflight == 0
    assert routes.take(KEY, 1.0) is not None


def test_a_route_to_another_node_starts_empty_and_a_drop_forgets_it() -> None:
    routes = DirectRoutes()
    routes.grant(KEY, route("node-0", slots=1), now=0.0)
    old = routes.take(KEY, 0.1)
    assert old is not None
    routes.grant(KEY, route("node-1", slots=1), now=0.2)
    new = routes.take(KEY, 0.3)
    assert new is not None
    assert new.route.node == "node-1"
    routes.drop(KEY, old)  # a stale grant's failure leaves the new one alone
    assert KEY in routes.grants
    routes.drop(KEY, new)
    assert KEY not in routes.grants


def test_direct_counts_are_reported_once() -> None:
    routes = DirectRoutes()
    for _ in range(3):
        routes.count(KEY)
    assert routes.renewal(KEY) == 3
    assert routes.renewal(KEY) == 0
