"""The web console: one HTML page, its ES modules and style sheet, served at ``/console``.

The files hold no data, so they need no key; the page asks the operator for an API key
and reads the platform through the same APIs as any client (an admin key sees every
tenant, a tenant's key its own functions and events). No build step and no library: the
modules are plain JavaScript the browser loads as shipped (package data,
``gpufaas.gateway.console_static``), the pages plain DOM and hand-drawn SVG; a framework
would need a build or a vendored copy to keep up to date, for little at this size. The
files are read once, when this module is imported, into a table by name;
``/console/{path}`` serves only names in that table, so no path (``..``, an encoded
slash) reaches a file outside the directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

from aiohttp import web

from gpufaas.gateway.auth import Handler
from gpufaas.gateway.openapi import Param, RouteDoc
from gpufaas.shared.errors import NotFound

STATIC_DIR: Final = Path(__file__).parent / "console_static"
INDEX: Final = "index.html"
# What the console ships, by suffix; anything else in the directory is not served.
TYPES: Final = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
}
# Scripts and styles from the console's own files only (no inline script, no eval); data
# only from this gateway; the page never framed (clickjacking a signed-in operator).
CSP: Final = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
HEADERS: Final = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidated: an upgraded gateway serves its own files
}


@dataclass(frozen=True, slots=True)
class Asset:
    """One shipped file: its bytes and media type."""

    body: bytes
    content_type: str


def load_assets(root: Path = STATIC_DIR) -> dict[str, Asset]:
    """Every file of a known type directly in ``root``, by name."""
    return {
        p.name: Asset(p.read_bytes(), TYPES[p.suffix])
        for p in sorted(root.iterdir())
        if p.is_file() and p.suffix in TYPES
    }


ASSETS: Final = load_assets()


def serve(name: str, assets: dict[str, Asset] = ASSETS) -> web.Response:
    """The file ``name`` with the console's security headers; 404 naming ``path`` if the
    console has no such file."""
    found = assets.get(name)
    if found is None:
        raise NotFound(f"the console has no file {name!r}", field="path")
    return web.Response(
        body=found.body, content_type=found.content_type, charset="utf-8", headers=HEADERS
    )


async def index(_: web.Request) -> web.Response:
    return serve(INDEX)


async def asset(request: web.Request) -> web.Response:
    return serve(request.match_info["path"])


ROUTES: list[tuple[RouteDoc, Handler]] = [
    (
        RouteDoc(
            "GET",
            "/console",
            "The web console (no key: it asks for one)",
            public=True,
            returns=("text/html",),
        ),
        index,
    ),
    (
        RouteDoc(
            "GET",
            "/console/",
            "The web console, also with a trailing slash (the same page)",
            public=True,
            returns=("text/html",),
        ),
        index,
    ),
    (
        RouteDoc(
            "GET",
            "/console/{path}",
            "A file of the web console (its scripts, style sheet, icon)",
            public=True,
            returns=tuple(sorted(set(TYPES.values()))),
            params=(Param("path", "path", {"type": "string"}, "a file name, e.g. app.js"),),
        ),
        asset,
    ),
]
