"""Admission control at the gateway: per-tenant limits and per-request size caps.

Each tenant has, in each gateway, a cap on its requests at once, a token bucket for its
request rate and a cap on its open event streams (429 ``overloaded`` with
``Retry-After`` beyond); defaults come from ``GPUFAAS_TENANT_*``, overrides for some
tenants from ``GPUFAAS_TENANT_LIMITS`` (JSON). Limits are per gateway process: with N
gateways a tenant gets up to N times them. An inference request's inputs are capped in
rows (the function's ``max_rows``) and in decoded bytes (the body cap): 413 naming the
input's shape, before its data is decoded.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
import nats.errors
import orjson
from aiohttp import web
from nats.js import JetStreamContext

from gpufaas.gateway.auth import caller_of
from gpufaas.shared import constants as c
from gpufaas.shared.config import Config
from gpufaas.shared.errors import InvalidArgument, Overloaded, PayloadTooLarge, Unavailable
from gpufaas.shared.quotas import QUOTA_KEYS
from gpufaas.shared.tensors import raw_nbytes

LIMITS_ENV = "GPUFAAS_TENANT_LIMITS"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class TenantLimits(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One tenant's limits in one gateway (an entry of ``GPUFAAS_TENANT_LIMITS``)."""

    max_inflight: int = c.DEFAULT_TENANT_MAX_INFLIGHT
    rate: float = c.DEFAULT_TENANT_RATE  # requests per second (the bucket's refill)
    burst: int = c.DEFAULT_TENANT_BURST
    max_streams: int = c.DEFAULT_TENANT_MAX_STREAMS


def parse_limits(config: Config) -> tuple[TenantLimits, dict[str, TenantLimits]]:
    """The default limits and the per-tenant overrides (a field left out of an override
    takes the default; the scheduler's quota keys are its own, ``shared/quotas.py``); a
    malformed mapping is ``InvalidArgument`` naming the variable."""
    default = TenantLimits(
        max_inflight=config.tenant_max_inflight,
        rate=config.tenant_rate,
        burst=config.tenant_burst,
        max_streams=config.tenant_max_streams,
    )
    if not config.tenant_limits.strip():
        return default, {}
    try:
        raw = msgspec.convert(orjson.loads(config.tenant_limits), dict[str, dict[str, Any]])
        base = msgspec.structs.asdict(default)
        per = {
            t: msgspec.convert(
                {**base, **{k: x for k, x in v.items() if k not in QUOTA_KEYS}}, TenantLimits
            )
            for t, v in raw.items()
        }
    except (orjson.JSONDecodeError, msgspec.ValidationError) as exc:
        raise InvalidArgument(f"{LIMITS_ENV} is malformed: {exc}", field=LIMITS_ENV) from None
    for tenant, lim in [("", default), *per.items()]:
        if lim.max_inflight < 1 or lim.rate <= 0 or lim.burst < 1 or lim.max_streams < 0:
            raise InvalidArgument(
                f"tenant limits of {tenant or 'the default'} must be positive: {lim}",
                field=LIMITS_ENV,
            )
    return default, per


@dataclass(slots=True)
class TenantState:
    """What one tenant uses now in this gateway."""

    tokens: float
    updated: float
    inflight: int = 0
    streams: int = 0


@dataclass(slots=True)
class Admission:
    """Per-tenant in-flight, rate and stream limits of one gateway (injected clock)."""

    default: TenantLimits
    overrides: dict[str, TenantLimits]
    clock: Callable[[], float] = time.monotonic
    tenants: dict[str, TenantState] = field(default_factory=dict)
    rejected: int = 0

    @classmethod
    def from_config(cls, config: Config) -> Admission:
        default, overrides = parse_limits(config)
        return cls(default, overrides)

    def limits(self, tenant: str) -> TenantLimits:
        return self.overrides.get(tenant, self.default)

    def _state(self, tenant: str, lim: TenantLimits) -> TenantState:
        st = self.tenants.get(tenant)
        if st is None:
            st = self.tenants[tenant] = TenantState(tokens=float(lim.burst), updated=self.clock())
        return st

    def _refuse(self, message: str, retry_after_s: float) -> Overloaded:
        self.rejected += 1
        return Overloaded(message, retry_after_s=retry_after_s)

    @contextlib.contextmanager
    def request(self, tenant: str) -> Iterator[None]:
        """Hold one of ``tenant``'s in-flight places and spend one token, or raise
        ``Overloaded`` (with how long until a token or a place may be free)."""
        lim = self.limits(tenant)
        st = self._state(tenant, lim)
        if st.inflight >= lim.max_inflight:
            raise self._refuse(
                f"tenant {tenant!r} has {lim.max_inflight} requests in flight already",
                c.RETRY_AFTER_DEFAULT_S,
            )
        now = self.clock()
        st.tokens = min(float(lim.burst), st.tokens + (now - st.updated) * lim.rate)
        st.updated = now
        if st.tokens < 1.0:
            wait = (1.0 - st.tokens) / lim.rate
            raise self._refuse(
                f"tenant {tenant!r} is over its rate of {lim.rate:g} requests/s",
                min(max(wait, c.RETRY_AFTER_DEFAULT_S), c.RETRY_AFTER_MAX_S),
            )
        st.tokens -= 1.0
        st.inflight += 1
        try:
            yield
        finally:
            st.inflight -= 1

    @contextlib.contextmanager
    def stream(self, tenant: str) -> Iterator[None]:
        """Hold one of ``tenant``'s event-stream places, or raise ``Overloaded``."""
        lim = self.limits(tenant)
        st = self._state(tenant, lim)
        if st.streams >= lim.max_streams:
            raise self._refuse(
                f"tenant {tenant!r} has {lim.max_streams} event streams open already",
                c.RETRY_AFTER_DEFAULT_S,
            )
        st.streams += 1
        try:
            yield
        finally:
            st.streams -= 1


ADMISSION = web.AppKey("admission", Admission)


def admitted(handler: Handler) -> Handler:
    """``handler`` run under its tenant's in-flight and rate limits (429 beyond), checked
    before the body is read."""

    @functools.wraps(handler)
    async def run(request: web.Request) -> web.StreamResponse:
        with request.app[ADMISSION].request(caller_of(request).tenant):
            return await handler(request)

    return run


def capped_streams(handler: Handler) -> Handler:
    """``handler`` (a long-lived stream) holding one of its tenant's stream places."""

    @functools.wraps(handler)
    async def run(request: web.Request) -> web.StreamResponse:
        with request.app[ADMISSION].stream(caller_of(request).tenant):
            return await handler(request)

    return run


async def replay_start(js: JetStreamContext, wanted: int, max_events: int) -> int:
    """The EVENTS sequence a replay starts at: ``wanted`` (0: the oldest kept), but never
    before the latest ``max_events`` events (``GPUFAAS_EVENTS_REPLAY_MAX``): a client's
    replay costs the server a bounded amount, however long the stream's history. Past
    the stream's end (an id from before a stream was recreated): the next new event."""
    try:
        state = (await js.stream_info(c.EVENTS_STREAM)).state
    except (nats.errors.Error, TimeoutError) as exc:
        raise Unavailable(f"cannot read the EVENTS stream: {exc!r}") from None
    return min(max(wanted, state.last_seq - max_events + 1, state.first_seq, 1), state.last_seq + 1)


def check_input_sizes(inputs: list[Any], max_rows: int, max_bytes: int) -> None:
    """413 naming ``inputs[i].shape`` when an input has more rows (first dimension) than
    ``max_rows`` or would decode to more than ``max_bytes``: checked on the declared
    shape, before the data is decoded (a shape cannot make the gateway allocate)."""
    for i, inp in enumerate(inputs):
        shape: list[int] = inp.shape
        where = f"inputs[{i}].shape"
        if shape and shape[0] > max_rows:
            raise PayloadTooLarge(
                f"input {inp.name!r} has {shape[0]} rows; this function takes at most "
                f"{max_rows} per request (its max_rows option)",
                field=where,
            )
        # BYTES elements have no fixed size: at least one byte each.
        nbytes = raw_nbytes(inp.datatype, shape) or math.prod(shape)
        if nbytes > max_bytes:
            raise PayloadTooLarge(
                f"input {inp.name!r} of shape {shape} is {nbytes} bytes; at most {max_bytes}",
                field=where,
            )
