"""Bad input gets a clear 4xx naming the field, and loses nothing; outages give 503."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from gpufaas.scheduler.service import SchedulerService
from gpufaas.shared import subjects
from gpufaas.shared.config import Config
from gpufaas.shared.errors import Unavailable
from gpufaas.shared.messages import InvokeReply, InvokeRequest
from gpufaas.shared.rpc import request
from gpufaas.worker.service import WorkerService
from tests.conftest import NatsServer
from tests.integration.conftest import DEMO_BODY, Platform, bearer, make_config, text_request

pytestmark = pytest.mark.integration


async def expect(resp: Any, status: int, code: str, field: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = await resp.json()
    assert resp.status == status, body
    assert body["code"] == code, body
    if field is not None:
        assert body.get("field") == field, body
    return body


@pytest.mark.parametrize(
    ("body", "status", "code", "field"),
    [
        (
            {"inputs": [{"name": "text", "datatype": "FP32", "shape": [1], "data": [1.0]}]},
            400,
            "invalid_argument",
            "inputs[0].datatype",
        ),
        (
            {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1, 1], "data": ["a"]}]},
            400,
            "invalid_argument",
            "inputs[0].shape",
        ),
        (
            {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["a"]}]},
            400,
            "invalid_argument",
            "inputs[0].data",
        ),
        (
            {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [3]}]},
            400,
            "invalid_argument",
            "inputs[0].data",
        ),
        (
            {"inputs": [{"name": "txt", "datatype": "BYTES", "shape": [1], "data": ["a"]}]},
            400,
            "invalid_argument",
            "inputs[0].name",
        ),
        ({"inputs": []}, 400, "invalid_argument", "inputs"),
        (
            {"inputs": [{"name": "text", "datatype": "BYTES", "shape": "1", "data": ["a"]}]},
            400,
            "invalid_argument",
            "inputs[0].shape",
        ),
        (
            {"inputs": [{"name": "text", "datatype": "STRING", "shape": [1], "data": ["a"]}]},
            400,
            "invalid_argument",
            "inputs[0].datatype",
        ),
        ({"input": []}, 400, "invalid_argument", None),
        (
            {**text_request(["a"]), "outputs": [{"name": "nope"}]},
            400,
            "invalid_argument",
            "outputs[0].name",
        ),
    ],
)
async def test_bad_infer_bodies(
    platform: Platform, body: dict[str, Any], status: int, code: str, field: str | None
) -> None:
    assert (await platform.client.post("/v1/functions", json=DEMO_BODY)).status == 201
    await expect(
        await platform.client.post("/v2/models/minilm/infer", json=body), status, code, field
    )


async def test_malformed_and_unknown(platform: Platform) -> None:
    c = platform.client
    await expect(
        await c.post("/v2/models/minilm/infer", data=b'{"inputs":'), 400, "invalid_argument", "body"
    )
    await expect(await c.post("/v2/models/minilm/infer", data=b""), 400, "invalid_argument", "body")
    await expect(
        await c.post("/v2/models/nope/infer", json=text_request(["a"])),
        404,
        "not_found",
        "model_name",
    )
    await expect(await c.get("/v2/models/nope"), 404, "not_found")
    await expect(await c.get("/v2/models/nope/ready"), 404, "not_found")
    await expect(await c.delete("/v1/functions/nope"), 404, "not_found", "name")
    await expect(await c.get("/no/such/route"), 404, "not_found")
    await expect(await c.put("/v1/functions"), 405, "method_not_allowed")
    await expect(
        await c.get("/v1/functions", headers={"X-Gpufaas-Tenant": "Bad Tenant"}),
        400,
        "invalid_argument",
        "X-Gpufaas-Tenant",
    )
    await expect(await c.get("/v1/events?kinds=a..b"), 400, "invalid_argument", "kinds")
    await expect(await c.get("/v1/events?replay=sometimes"), 400, "invalid_argument", "replay")
    await expect(
        await c.post("/v2/models/minilm/infer", data=b"{}", headers={"Content-Type": "image/png"}),
        415,
        "unsupported_media_type",
    )


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "Bad Name", "model": {"builtin": "all-minilm-l6-v2"}}, "name"),
        ({"name": "f", "model": {}}, "model"),
        ({"name": "f", "model": {"builtin": "x", "path": "/y"}}, "model"),
        ({"name": "f", "model": {"builtin": "no-such-model"}}, "model.builtin"),
        ({"name": "f", "model": {"path": "relative/dir"}}, "model.path"),
        (
            {"name": "f", "model": {"builtin": "all-minilm-l6-v2", "architecture": "gpt"}},
            "model.architecture",
        ),
        (
            {
                "name": "f",
                "model": {"builtin": "all-minilm-l6-v2"},
                "options": {"max_batch_size": 0},
            },
            "options.max_batch_size",
        ),
        ({"name": "f", "model": {"builtin": "all-minilm-l6-v2"}, "extra": 1}, None),
    ],
)
async def test_bad_deploys_are_400_and_leave_nothing(
    platform: Platform, body: dict[str, Any], field: str | None
) -> None:
    c = platform.client
    await expect(await c.post("/v1/functions", json=body), 400, "invalid_argument", field)
    assert (await (await c.get("/v1/functions")).json())["functions"] == []


async def test_corrupt_model_is_422_and_nothing_is_half_registered(
    platform: Platform, tmp_path: Path
) -> None:
    model_dir = tmp_path / "broken"
    model_dir.mkdir()
    header = b'{"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}'
    (model_dir / "model.safetensors").write_bytes(
        struct.pack("<Q", len(header)) + header + b"\0" * 100
    )
    c = platform.client
    body = await expect(
        await c.post("/v1/functions", json={"name": "broken", "model": {"path": str(model_dir)}}),
        422,
        "model_invalid",
    )
    assert "truncated" in body["error"]
    await expect(
        await c.post(
            "/v1/functions", json={"name": "gone", "model": {"path": str(tmp_path / "none")}}
        ),
        422,
        "model_invalid",
        "model.path",
    )
    assert (await (await c.get("/v1/functions")).json())["functions"] == []
    store_dir = platform.config.shm_dir / "tensors" / platform.config.node_id
    assert [p for p in store_dir.rglob("*") if p.is_file()] == []  # no segment, index or manifest


async def test_conflicting_redeploy_is_409(platform: Platform) -> None:
    c = platform.client
    assert (await c.post("/v1/functions", json=DEMO_BODY)).status == 201
    other = {**DEMO_BODY, "options": {"max_batch_size": 4}}
    await expect(await c.post("/v1/functions", json=other), 409, "already_exists", "name")


async def test_tenants_do_not_see_each_other(platform: Platform) -> None:
    c = platform.client
    a = bearer(await platform.key_for("tenant-a"))
    b = bearer(await platform.key_for("tenant-b"))
    assert (await c.post("/v1/functions", json=DEMO_BODY, headers=a)).status == 201
    await expect(
        await c.post("/v2/models/minilm/infer", json=text_request(["x"]), headers=b),
        404,
        "not_found",
    )
    assert (await (await c.get("/v1/functions", headers=b)).json())["functions"] == []
    assert (
        await c.post("/v2/models/minilm/infer", json=text_request(["x"]), headers=a)
    ).status == 200


@pytest.fixture
def platform_config(nats_server: NatsServer, tmp_path: Path) -> Config:
    return make_config(nats_server, tmp_path, max_body_bytes=4096)


async def test_oversized_body_is_413(platform: Platform) -> None:
    big = text_request(["x" * 10_000])
    await expect(
        await platform.client.post("/v2/models/minilm/infer", json=big),
        413,
        "payload_too_large",
        "body",
    )


async def test_nats_down_is_503_not_a_hang(platform: Platform) -> None:
    c = platform.client
    platform.nats.stop()
    await expect(await c.get("/v1/functions"), 503, "unavailable")
    await expect(
        await c.post("/v2/models/minilm/infer", json=text_request(["a"])), 503, "unavailable"
    )
    assert (await c.get("/v2/health/ready")).status == 503
    assert (await c.get("/v2/health/live")).status == 200
    platform.nats.start()


async def test_no_worker_is_a_typed_unavailable(platform: Platform) -> None:
    assert (await platform.client.post("/v1/functions", json=DEMO_BODY)).status == 201
    await platform.services["worker"].stop()
    sched = platform.services["scheduler"]
    assert isinstance(sched, SchedulerService)
    await sched.reconcile_once(10**10)  # far future: every heartbeat is stale
    with pytest.raises(Unavailable):
        await request(
            sched.nc,
            subjects.SCHED_INVOKE,
            InvokeRequest(function="minilm", request_id="r", inputs=[]),
            InvokeReply,
            timeout=5,
        )


async def test_worker_refuses_to_cold_start_a_deleted_function(platform: Platform) -> None:
    from gpufaas.shared.errors import NotFound  # noqa: PLC0415
    from gpufaas.shared.messages import (  # noqa: PLC0415
        FunctionSpec,
        ModelSource,
        WorkerRunRequest,
    )

    c = platform.client
    assert (await c.post("/v1/functions", json=DEMO_BODY)).status == 201
    assert (await c.delete("/v1/functions/minilm")).status == 200
    # A scheduler routing from a stale copy of the registry sends the old spec:
    stale = WorkerRunRequest(
        spec=FunctionSpec(name="minilm", model=ModelSource(builtin="all-minilm-l6-v2")),
        request_id="stale",
        inputs=[],
    )
    nc = platform.services["scheduler"].nc
    with pytest.raises(NotFound):
        await request(
            nc,
            subjects.worker("node-t", "default", subjects.WORKER_RUN),
            stale,
            InvokeReply,
            timeout=5,
        )
    worker = platform.services["worker"]
    assert isinstance(worker, WorkerService)
    assert worker.instances == {}


async def test_private_weights_are_invisible_to_other_tenants(platform: Platform) -> None:
    c = platform.client
    body = {"name": "mine", "model": {"builtin": "all-minilm-l6-v2", "private": True}}
    a = bearer(await platform.key_for("tenant-a"))
    b = bearer(await platform.key_for("tenant-b"))
    assert (await c.post("/v1/functions", json=body, headers=a)).status == 201
    assert (await c.post("/v1/functions", json=body, headers=b)).status == 201
    # tenant-b's private copy deduplicated nothing against tenant-a's: no bytes saved.
    async with c.get("/v1/events?replay=all&kinds=function.deployed", headers=b) as resp:
        line = b""
        while not line.startswith(b"data: "):
            line = await resp.content.readline()
    deployed = json.loads(line[6:])
    assert deployed["data"]["tenant"] == "tenant-b"  # tenant-a's event is not shown to b
    assert deployed["data"]["bytes_deduplicated"] == 0
    assert deployed["data"]["bytes_stored"] == deployed["data"]["model_bytes"]


async def test_names_with_a_trailing_newline_are_refused_not_a_5xx(platform: Platform) -> None:
    """Python's ``$`` matches before a final newline: "minilm\\n" once passed the name
    checks and reached a KV key or a subject (a 503 or a 500). Now 4xx everywhere."""
    c = platform.client
    assert (await c.post("/v1/functions", json=DEMO_BODY)).status == 201
    for method, path in [
        ("GET", "/v2/models/minilm%0A"),
        ("GET", "/v2/models/minilm%0A/ready"),
        ("GET", "/v1/functions/minilm%0A"),
        ("DELETE", "/v1/functions/minilm%0A"),
        ("GET", "/v1/workflows/minilm%0A"),
        ("DELETE", "/v1/keys/abcdefABCDEF%0A"),
        ("DELETE", f"/v1/models/{'a' * 64}%0A"),
    ]:
        await expect(await c.request(method, path), 404, "not_found")
    resp = await c.post("/v2/models/minilm%0A/infer", json=text_request(["x"]))
    await expect(resp, 404, "not_found")
    bodies = [
        ("/v1/functions", {**DEMO_BODY, "name": "other\n"}, "name"),
        ("/v1/functions", {"name": "up", "model": {"upload": "a" * 64 + "\n"}}, "model.upload"),
        ("/v1/keys", {"tenant": "acme\n"}, "tenant"),
        ("/v1/workflows", {"name": "w\n", "steps": [{"name": "s", "function": "minilm"}]}, "name"),
    ]
    for path, body, field in bodies:
        await expect(await c.post(path, json=body), 400, "invalid_argument", field)
    await expect(await c.get("/v1/events?kinds=function.*%0A"), 400, "invalid_argument", "kinds")
    # Nothing of it was created; the function is still served.
    assert [
        f["spec"]["name"] for f in (await (await c.get("/v1/functions")).json())["functions"]
    ] == ["minilm"]
    assert (await c.post("/v2/models/minilm/infer", json=text_request(["x"]))).status == 200
