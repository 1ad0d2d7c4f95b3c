"""The Open Inference Protocol over HTTP with the official ``tritonclient[http]``: binary
tensors (its default) and JSON, FP16, BF16, BOOL and BYTES, errors, and the system
shared-memory extension; then the malformed binary and shared-memory requests it never
sends, at the gateway.

tritonclient is synchronous (gevent): each test's client calls run in a thread of their
own against the in-process gateway's real port, while the platform serves on the loop.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import gzip
import json
import os
import secrets
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import ml_dtypes
import numpy as np
import pytest
import torch
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from aiohttp.test_utils import TestClient
from tritonclient.utils import (
    InferenceServerException,
    serialize_byte_tensor,
    serialized_byte_size,
)

from gpufaas.gateway import sysshm
from tests.integration.conftest import DEMO_BODY, Platform, bearer, text_request

pytestmark = pytest.mark.integration

T = TypeVar("T")
HEADER = "Inference-Header-Content-Length"


class Mixed(torch.nn.Module):
    """FP16, BOOL and BF16 in and out: ``y = x * scale``, ``not_m = ~m``, ``c = b * 2``."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(2.0, dtype=torch.float16))

    def forward(self, x: torch.Tensor, m: torch.Tensor, b: torch.Tensor) -> dict[str, Any]:
        return {"y": x * self.scale, "not_m": torch.logical_not(m), "c": b * 2}


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mixed")
    batch = torch.export.Dim("batch", min=1, max=1024)
    args = (
        torch.ones(3, 4, dtype=torch.float16),
        torch.ones(3, 4, dtype=torch.bool),
        torch.ones(3, 4, dtype=torch.bfloat16),
    )
    ep = torch.export.export(Mixed(), args, dynamic_shapes=({0: batch}, {0: batch}, {0: batch}))
    torch.export.save(ep, out / "model.pt2")
    return out


@pytest.fixture
def regions() -> Iterator[list[Any]]:
    """Shared-memory regions the test makes (destroyed after it)."""
    made: list[Any] = []
    yield made
    for handle in made:
        shm.destroy_shared_memory_region(handle)


async def deploy_mixed(p: Platform, model_dir: Path) -> None:
    body = {"name": "mixed", "model": {"path": str(model_dir), "architecture": "torch-export"}}
    resp = await p.client.post("/v1/functions", json=body)
    assert resp.status == 201, await resp.text()


async def in_thread(p: Platform, work: Callable[[httpclient.InferenceServerClient], T]) -> T:
    """``work(client)`` with a tritonclient of the test gateway, run in a thread."""
    url = p.client.make_url("")
    target = f"{url.host}:{url.port}"

    def run() -> T:
        client = httpclient.InferenceServerClient(target, network_timeout=60.0)
        try:
            return work(client)
        finally:
            client.close()

    return await asyncio.to_thread(run)


def mixed_inputs(binary: bool) -> tuple[list[httpclient.InferInput], dict[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    arrays = {
        "x": rng.standard_normal((2, 4)).astype(np.float16),
        "m": rng.random((2, 4)) > 0.5,
        "b": rng.standard_normal((2, 4)).astype(ml_dtypes.bfloat16),
    }
    kinds = {"x": "FP16", "m": "BOOL", "b": "BF16"}
    inputs = []
    for name, arr in arrays.items():
        inp = httpclient.InferInput(name, list(arr.shape), kinds[name])
        inp.set_data_from_numpy(arr, binary_data=binary or name == "b")  # BF16: binary only
        inputs.append(inp)
    return inputs, arrays


async def test_tritonclient_binary_and_json_minilm_and_errors(
    platform: Platform, regions: list[Any]
) -> None:
    p = platform
    assert (await p.client.post("/v1/functions", json=DEMO_BODY)).status == 201
    texts = np.array([b"binary tensors", "ünïcode bytes".encode(), b""], dtype=np.object_)
    auth = functools.partial(bearer, p.api_key)  # a new dict a call: the client adds to it

    def work(client: httpclient.InferenceServerClient) -> dict[Any, Any]:
        out: dict[Any, Any] = {"meta": client.get_server_metadata(headers=auth())}
        for binary in (True, False):
            text = httpclient.InferInput("text", [3], "BYTES")
            text.set_data_from_numpy(texts, binary_data=binary)
            outputs = None if binary else [httpclient.InferRequestedOutput("embedding", False)]
            res = client.infer("minilm", [text], outputs=outputs, headers=auth())
            out[binary] = (res.as_numpy("embedding"), res.get_output("embedding"))
        # Compressed requests, as the client sends them.
        for algorithm in ("gzip", "deflate"):
            text = httpclient.InferInput("text", [3], "BYTES")
            text.set_data_from_numpy(texts)
            res = client.infer(
                "minilm", [text], headers=auth(), request_compression_algorithm=algorithm
            )
            out[algorithm] = res.as_numpy("embedding")
        # BYTES from shared memory, as README shows it.
        serialized = serialize_byte_tensor(texts)
        key = f"/gpufaas_test_texts_{secrets.token_hex(4)}"
        region = shm.create_shared_memory_region("texts", key, 1024)
        regions.append(region)
        shm.set_shared_memory_region(region, [serialized])
        client.register_system_shared_memory("texts", key, 1024, headers=auth())
        text = httpclient.InferInput("text", [3], "BYTES")
        text.set_shared_memory("texts", serialized_byte_size(serialized))
        out["shm"] = client.infer("minilm", [text], headers=auth()).as_numpy("embedding")
        for name, inputs in (("nosuch", [text]), ("minilm", [])):
            try:
                client.infer(name, inputs, headers=auth())
            except InferenceServerException as exc:
                out[name] = (exc.status(), exc.message())
        return out

    got = await in_thread(p, work)
    assert {"binary_tensor_data", "system_shared_memory"} <= set(got["meta"]["extensions"])
    emb, head = got[True]
    assert (emb.shape, emb.dtype) == ((3, 384), np.float32)
    assert head["parameters"] == {"binary_data_size": 3 * 384 * 4}
    json_emb, json_head = got[False]
    assert "parameters" not in json_head
    assert len(json_head["data"]) == 3 * 384
    np.testing.assert_allclose(emb, json_emb, atol=1e-6)
    np.testing.assert_allclose(got["gzip"], emb, atol=1e-6)
    np.testing.assert_allclose(got["deflate"], emb, atol=1e-6)
    np.testing.assert_allclose(got["shm"], emb, atol=1e-6)
    assert got["nosuch"][0] == "404"
    assert "nosuch" in got["nosuch"][1]
    assert got["minilm"][0] == "400"
    assert "missing input 'text'" in got["minilm"][1]


async def test_tritonclient_fp16_bool_bf16_round_trips(platform: Platform, mixed_dir: Path) -> None:
    p = platform
    await deploy_mixed(p, mixed_dir)
    auth = functools.partial(bearer, p.api_key)  # a new dict a call: the client adds to it

    def work(client: httpclient.InferenceServerClient) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        for binary in (True, False):
            inputs, arrays = mixed_inputs(binary)
            wanted = [
                httpclient.InferRequestedOutput(n, binary or n == "c") for n in ("y", "not_m", "c")
            ]
            res = client.infer("mixed", inputs, outputs=wanted, headers=auth())
            out[binary] = (arrays, {n: res.as_numpy(n) for n in ("y", "not_m", "c")})
        return out

    for binary, (arrays, outs) in (await in_thread(p, work)).items():
        assert outs["y"].dtype == np.float16, binary
        np.testing.assert_array_equal(outs["y"], arrays["x"] * np.float16(2))
        np.testing.assert_array_equal(outs["not_m"], ~arrays["m"])
        assert outs["c"].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(outs["c"], arrays["b"] * ml_dtypes.bfloat16(2))


async def test_tritonclient_system_shared_memory(
    platform: Platform, mixed_dir: Path, regions: list[Any]
) -> None:
    p = platform
    await deploy_mixed(p, mixed_dir)
    auth = functools.partial(bearer, p.api_key)  # a new dict a call: the client adds to it
    tag = secrets.token_hex(4)
    inputs, arrays = mixed_inputs(True)
    x = arrays["x"]
    in_key, out_key = f"/gpufaas_test_in_{tag}", f"/gpufaas_test_out_{tag}"
    in_region = shm.create_shared_memory_region("in", in_key, 64)
    out_region = shm.create_shared_memory_region("out", out_key, 64)
    regions += [in_region, out_region]
    shm.set_shared_memory_region(in_region, [x], offset=8)

    def work(client: httpclient.InferenceServerClient) -> dict[str, Any]:
        client.register_system_shared_memory("in", in_key, 48, offset=0, headers=auth())
        client.register_system_shared_memory("out", out_key, 64, headers=auth())
        inputs[0].set_shared_memory("in", x.nbytes, offset=8)
        y = httpclient.InferRequestedOutput("y")
        y.set_shared_memory("out", 32, offset=16)
        res = client.infer("mixed", inputs, outputs=[y], headers=auth())
        out = {"head": res.get_output("y")}
        out["status"] = client.get_system_shared_memory_status(headers=auth())
        out["one"] = client.get_system_shared_memory_status("in", headers=auth())
        client.unregister_system_shared_memory("in", headers=auth())
        out["after"] = client.get_system_shared_memory_status(headers=auth())
        client.unregister_system_shared_memory(headers=auth())
        out["none_left"] = client.get_system_shared_memory_status(headers=auth())
        return out

    got = await in_thread(p, work)
    assert got["head"]["parameters"]["shared_memory_byte_size"] == x.nbytes
    assert "data" not in got["head"]
    y = shm.get_contents_as_numpy(out_region, np.float16, [2, 4], offset=16)
    np.testing.assert_array_equal(y, x * np.float16(2))
    assert got["status"] == [
        {"name": "in", "key": in_key, "offset": 0, "byte_size": 48},
        {"name": "out", "key": out_key, "offset": 0, "byte_size": 64},
    ]
    assert got["one"] == got["status"][:1]
    assert [r["name"] for r in got["after"]] == ["out"]
    assert got["none_left"] == []


async def test_shared_memory_regions_are_the_tenants_own_and_checked(
    platform: Platform, mixed_dir: Path, regions: list[Any]
) -> None:
    p = platform
    c = p.client
    await deploy_mixed(p, mixed_dir)
    key = f"gpufaas_test_{secrets.token_hex(4)}"
    regions.append(shm.create_shared_memory_region("r", key, 64))
    base = "/v2/systemsharedmemory"

    async def refused(path: str, body: Any, status: int, field: str, **kw: Any) -> None:
        resp = await c.post(path, json=body, **kw)
        got = await resp.json()
        assert (resp.status, got.get("field")) == (status, field), got

    reg = f"{base}/region/r/register"
    await refused(reg, {"key": "a/b", "byte_size": 8}, 400, "key")
    await refused(reg, {"key": "..", "byte_size": 8}, 400, "key")
    await refused(reg, {"key": f"nosuch_{key}", "byte_size": 8}, 404, "key")
    await refused(reg, {"key": key, "byte_size": 60, "offset": 8}, 400, "byte_size")
    await refused(reg, {"key": key, "byte_size": 0}, 400, "byte_size")
    await refused(f"{base}/region/a%20b/register", {"key": key, "byte_size": 8}, 400, "name")
    assert (await c.post(reg, json={"key": key, "byte_size": 64})).status == 200
    await refused(reg, {"key": key, "byte_size": 64}, 409, "name")

    # Another tenant sees none of it, and cannot infer from it (with a mixed of its own).
    other = bearer(await p.key_for("other", admin=True))
    body = {"name": "mixed", "model": {"path": str(mixed_dir), "architecture": "torch-export"}}
    assert (await c.post("/v1/functions", json=body, headers=other)).status == 201
    assert await (await c.get(f"{base}/status", headers=other)).json() == []
    resp = await c.get(f"{base}/region/r/status", headers=other)
    assert resp.status == 404
    assert (await c.post(f"{base}/region/r/unregister", headers=other)).status == 200
    assert len(await (await c.get(f"{base}/status")).json()) == 1

    def x_in(params: dict[str, Any]) -> dict[str, Any]:
        rest = json.loads(json.dumps(MIXED_JSON["inputs"][1:]))
        return {
            "inputs": [
                {"name": "x", "datatype": "FP16", "shape": [1, 4], "parameters": params},
                *rest,
            ]
        }

    infer = "/v2/models/mixed/infer"
    p0 = "inputs[0].parameters"
    ok = {"shared_memory_region": "r", "shared_memory_byte_size": 8}
    await refused(infer, x_in(ok), 404, f"{p0}.shared_memory_region", headers=other)
    await refused(
        infer, x_in({**ok, "shared_memory_byte_size": 6}), 400, f"{p0}.shared_memory_byte_size"
    )
    await refused(
        infer, x_in({**ok, "shared_memory_offset": 60}), 400, f"{p0}.shared_memory_byte_size"
    )
    await refused(infer, x_in({"shared_memory_byte_size": 8}), 400, f"{p0}.shared_memory_region")
    await refused(
        infer, x_in({**ok, "shared_memory_offset": -1}), 400, f"{p0}.shared_memory_offset"
    )
    small = {"name": "y", "parameters": {"shared_memory_region": "r", "shared_memory_byte_size": 4}}
    await refused(
        infer,
        {**x_in(ok), "outputs": [small]},
        400,
        "outputs[0].parameters.shared_memory_byte_size",
    )
    resp = await c.post(infer, json=x_in(ok))
    assert resp.status == 200, await resp.text()
    # The client shrinks its file: a 400, never a fault in the gateway.
    os.truncate(Path("/dev/shm") / key, 4)
    await refused(infer, x_in(ok), 400, f"{p0}.shared_memory_region")
    # CUDA shared memory is not served here: a 400 that says so.
    resp = await c.get("/v2/cudasharedmemory/status")
    assert resp.status == 400
    assert "not supported" in (await resp.json())["error"]


MIXED_JSON: dict[str, Any] = {
    "inputs": [
        {"name": "x", "datatype": "FP16", "shape": [1, 4], "data": [1, 2, 3, 4]},
        {"name": "m", "datatype": "BOOL", "shape": [1, 4], "data": [True, False, True, False]},
        {"name": "b", "datatype": "BF16", "shape": [1, 4], "data": [0.5, 1, 1.5, 2]},
    ]
}


def binary_request(
    head: dict[str, Any], *parts: bytes, header: str | None = None
) -> tuple[bytes, dict[str, str]]:
    raw = json.dumps(head).encode()
    return raw + b"".join(parts), {HEADER: header if header is not None else str(len(raw))}


def binary_x() -> tuple[bytes, dict[str, Any]]:
    """``x`` as binary data, and MIXED_JSON's request with ``x`` taken from it."""
    x = np.array([[1, 2, 3, 4]], dtype=np.float16).tobytes()
    head = json.loads(json.dumps(MIXED_JSON))
    del head["inputs"][0]["data"]
    head["inputs"][0]["parameters"] = {"binary_data_size": len(x)}
    return x, head


async def post_infer(
    c: TestClient[Any, Any], body: bytes, headers: dict[str, str]
) -> tuple[int, dict[str, Any], bytes]:
    """Status, JSON (the header of a binary reply) and binary part of a mixed inference."""
    resp = await c.post("/v2/models/mixed/infer", data=body, headers=headers)
    raw = await resp.read()
    size = int(resp.headers.get(HEADER, len(raw)))
    return resp.status, json.loads(raw[:size]), raw[size:]


async def test_binary_and_json_mixed_and_compressed_at_the_gateway(
    platform: Platform, mixed_dir: Path
) -> None:
    c = platform.client
    await deploy_mixed(platform, mixed_dir)
    x, head = binary_x()
    # Mixed JSON and binary inputs; all outputs binary, one asked for as JSON.
    ask = {"binary_data_output": True}
    outs = [{"name": "not_m", "parameters": {"binary_data": False}}, {"name": "y"}]
    body, hdr = binary_request({**head, "parameters": ask, "outputs": outs}, x)
    status, reply, tail = await post_infer(c, body, hdr)
    assert status == 200, reply
    by_name = {o["name"]: o for o in reply["outputs"]}
    assert by_name["not_m"]["data"] == [False, True, False, True]
    assert "parameters" not in by_name["not_m"]
    assert by_name["y"]["parameters"] == {"binary_data_size": 8}
    assert np.frombuffer(tail, np.float16).tolist() == [2, 4, 6, 8]
    # JSON in, BF16 out as JSON: its float values.
    status, reply, _ = await post_infer(c, json.dumps(MIXED_JSON).encode(), {})
    assert status == 200
    assert {o["name"]: o["data"] for o in reply["outputs"]}["c"] == [1, 2, 3, 4]

    # Compressed bodies: the header counts the inflated bytes; a corrupt one is a 400.
    body, hdr = binary_request(head, x)
    for encoding, packed in (("gzip", gzip.compress(body)), ("deflate", zlib.compress(body))):
        status, _, _ = await post_infer(c, packed, {**hdr, "Content-Encoding": encoding})
        assert status == 200, encoding
    status, err, _ = await post_infer(c, b"\x1f\x8b garbage", {**hdr, "Content-Encoding": "gzip"})
    assert (status, err["field"]) == (400, "body")
    status, err, _ = await post_infer(c, body, {**hdr, "Content-Encoding": "compress"})
    assert (status, err["field"]) == (415, "Content-Encoding")


async def test_malformed_binary_requests_are_refused_naming_the_field(
    platform: Platform, mixed_dir: Path
) -> None:
    c = platform.client
    await deploy_mixed(platform, mixed_dir)
    x, head = binary_x()

    async def refused(body: bytes, headers: dict[str, str], field: str) -> None:
        status, err, _ = await post_infer(c, body, headers)
        assert (status, err.get("field")) == (400, field), err

    def edited(edit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(json.dumps(head))
        edit(out)
        return out

    p0 = "inputs[0].parameters.binary_data_size"
    await refused(*binary_request(head, x, header="abc"), HEADER)
    await refused(*binary_request(head, x, header="0"), HEADER)
    await refused(*binary_request(head, x, header="100000"), HEADER)
    await refused(*binary_request(head, x, b"extra"), HEADER)
    await refused(*binary_request(head, x[:4]), p0)
    body, hdr = binary_request(head, x)
    await refused(body, {HEADER: str(int(hdr[HEADER]) - 1)}, HEADER)  # JSON cut short
    await refused(json.dumps(head).encode(), {}, p0)  # binary_data_size without the header

    def six(h: dict[str, Any]) -> None:
        h["inputs"][0]["parameters"]["binary_data_size"] = 6

    await refused(*binary_request(edited(six), x[:6]), p0)  # not FP16 [1, 4]

    def both(h: dict[str, Any]) -> None:
        h["inputs"][0]["data"] = [1, 2, 3, 4]

    await refused(*binary_request(edited(both), x), "inputs[0].data")

    def negative(h: dict[str, Any]) -> None:
        h["inputs"][0]["parameters"]["binary_data_size"] = -8

    await refused(*binary_request(edited(negative), x), p0)
    bad_flag = {**head, "parameters": {"binary_data_output": "yes"}}
    await refused(*binary_request(bad_flag, x), "parameters.binary_data_output")
    classify = {**head, "outputs": [{"name": "y", "parameters": {"classification": 3}}]}
    await refused(*binary_request(classify, x), "outputs[0].parameters.classification")


async def test_bytes_inputs_in_binary_are_checked(platform: Platform) -> None:
    c = platform.client
    assert (await c.post("/v1/functions", json=DEMO_BODY)).status == 201
    items = [b"hello", b"world!"]
    good = b"".join(struct.pack("<I", len(b)) + b for b in items)
    head = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "parameters": {}}]}
    field = "inputs[0].parameters.binary_data_size"
    for raw, ok in ((good, True), (good[:-1], False), (good + b"\0\0", False), (good[:9], False)):
        head["inputs"][0]["parameters"] = {"binary_data_size": len(raw)}
        body, hdr = binary_request(head, raw)
        resp = await c.post("/v2/models/minilm/infer", data=body, headers=hdr)
        if ok:
            assert resp.status == 200, await resp.text()
            ref = await c.post("/v2/models/minilm/infer", json=text_request(["hello", "world!"]))
            want = (await ref.json())["outputs"][0]["data"]
            raw_out = await resp.read()
            got = json.loads(raw_out)["outputs"][0]["data"]  # JSON: no output asked binary
            assert got == pytest.approx(want, abs=1e-6)
        else:
            assert resp.status == 400
            assert (await resp.json())["field"] == field


async def test_cuda_shared_memory_refused_here_and_checked_before_cuda(
    platform: Platform,
) -> None:
    """No CUDA on this node: the CUDA routes answer the clear 400 and /v2 does not list
    the extension. With a device count faked, registrations are checked field by field
    before CUDA is touched, and a handle that cannot be opened is a 400, never a 500."""
    c = platform.client
    assert c.app is not None
    regions = c.app[sysshm.REGIONS]
    if regions.cuda_devices:
        pytest.skip("CUDA on this node: tests/gpu/test_cuda_shm.py covers it")
    reg = "/v2/cudasharedmemory/region/g/register"
    body = {"raw_handle": {"b64": base64.b64encode(bytes(64)).decode()}, "device_id": 0}
    body["byte_size"] = 64
    resp = await c.post(reg, json=body)
    assert resp.status == 400
    assert "not supported on this node" in (await resp.json())["error"]
    assert "cuda_shared_memory" not in (await (await c.get("/v2")).json())["extensions"]

    regions.cuda_devices = 1
    try:
        assert "cuda_shared_memory" in (await (await c.get("/v2")).json())["extensions"]

        async def refused(edit: dict[str, Any], field: str) -> None:
            resp = await c.post(reg, json=body | edit)
            got = await resp.json()
            assert (resp.status, got.get("field")) == (400, field), got

        await refused({"raw_handle": {"b64": "not base64!"}}, "raw_handle.b64")
        short = base64.b64encode(bytes(63)).decode()
        await refused({"raw_handle": {"b64": short}}, "raw_handle.b64")
        await refused({"device_id": 1}, "device_id")
        await refused({"device_id": -1}, "device_id")
        await refused({"byte_size": 0}, "byte_size")
        await refused({"byte_size": (16 << 30) + 1}, "byte_size")
        await refused({}, "raw_handle")  # no cupy here: the handle does not open
        resp = await c.get("/v2/cudasharedmemory/status")
        assert (resp.status, await resp.json()) == (200, [])
        assert (await c.post("/v2/cudasharedmemory/unregister")).status == 200
    finally:
        regions.cuda_devices = 0
