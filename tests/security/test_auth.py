"""API keys at the gateway (issue 15, deliverables 1, 5 and 7): one test per attack.

Before keys, the tenant was whatever ``X-Gpufaas-Tenant`` said: anyone listed, deleted and
invoked anyone's functions, read their events and deployed any server path. Now the
tenant comes from ``Authorization: Bearer <key>``; the header is honoured only for admin
keys (recorded as ``auth.acted_as``); server paths need an admin key and a model root.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gpufaas.gateway.app import _own_reservations
from gpufaas.shared import apikeys
from gpufaas.shared.catalog import DEMO_MODEL, resolve_model_dir
from gpufaas.shared.errors import Unauthenticated
from gpufaas.shared.jetstream import ensure_jetstream
from gpufaas.shared.kv import TypedBuckets
from gpufaas.shared.messages import ModelSource
from tests.conftest import NatsServer
from tests.integration.conftest import DEMO_BODY, Platform, bearer, read_events, text_request
from tests.support import eventually

pytestmark = pytest.mark.integration


async def anonymous(p: Platform, method: str, path: str, **kw: Any) -> tuple[int, Any]:
    """A request without the client's default key (``headers`` as given)."""
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, str(p.client.make_url(path)), **kw) as resp,
    ):
        body = await resp.json() if resp.content_type == "application/json" else None
        return resp.status, body


async def status_of(p: Platform, method: str, path: str, key: str, **kw: Any) -> int:
    async with p.client.request(method, path, headers=bearer(key), **kw) as resp:
        return resp.status


async def test_requests_without_a_valid_key_are_401(platform: Platform) -> None:
    """Missing, malformed, unknown, wrong-secret keys: 401 naming Authorization; the
    probes stay open."""
    p = platform
    assert (await anonymous(p, "GET", "/v2/health/live"))[0] == 200
    assert (await anonymous(p, "GET", "/v2/health/ready"))[0] == 200
    good = await p.key_for("alice")
    key_id = good[4:16]
    wrong_secret = f"gpf_{key_id}_{'A' * 43}"
    unknown_id = f"gpf_{'Z' * 12}_{good[17:]}"
    for headers in (
        {},
        {"Authorization": good},  # no scheme
        {"Authorization": "Basic dXNlcjpwdw=="},
        {"Authorization": "Bearer "},
        {"Authorization": "Bearer not-a-key"},
        {"Authorization": f"Bearer {wrong_secret}"},
        {"Authorization": f"Bearer {unknown_id}"},
        {"X-Gpufaas-Tenant": "alice"},  # the old way in
    ):
        for method, path in (("GET", "/v1/functions"), ("DELETE", "/v1/functions/minilm")):
            status, body = await anonymous(p, method, path, headers=headers)
            assert (status, body["code"], body["field"]) == (
                401,
                "unauthenticated",
                "Authorization",
            ), headers
    status, _ = await anonymous(p, "GET", "/v1/events?replay=all")
    assert status == 401


async def test_a_revoked_key_is_refused_within_a_second(platform: Platform) -> None:
    """Revoked in KV (another gateway, or an operator): the watch carries it here."""
    p = platform
    key = await p.key_for("alice")
    assert await status_of(p, "GET", "/v1/functions", key) == 200
    t0 = time.monotonic()
    await apikeys.revoke(p.services["scheduler"].kv.keys, key[4:16])

    async def refused() -> bool:
        return await status_of(p, "GET", "/v1/functions", key) == 401

    await eventually(refused, timeout=5)
    assert time.monotonic() - t0 < 1.0


async def test_revoking_through_the_api_takes_effect_at_once(platform: Platform) -> None:
    p = platform
    made = await (await p.client.post("/v1/keys", json={"tenant": "carol"})).json()
    assert await status_of(p, "GET", "/v1/functions", made["key"]) == 200
    resp = await p.client.delete(f"/v1/keys/{made['id']}")
    assert resp.status == 200, await resp.text()
    assert await status_of(p, "GET", "/v1/functions", made["key"]) == 401
    assert (await p.client.delete("/v1/keys/AAAAAAAAAAAA")).status == 404


async def test_an_expired_key_is_401(platform: Platform) -> None:
    p = platform
    made = await (
        await p.client.post("/v1/keys", json={"tenant": "dave", "expires_in_s": 0.5})
    ).json()
    assert made["expires_at"] is not None
    assert await status_of(p, "GET", "/v1/functions", made["key"]) == 200

    async def expired() -> bool:
        return await status_of(p, "GET", "/v1/functions", made["key"]) == 401

    await eventually(expired, timeout=5)


async def test_a_tenant_key_cannot_act_as_another_tenant(platform: Platform) -> None:
    """The spoofed header: 403 naming it, and nothing done as the victim."""
    p = platform
    assert (await p.client.post("/v1/functions", json=DEMO_BODY)).status == 201  # default's
    mallory = bearer(await p.key_for("mallory"))
    spoof = {**mallory, "X-Gpufaas-Tenant": "default"}
    for method, path in (
        ("GET", "/v1/functions"),
        ("GET", "/v1/functions/minilm"),
        ("DELETE", "/v1/functions/minilm"),
        ("GET", "/v1/events?replay=all"),
    ):
        async with p.client.request(method, path, headers=spoof) as resp:
            body = await resp.json()
            assert (resp.status, body["code"], body["field"]) == (
                403,
                "permission_denied",
                "X-Gpufaas-Tenant",
            )
    own = {**mallory, "X-Gpufaas-Tenant": "mallory"}  # naming itself is harmless
    assert (await p.client.get("/v1/functions", headers=own)).status == 200
    assert (await p.client.get("/v1/functions/minilm")).status == 200  # still there


async def test_another_tenants_function_is_404_never_403(platform: Platform) -> None:
    p = platform
    alice, bob = bearer(await p.key_for("alice")), bearer(await p.key_for("bob"))
    assert (await p.client.post("/v1/functions", json=DEMO_BODY, headers=alice)).status == 201
    for method, path, body in (
        ("GET", "/v1/functions/minilm", None),
        ("DELETE", "/v1/functions/minilm", None),
        ("GET", "/v2/models/minilm", None),
        ("GET", "/v2/models/minilm/ready", None),
        ("POST", "/v2/models/minilm/infer", text_request(["x"])),
    ):
        async with p.client.request(method, path, headers=bob, json=body) as resp:
            assert (resp.status, (await resp.json())["code"]) == (404, "not_found"), path
    listed = await (await p.client.get("/v1/functions", headers=bob)).json()
    assert listed["functions"] == []
    assert (await p.client.get("/v1/functions/minilm", headers=alice)).status == 200


async def test_an_admin_acts_as_a_tenant_and_it_is_recorded(platform: Platform) -> None:
    p = platform
    acting = {"X-Gpufaas-Tenant": "erin"}  # the client's default key is an admin key
    assert (await p.client.post("/v1/functions", json=DEMO_BODY, headers=acting)).status == 201
    erin = bearer(await p.key_for("erin"))
    record = await (await p.client.get("/v1/functions/minilm", headers=erin)).json()
    assert record["spec"]["tenant"] == "erin"

    async def recorded() -> list[dict[str, Any]]:
        return await read_events(p, "auth.acted_as")

    events = await eventually(recorded, timeout=5)
    assert events[0]["data"] == {
        "tenant": "erin",
        "key_id": p.api_key[4:16],
        "method": "POST",
        "path": "/v1/functions",
    }


async def test_key_management_is_admin_only_and_never_shows_a_secret(platform: Platform) -> None:
    p = platform
    tenant_key = await p.key_for("frank")
    made = await p.client.post("/v1/keys", json={"tenant": "frank", "label": "ci"})
    assert made.status == 201
    body = await made.json()
    assert body["key"].startswith(f"gpf_{body['id']}_")
    listed = await (await p.client.get("/v1/keys?tenant=frank")).json()
    assert {k["id"] for k in listed["keys"]} >= {body["id"], tenant_key[4:16]}
    text = json.dumps(listed)
    assert "hash" not in text
    assert body["key"][17:] not in text
    for method, path, payload in (
        ("POST", "/v1/keys", {"tenant": "frank", "admin": True}),
        ("GET", "/v1/keys", None),
        ("DELETE", f"/v1/keys/{body['id']}", None),
        ("GET", "/metrics", None),
    ):
        assert await status_of(p, method, path, tenant_key, json=payload) == 403, path
    bad = await p.client.post("/v1/keys", json={"tenant": "Not A Name"})
    assert (bad.status, (await bad.json())["field"]) == (400, "tenant")
    assert (await p.client.get("/metrics")).status == 200  # an admin key may scrape


def _model_copy(into: Path) -> tuple[Path, str]:
    """A copy of the demo model's directory, and its resolved path."""
    shutil.copytree(resolve_model_dir(ModelSource(builtin=DEMO_MODEL)), into)
    return into, os.path.realpath(into)


async def test_server_paths_need_an_admin_key_and_a_model_root(
    platform: Platform, tmp_path: Path
) -> None:
    p = platform
    inside, resolved = _model_copy(tmp_path / "model")
    outside = Path("/etc")
    escape = tmp_path / "escape"
    escape.symlink_to(outside)  # under a root by name, outside once resolved
    tenant = bearer(await p.key_for("grace"))

    async def deploy(path: Path, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        body = {"name": "m", "model": {"path": str(path)}}
        async with p.client.post("/v1/functions", json=body, headers=headers) as resp:
            return resp.status, await resp.json()

    # A tenant's key: the same answer whether the directory exists or not (no probe).
    refusals = [await deploy(path, tenant) for path in (inside, tmp_path / "none", outside)]
    assert len({json.dumps(r) for r in refusals}) == 1
    status, body = refusals[0]
    assert (status, body["code"], body["field"]) == (403, "permission_denied", "model.path")
    # An admin key: only under GPUFAAS_MODEL_ROOTS (here the tests' temporary directories).
    for path in (outside, escape):
        status, body = await deploy(path)
        assert (status, body["code"], body["field"]) == (403, "permission_denied", "model.path")
    status, body = await deploy(inside)
    assert status == 201, body
    assert body["spec"]["model"]["path"] == resolved
    # Builtin models stay open to every tenant.
    assert (await p.client.post("/v1/functions", json=DEMO_BODY, headers=tenant)).status == 201


async def test_events_are_scoped_to_the_callers_tenant(platform: Platform) -> None:
    p = platform
    alice, bob = bearer(await p.key_for("alice")), bearer(await p.key_for("bob"))
    for who in (alice, bob):
        assert (await p.client.post("/v1/functions", json=DEMO_BODY, headers=who)).status == 201

    async def deployed(headers: dict[str, str] | None, count: int) -> list[str]:
        tenants: list[str] = []
        async with p.client.get(
            "/v1/events?replay=all&kinds=function.deployed", headers=headers
        ) as resp:
            while len(tenants) < count:
                line = await asyncio.wait_for(resp.content.readline(), 10)
                if line.startswith(b"data: "):
                    tenants.append(json.loads(line[6:])["data"]["tenant"])
        return tenants

    assert await deployed(bob, 1) == ["bob"]  # alice's event, first in the stream, is skipped
    assert sorted(await deployed(None, 2)) == ["alice", "bob"]  # an admin sees both


async def test_nodes_show_a_tenant_only_its_own_reservations(platform: Platform) -> None:
    memory = {"pools": {}, "reserved": {"gpu:0 alice.f": 10, "gpu:1 bob.g": 20, "gpu:0 al.x": 5}}
    assert _own_reservations(memory, "alice") == {"pools": {}, "reserved": {"gpu:0 alice.f": 10}}
    assert _own_reservations(None, "alice") is None
    p = platform
    nodes = await (await p.client.get("/v1/nodes", headers=bearer(await p.key_for("bob")))).json()
    for node in nodes["nodes"]:
        memory_of = node["memory"] or {"reserved": {}}
        assert all(k.split(" ", 1)[1].startswith("bob.") for k in memory_of["reserved"])


async def test_with_auth_off_the_header_is_trusted(platform_factory: Any) -> None:
    """``GPUFAAS_AUTH=0`` (``gpufaas up --no-auth``): as before keys, for experiments."""
    p = await platform_factory(auth=False)
    status, body = await anonymous(p, "GET", "/v1/functions", headers={"X-Gpufaas-Tenant": "x"})
    assert (status, body) == (200, {"functions": []})


async def test_the_admin_key_file_is_private_reused_and_replaced_when_exposed(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    import nats  # noqa: PLC0415

    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        keys = TypedBuckets(js, await ensure_jetstream(js, node_ttl_s=5, tube_ttl_s=5)).keys
        path = tmp_path / "data" / apikeys.ADMIN_KEY_FILE
        token, created = await apikeys.ensure_admin_key(keys, path)
        assert created
        assert path.stat().st_mode & 0o777 == 0o600
        stored = await keys.value(token[4:16])
        assert stored is not None
        assert stored.admin
        assert token[17:] not in json.dumps(stored.public()) + stored.hash
        assert await apikeys.ensure_admin_key(keys, path) == (token, False)
        path.chmod(0o644)  # readable by others: treated as leaked
        again, created = await apikeys.ensure_admin_key(keys, path)
        assert created
        assert again != token
        assert path.stat().st_mode & 0o777 == 0o600
        with pytest.raises(Unauthenticated):
            await apikeys.verify(keys, token)
    finally:
        await nc.close()
