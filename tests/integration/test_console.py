"""The web console's files as the gateway serves them: no key needed, strict security
headers, declared in the OpenAPI document, and nothing outside the console's directory
reachable however the path is spelled."""

from __future__ import annotations

import re

import pytest
from aiohttp import ClientSession
from yarl import URL

from gpufaas.gateway import console
from tests.integration.conftest import Platform

pytestmark = pytest.mark.integration

# Spellings of a way out of /console/: each must be a 404 (or the router's own 404).
ESCAPES = [
    "/console/..%2Fconsole.py",
    "/console/%2e%2e%2Fconsole.py",
    "/console/..%2F..%2F..%2Fpyproject.toml",
    "/console/%2E%2E",
    "/console/..",
    "/console/.%2Fapp.js",
    "/console/%2Fetc%2Fpasswd",
    "/console/..%5Cconsole.py",
    "/console/app.js%00.css",
    "/console/app.js/",
    "/console/nothing.js",
    "/console/__init__.py",
]


async def test_the_page_and_its_files_need_no_key_and_carry_strict_headers(
    platform: Platform,
) -> None:
    base = platform.client.make_url("")
    async with ClientSession() as anonymous:  # no Authorization header
        async with anonymous.get(base.with_path("/console")) as resp:
            assert resp.status == 200
            assert resp.content_type == "text/html"
            page = await resp.text()
            headers = resp.headers
        assert headers["X-Content-Type-Options"] == "nosniff"
        csp = headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp
        assert "default-src 'none'" in csp
        assert "unsafe-inline" not in csp
        assert "<script>" not in page  # only <script src=...>: the policy allows no inline
        for name in re.findall(r'(?:src|href)="/console/([^"]+)"', page):
            async with anonymous.get(base.with_path(f"/console/{name}")) as resp:
                assert resp.status == 200, name
                assert resp.headers["Content-Security-Policy"] == csp
        async with anonymous.get(base.with_path("/v1/functions")) as resp:
            assert resp.status == 401  # the data behind the page still needs a key


async def test_a_trailing_slash_serves_the_same_page(platform: Platform) -> None:
    """``/console/`` (as a browser or an operator may type it) is the page, not a 404;
    its links are absolute, so they resolve the same from either address."""
    async with ClientSession() as anonymous:
        base = platform.client.make_url("")
        async with anonymous.get(base.with_path("/console/")) as resp:
            assert resp.status == 200
            assert resp.content_type == "text/html"
            assert resp.headers["Content-Security-Policy"] == console.CSP
            assert await resp.read() == console.ASSETS[console.INDEX].body
    assert 'src="/console/app.js"' in console.ASSETS[console.INDEX].body.decode()


async def test_every_shipped_file_is_served_with_its_type(platform: Platform) -> None:
    assert {"index.html", "app.js", "style.css"} <= console.ASSETS.keys()
    for name, asset in console.ASSETS.items():
        resp = await platform.client.get(f"/console/{name}")
        assert resp.status == 200, name
        assert resp.content_type == asset.content_type
        assert await resp.read() == asset.body


def test_every_module_import_is_a_shipped_file() -> None:
    """A module a script imports is in the package (a missing one would 404 in the page)."""
    for name, asset in console.ASSETS.items():
        if name.endswith(".js"):
            for target in re.findall(r'from "\./([^"]+)"', asset.body.decode()):
                assert target in console.ASSETS, f"{name} imports {target}"


@pytest.mark.parametrize("path", ESCAPES)
async def test_no_path_leaves_the_console_directory(platform: Platform, path: str) -> None:
    url = URL(str(platform.client.make_url("")).rstrip("/") + path, encoded=True)  # as spelled
    async with ClientSession() as session, session.get(url) as resp:
        body = await resp.read()
    assert resp.status == 404, (path, body[:200])
    assert b"import" not in body  # no source file came back
    assert b"[project]" not in body


async def test_the_console_is_in_the_openapi_document(platform: Platform) -> None:
    doc = await (await platform.client.get("/openapi.json")).json()
    page = doc["paths"]["/console"]["get"]
    assert page["security"] == []
    assert "text/html" in page["responses"]["200"]["content"]
    asset = doc["paths"]["/console/{path}"]["get"]
    assert {"text/javascript", "text/css"} <= asset["responses"]["200"]["content"].keys()
