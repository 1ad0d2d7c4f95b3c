"""The OpenAPI document, built from the same route table that registers the routes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from gpufaas.gateway.bodies import DeployBody, InferBody


@dataclass(frozen=True, slots=True)
class RouteDoc:
    method: str
    path: str
    summary: str
    body: type[msgspec.Struct] | None = None
    ok: int = 200
    public: bool = False  # reachable without an API key (liveness, readiness)
    media: tuple[str, ...] = ()  # a raw (non-JSON) body of these types, e.g. an archive


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
    paths: dict[str, dict[str, Any]] = {}
    for r in routes:
        op: dict[str, Any] = {
            "summary": r.summary,
            "operationId": f"{r.method.lower()}_{r.path.strip('/').replace('/', '_').replace('{', '').replace('}', '')}",
            "responses": {
                str(r.ok): {"description": "success"},
                "default": {
                    "description": "error",
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}
                    },
                },
            },
        }
        if r.public:
            op["security"] = []
        params = [seg[1:-1] for seg in r.path.split("/") if seg.startswith("{")]
        if params:
            op["parameters"] = [
                {"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
                for p in params
            ]
        if r.media:
            binary = {"schema": {"type": "string", "format": "binary"}}
            op["requestBody"] = {"required": True, "content": dict.fromkeys(r.media, binary)}
        if r.body is not None:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": ref_of[r.body]}},
            }
        paths.setdefault(r.path, {})[r.method.lower()] = op
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


__all__ = ["DeployBody", "InferBody", "RouteDoc", "build_openapi"]
