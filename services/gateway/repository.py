"""The model repository extension of the Open Inference Protocol (Triton's), over functions.

A model is a deployed function of the caller's tenant; deploying and deleting stay
``/v1/functions``. The index lists them, ``READY`` while one has an instance and
``UNAVAILABLE`` while it is scaled to zero (still callable: a request cold-starts it).
``load`` makes sure it has an instance now; ``unload`` scales it to zero (requests sent
already finish first) and leaves it deployed. Neither pins the count: afterwards the
autoscaler treats the function as any other (``scheduler/leader.py``, ``rescale``).
Empty bodies are taken as ``{}``, as ``tritonclient`` sends them.
"""

from __future__ import annotations

from typing import Any, Final

from aiohttp import web

from gpufaas.gateway import app as gw
from gpufaas.gateway.auth import Handler
from gpufaas.gateway.bodies import Body
from gpufaas.gateway.openapi import RouteDoc
from gpufaas.shared import subjects
from gpufaas.shared.errors import InvalidArgument
from gpufaas.shared.messages import FunctionRecord, ScaleReply, ScaleRequest, convert
from gpufaas.shared.registry import records

READY: Final = "READY"
UNAVAILABLE: Final = "UNAVAILABLE"
SCALED_TO_ZERO: Final = "no instance (scaled to zero); the next request or a load starts one"
# Load parameters that would change a model's files or configuration: deploy anew instead.
UNSUPPORTED_LOAD: Final = "config"


class IndexBody(Body):
    """``POST /v2/repository/index``: ``ready`` true lists only the models ready now."""

    ready: bool = False


class LoadBody(Body):
    """``POST /v2/repository/models/{name}/load`` and ``/unload``."""

    parameters: dict[str, Any] | None = None


async def _body(request: web.Request) -> Any:
    """The JSON body, ``{}`` when empty."""
    raw = await request.read()
    return await gw.read_json(request) if raw.strip() else {}


def entry(record: FunctionRecord) -> dict[str, Any]:
    """A model's index entry."""
    ready = bool(record.nodes)
    return {
        "name": record.spec.name,
        "version": "1",
        "state": READY if ready else UNAVAILABLE,
        "reason": "" if ready else SCALED_TO_ZERO,
    }


async def index(request: web.Request) -> web.Response:
    body = convert(await _body(request), IndexBody)
    gw.nats_of(request)
    found = [entry(r) for r in await records(request.app[gw.KV].functions, gw.tenant_of(request))]
    if body.ready:
        found = [e for e in found if e["state"] == READY]
    return gw.json_response(found)


async def _rescale(request: web.Request, load: bool) -> web.Response:
    body = convert(await _body(request), LoadBody)
    for key in body.parameters or {}:
        if key == UNSUPPORTED_LOAD or key.startswith("file:"):
            raise InvalidArgument(
                f"load parameter {key!r} is not supported: a model's files and settings come "
                "from its deploy (POST /v1/functions)",
                field=f"parameters.{key}",
            )
    record = await gw.require_function(request, request.match_info["name"])
    reply = await gw.ask_scheduler(
        request,
        subjects.SCHED_SCALE,
        ScaleRequest(name=record.spec.name, load=load, tenant=record.spec.tenant),
        ScaleReply,
        timeout=request.app[gw.CONFIG].deploy_timeout_s + 5,
    )
    return gw.json_response(entry(reply.function))


async def load(request: web.Request) -> web.Response:
    return await _rescale(request, load=True)


async def unload(request: web.Request) -> web.Response:
    return await _rescale(request, load=False)


ROUTES: list[tuple[RouteDoc, Handler]] = [
    (
        RouteDoc(
            "POST",
            "/v2/repository/index",
            "Model repository index (the tenant's functions, READY or UNAVAILABLE)",
            IndexBody,
            body_required=False,
        ),
        index,
    ),
    (
        RouteDoc(
            "POST",
            "/v2/repository/models/{name}/load",
            "Load a model: give the function an instance now, if it has none",
            LoadBody,
            body_required=False,
        ),
        load,
    ),
    (
        RouteDoc(
            "POST",
            "/v2/repository/models/{name}/unload",
            "Unload a model: scale the function to zero (it stays deployed)",
            LoadBody,
            body_required=False,
        ),
        unload,
    ),
]
