"""Key management routes (admin keys only): create, list, revoke API keys."""

from __future__ import annotations

import time
from typing import Annotated, Any

import msgspec
import orjson
from aiohttp import web

from gpufaas.gateway.auth import KEYS, Handler, require_admin
from gpufaas.gateway.bodies import Body
from gpufaas.gateway.openapi import Param, RouteDoc
from gpufaas.shared import apikeys
from gpufaas.shared.errors import InvalidArgument, NotFound
from gpufaas.shared.messages import Tenant, convert


class KeyBody(Body):
    """``POST /v1/keys``: a key for ``tenant``; it expires after ``expires_in_s`` seconds
    or at ``expires_at`` (Unix time), or never when neither is given."""

    tenant: Tenant
    admin: bool = False
    expires_in_s: Annotated[float, msgspec.Meta(gt=0)] | None = None
    expires_at: Annotated[float, msgspec.Meta(gt=0)] | None = None
    label: Annotated[str, msgspec.Meta(max_length=200)] = ""


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


async def keys_post(request: web.Request) -> web.Response:
    """Make a key; its token is in this reply and nowhere else, ever."""
    require_admin(request, "creating API keys")
    try:
        raw = orjson.loads(await request.read() or b"null")
    except orjson.JSONDecodeError as exc:
        raise InvalidArgument(f"malformed JSON: {exc}", field="body") from None
    body = convert(raw, KeyBody)
    if body.expires_in_s is not None and body.expires_at is not None:
        raise InvalidArgument("give expires_in_s or expires_at, not both", field="expires_at")
    now = time.time()
    expires_at = body.expires_at
    if body.expires_in_s is not None:
        expires_at = now + body.expires_in_s
    token, record = await apikeys.create_key(
        request.app[KEYS].bucket, body.tenant, body.admin, expires_at, body.label, now=now
    )
    request.app[KEYS].on_change(record.id, record)
    return _json({"key": token, **record.public()}, 201)


async def keys_list(request: web.Request) -> web.Response:
    """Every key (never a secret or its hash), of one tenant with ``?tenant=``."""
    require_admin(request, "listing API keys")
    tenant = request.query.get("tenant")
    entries = await request.app[KEYS].bucket.items()
    found = [e.value.public() for e in entries if tenant is None or e.value.tenant == tenant]
    return _json({"keys": sorted(found, key=lambda k: (k["tenant"], k["created_at"]))})


async def key_delete(request: web.Request) -> web.Response:
    """Revoke a key: refused from the next request on (every gateway within a second)."""
    require_admin(request, "revoking API keys")
    key_id = request.match_info["id"]
    record = await apikeys.revoke(request.app[KEYS].bucket, key_id)
    if record is None:
        raise NotFound(f"API key {key_id!r} not found", field="id")
    request.app[KEYS].on_change(record.id, record)
    return _json({"revoked": record.id, "revoked_at": record.revoked_at})


ROUTES: list[tuple[RouteDoc, Handler]] = [
    (RouteDoc("POST", "/v1/keys", "Create an API key (admin)", KeyBody, ok=201), keys_post),
    (
        RouteDoc(
            "GET",
            "/v1/keys",
            "List API keys, without secrets (admin)",
            params=(Param("tenant", "query", {"type": "string"}, "only this tenant's keys"),),
        ),
        keys_list,
    ),
    (
        RouteDoc(
            "DELETE",
            "/v1/keys/{id}",
            "Revoke an API key (admin)",
            params=(Param("id", "path", {"type": "string", "pattern": apikeys.ID_PATTERN}),),
        ),
        key_delete,
    ),
]
