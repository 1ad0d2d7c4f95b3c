"""Who is calling: API keys on every route but liveness and readiness.

The middleware turns ``Authorization: Bearer <key>`` into a :class:`Caller` (the tenant
comes from the key). ``X-Gpufaas-Tenant`` is honoured only for admin keys, which then act
as that tenant (recorded in an ``auth.acted_as`` event); a tenant's key naming another
tenant is refused. Keys are verified against a watched copy of the keys bucket
(:class:`~gpufaas.shared.apikeys.KeyCache`): no round trip on the hot path.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware

from gpufaas.shared import constants as c
from gpufaas.shared.apikeys import KeyCache
from gpufaas.shared.config import Config
from gpufaas.shared.errors import InvalidArgument, PermissionDenied, Unauthenticated
from gpufaas.shared.messages import NAME_PATTERN

log = structlog.get_logger()

TENANT_HEADER: Final = "X-Gpufaas-Tenant"
AUTH_HEADER: Final = "Authorization"
# The only routes a caller without a key may reach: orchestrators probe the first two;
# the web console's files hold no data (the page asks for a key and sends it itself).
OPEN_PATHS: Final = frozenset({"/v2/health/live", "/v2/health/ready", "/console"})
OPEN_PREFIX: Final = "/console/"
ACTED_AS: Final = "auth.acted_as"

_NAME: Final = re.compile(NAME_PATTERN)
_MISSING: Final = (
    "missing API key: send 'Authorization: Bearer <key>' (the key `gpufaas up` printed, "
    "or one from `gpufaas keys create`)"
)


@dataclass(frozen=True, slots=True)
class Caller:
    """The verified caller of one request: the tenant it acts as, and what it may do."""

    tenant: str
    admin: bool = False
    key_id: str | None = None  # None: authentication is off
    acting: bool = False  # an admin acting as a tenant (its views narrowed to that tenant)

    @property
    def sees_all(self) -> bool:
        """Whether the caller's views (events, nodes) span every tenant."""
        return self.admin and not self.acting


CALLER = web.RequestKey("caller", Caller)
KEYS = web.AppKey("keys", KeyCache)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# (request, event kind, event data): how the middleware records an admin acting as a tenant.
Publish = Callable[[web.Request, str, dict[str, Any]], Awaitable[None]]


def caller_of(request: web.Request) -> Caller:
    """The request's caller (set by the middleware on every authenticated route)."""
    return request[CALLER]


def require_admin(request: web.Request, what: str) -> Caller:
    """The caller, if it holds an admin key; ``PermissionDenied`` otherwise."""
    caller = request[CALLER]
    if not caller.admin:
        raise PermissionDenied(f"{what} needs an admin key", field=AUTH_HEADER)
    return caller


def _header_tenant(headers: Mapping[str, str]) -> str | None:
    tenant = headers.get(TENANT_HEADER)
    if tenant is not None and not _NAME.match(tenant):
        raise InvalidArgument(f"tenant {tenant!r} is not a valid name", field=TENANT_HEADER)
    return tenant


def bearer_token(headers: Mapping[str, str]) -> str:
    """The token of ``Authorization: Bearer <token>``; ``Unauthenticated`` without one."""
    header = headers.get(AUTH_HEADER)
    if header is None:
        raise Unauthenticated(_MISSING, field=AUTH_HEADER)
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("the Authorization header must be 'Bearer <key>'", field=AUTH_HEADER)
    return token.strip()


async def authenticate(request: web.Request, keys: KeyCache) -> Caller:
    """The caller of ``request`` from its key (and, for an admin key, the tenant header)."""
    return await authenticate_headers(request.headers, keys)


async def authenticate_headers(headers: Mapping[str, str], keys: KeyCache) -> Caller:
    """``authenticate`` from headers (case-insensitive: HTTP's, or gRPC's metadata)."""
    record = await keys.verify(bearer_token(headers))
    wanted = _header_tenant(headers)
    if wanted is None or wanted == record.tenant:
        return Caller(record.tenant, record.admin, record.id)
    if not record.admin:
        raise PermissionDenied(
            f"this key belongs to tenant {record.tenant!r}; only admin keys may act as "
            "another tenant",
            field=TENANT_HEADER,
        )
    return Caller(wanted, True, record.id, acting=True)


def unverified_caller(headers: Mapping[str, str]) -> Caller:
    """The caller while authentication is off: the tenant header trusted, as an admin."""
    return Caller(_header_tenant(headers) or c.DEFAULT_TENANT, admin=True, acting=True)


def is_open(path: str) -> bool:
    """Whether ``path`` is served without a key (``OPEN_PATHS``, the console's files)."""
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIX)


def auth_middleware(config: Config, publish: Publish) -> Middleware:
    """The middleware: a :class:`Caller` on every request but liveness and readiness.

    With ``config.auth`` off the tenant header is trusted as before keys existed (and the
    caller may do what an admin may): for local experiments only.
    """

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if is_open(request.path) or (config.metrics_public and request.path == "/metrics"):
            return await handler(request)
        if not config.auth:
            request[CALLER] = unverified_caller(request.headers)
            return await handler(request)
        caller = await authenticate(request, request.app[KEYS])
        request[CALLER] = caller
        if caller.acting:
            await publish(
                request,
                ACTED_AS,
                {
                    "tenant": caller.tenant,
                    "key_id": caller.key_id,
                    "method": request.method,
                    "path": request.path,
                },
            )
        return await handler(request)

    return middleware


def warn_if_open(config: Config) -> None:
    """Say loudly, at start, that a gateway trusts whatever tenant a caller names."""
    if not config.auth:
        log.warning(
            "auth.disabled",
            message=(
                "GPUFAAS_AUTH=0: NO AUTHENTICATION. Anyone who can reach this gateway is any "
                "tenant and an admin. For local experiments only."
            ),
        )
