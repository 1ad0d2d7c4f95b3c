"""The OpenAPI document, built from the same route table that registers the routes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from gpufaas.gateway.bodies import DeployBody, InferBody
from gpufaas.shared.messages import NAME_PATTERN


@dataclass(frozen=True, slots=True)
class Param:
    """A query, header or path parameter of a route (a path one not listed is any string)."""

    name: str
    where: str  # query | header | path
    schema: dict[str, Any]
    description: str = ""


# Path parameters by name, unless a route declares its own.
PATH_PARAMS: dict[str, Param] = {
    "name": Param(
        "name",
        "path",
        {"type": "string", "pattern": NAME_PATTERN},
        "a function's or workflow's name (any other is not found)",
    ),
}


@dataclass(frozen=True, slots=True)
class ErrorShape:
    """A route's own error body (OpenAI's, say) in place of the gateway's ``Error``: its
    schema in the document, and how the gateway's body (``{code, error, field}``) with its
    HTTP status becomes it."""

    name: str  # its schema's name under components
    schema: dict[str, Any]
    body: Callable[[dict[str, Any], int], dict[str, Any]]


@dataclass(frozen=True, slots=True)
class RouteDoc:
    method: str
    path: str
    summary: str
    body: type[msgspec.Struct] | None = None
    ok: int = 200
    # A create that finds the same thing there already answers 200 instead of ``ok``.
    exists_ok: bool = False
    public: bool = False  # reachable without an API key (liveness, readiness)
    media: tuple[str, ...] = ()  # a raw (non-JSON) body of these types, e.g. an archive
    params: tuple[Param, ...] = ()
    errors: ErrorShape | None = None  # None: the gateway's ``Error``
    body_required: bool = True  # False: an empty body is taken as ``{}``
    returns: tuple[str, ...] = ()  # a non-JSON success body of these types, e.g. text/html


ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["code", "error"],
    "properties": {
        "code": {"type": "string", "description": "stable error code, e.g. invalid_argument"},
        "error": {"type": "string"},
        "field": {"type": "string", "description": "the request field at fault"},
    },
}


def build_openapi(routes: list[RouteDoc], version: str) -> dict[str, Any]:
    """OpenAPI 3.1 for ``routes``; request bodies come from the msgspec structs."""
    bodies = sorted({r.body for r in routes if r.body is not None}, key=lambda t: t.__name__)
    (schemas_refs, components) = msgspec.json.schema_components(
        bodies, ref_template="#/components/schemas/{name}"
    )
    ref_of = dict(zip(bodies, schemas_refs, strict=True))
    components["Error"] = ERROR_SCHEMA
    for r in routes:
        if r.errors is not None:
            components[r.errors.name] = r.errors.schema
    paths: dict[str, dict[str, Any]] = {}
    for r in routes:
        paths.setdefault(r.path, {})[r.method.lower()] = _operation(r, ref_of)
    return {
        "openapi": "3.1.0",
        "info": {"title": "gpufaas gateway", "version": version},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"apiKey": []}],
    }


def _operation(r: RouteDoc, ref_of: dict[type[msgspec.Struct], Any]) -> dict[str, Any]:
    """One operation: its parameters, body and responses (errors: the Error schema)."""
    responses: dict[str, Any] = {str(r.ok): {"description": "success"}}
    if r.returns:
        text = {"schema": {"type": "string"}}
        responses[str(r.ok)]["content"] = dict.fromkeys(r.returns, text)
    if r.exists_ok:
        responses["200"] = {"description": "the same exists already; nothing changed"}
    responses["default"] = {
        "description": "error",
        "content": {
            "application/json": {
                "schema": {"$ref": f"#/components/schemas/{r.errors.name if r.errors else 'Error'}"}
            }
        },
    }
    op: dict[str, Any] = {
        "summary": r.summary,
        "operationId": f"{r.method.lower()}_{r.path.strip('/').replace('/', '_').replace('{', '').replace('}', '')}",
        "responses": responses,
    }
    if r.public:
        op["security"] = []
    declared = {p.name: p for p in r.params}
    in_path = [seg[1:-1] for seg in r.path.split("/") if seg.startswith("{")]
    params = [
        declared.get(n) or PATH_PARAMS.get(n) or Param(n, "path", {"type": "string"})
        for n in in_path
    ]
    params += [p for p in r.params if p.where != "path"]
    if params:
        op["parameters"] = [_parameter(p) for p in params]
    if r.media:
        binary = {"schema": {"type": "string", "format": "binary"}}
        op["requestBody"] = {"required": True, "content": dict.fromkeys(r.media, binary)}
    if r.body is not None:
        op["requestBody"] = {
            "required": r.body_required,
            "content": {"application/json": {"schema": ref_of[r.body]}},
        }
    return op


def _parameter(p: Param) -> dict[str, Any]:
    out: dict[str, Any] = {"name": p.name, "in": p.where, "required": p.where == "path"}
    if p.description:
        out["description"] = p.description
    out["schema"] = p.schema
    return out


__all__ = ["DeployBody", "ErrorShape", "InferBody", "Param", "RouteDoc", "build_openapi"]
