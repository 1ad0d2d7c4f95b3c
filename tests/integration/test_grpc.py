"""The gateway's gRPC service (KServe v2 ``inference.GRPCInferenceService``) through the
official ``tritonclient.grpc`` clients, and plain ``grpc.aio`` stubs for the raw cases;
Triton's system shared-memory extension with ``tritonclient.utils.shared_memory``."""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
import tritonclient.utils.shared_memory as shm
from aiohttp.test_utils import TestServer
from tritonclient.utils import (
    InferenceServerException,
    serialize_byte_tensor,
    serialized_byte_size,
)

from gpufaas.gateway.app import create_app
from gpufaas.gateway.proto import grpc_service_pb2 as pb
from gpufaas.gateway.proto import grpc_service_pb2_grpc as pbg
from gpufaas.shared.errors import Unavailable
from gpufaas.shared.tensors import encode_bytes_elements
from tests.integration.conftest import (
    DEMO_BODY,
    Platform,
    PlatformFactory,
    bearer,
    text_request,
)

pytestmark = pytest.mark.integration

TEXTS = ["gRPC carries raw tensors", "the same embeddings as over HTTP"]


class Mixed(torch.nn.Module):
    """FP16 and INT8 in; FP16, INT8 and BOOL out."""

    def forward(self, x: torch.Tensor, k: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"y": x * 2, "k": k + 1, "pos": x > 0}


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mixed")
    batch = torch.export.Dim("batch", min=1, max=64)
    args = (torch.randn(3, 4).half(), torch.ones(3, dtype=torch.int8))
    ep = torch.export.export(Mixed(), args, dynamic_shapes=({0: batch}, {0: batch}))
    torch.export.save(ep, out / "model.pt2")
    return out


def target(p: Platform) -> str:
    return f"127.0.0.1:{p.config.grpc_port}"


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@pytest.fixture
async def client(platform: Platform) -> AsyncIterator[triton_aio.InferenceServerClient]:
    c = triton_aio.InferenceServerClient(target(platform))
    yield c
    await c.close()


@pytest.fixture
async def stub(platform: Platform) -> AsyncIterator[pbg.GRPCInferenceServiceAsyncStub]:
    async with grpc.aio.insecure_channel(target(platform)) as channel:
        yield pbg.GRPCInferenceServiceStub(channel)


async def http_embeddings(p: Platform, texts: list[str]) -> np.ndarray[Any, Any]:
    resp = await p.client.post("/v2/models/minilm/infer", json=text_request(texts))
    out = (await resp.json())["outputs"][0]
    return np.array(out["data"], dtype=np.float32).reshape(out["shape"])


def text_input(texts: list[str]) -> triton_aio.InferInput:
    inp = triton_aio.InferInput("text", [len(texts)], "BYTES")
    inp.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=np.object_))
    return inp


async def test_health_and_metadata_with_the_blocking_client(platform: Platform) -> None:
    assert (await platform.client.post("/v1/functions", json=DEMO_BODY)).status == 201
    key = platform.api_key

    def calls() -> tuple[Any, ...]:
        c = triton.InferenceServerClient(target(platform))
        try:
            return (
                c.is_server_live(),  # no key: liveness and readiness are open, as over HTTP
                c.is_server_ready(),
                c.get_server_metadata(headers=auth(key), as_json=True),
                c.is_model_ready("minilm", headers=auth(key)),
                c.is_model_ready("nothing-here", headers=auth(key)),
                c.get_model_metadata("minilm", headers=auth(key), as_json=True),
            )
        finally:
            c.close()

    live, ready, server, model_ready, absent_ready, meta = await asyncio.to_thread(calls)
    assert (live, ready, model_ready, absent_ready) == (True, True, True, False)
    assert server["name"] == "gpufaas"
    assert meta["name"] == "minilm"
    assert meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": ["-1"]}]
    assert meta["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": ["-1", "384"]}]


async def test_minilm_over_raw_contents_matches_http(
    platform: Platform, client: triton_aio.InferenceServerClient
) -> None:
    assert (await platform.client.post("/v1/functions", json=DEMO_BODY)).status == 201
    result = await client.infer(
        "minilm", [text_input(TEXTS)], request_id="r-7", headers=auth(platform.api_key)
    )
    got = result.as_numpy("embedding")
    assert got.dtype == np.float32
    assert got.shape == (2, 384)
    np.testing.assert_allclose(got, await http_embeddings(platform, TEXTS), atol=1e-6)
    response = result.get_response()
    assert response.id == "r-7"
    assert response.model_version == "1"
    assert response.parameters["node"].string_param == "node-t"
    assert response.parameters["total_us"].int64_param > 0


async def test_typed_contents_in_and_out(
    platform: Platform, stub: pbg.GRPCInferenceServiceAsyncStub
) -> None:
    """BYTES given as typed ``contents``: the response answers with typed contents."""
    assert (await platform.client.post("/v1/functions", json=DEMO_BODY)).status == 201
    request = pb.ModelInferRequest(model_name="minilm", id="typed")
    text = request.inputs.add(name="text", datatype="BYTES", shape=[2])
    text.contents.bytes_contents.extend(t.encode() for t in TEXTS)
    response = await stub.ModelInfer(request, metadata=tuple(auth(platform.api_key).items()))
    assert not response.raw_output_contents
    (out,) = response.outputs
    assert (out.name, out.datatype, list(out.shape)) == ("embedding", "FP32", [2, 384])
    got = np.array(out.contents.fp32_contents, dtype=np.float32).reshape(2, 384)
    np.testing.assert_allclose(got, await http_embeddings(platform, TEXTS), atol=1e-6)

    # The same texts as raw, length-prefixed BYTES: raw outputs.
    raw = pb.ModelInferRequest(model_name="minilm")
    raw.inputs.add(name="text", datatype="BYTES", shape=[2])
    raw.raw_input_contents.append(encode_bytes_elements([t.encode() for t in TEXTS]))
    response = await stub.ModelInfer(raw, metadata=tuple(auth(platform.api_key).items()))
    np.testing.assert_allclose(
        np.frombuffer(response.raw_output_contents[0], "<f4").reshape(2, 384), got
    )


async def deploy_mixed(p: Platform, model_dir: Path) -> None:
    body = {"name": "mixed", "model": {"path": str(model_dir), "architecture": "torch-export"}}
    resp = await p.client.post("/v1/functions", json=body)
    assert resp.status == 201, await resp.text()


async def test_fp16_int8_and_bool_round_trips(
    platform: Platform, client: triton_aio.InferenceServerClient, mixed_dir: Path
) -> None:
    await deploy_mixed(platform, mixed_dir)
    x = np.array([[0.5, -1.25, 3.0, 65504.0 / 2], [-0.0, 1e-3, -7.5, 2.0]], dtype=np.float16)
    k = np.array([-128, 126], dtype=np.int8)
    inputs = [triton_aio.InferInput("x", [2, 4], "FP16"), triton_aio.InferInput("k", [2], "INT8")]
    inputs[0].set_data_from_numpy(x)
    inputs[1].set_data_from_numpy(k)
    wanted = [triton_aio.InferRequestedOutput("y"), triton_aio.InferRequestedOutput("pos")]
    result = await client.infer("mixed", inputs, outputs=wanted, headers=auth(platform.api_key))
    y = result.as_numpy("y")
    assert y.dtype == np.float16
    np.testing.assert_array_equal(y, x * 2)
    np.testing.assert_array_equal(result.as_numpy("pos"), x > 0)
    assert result.as_numpy("k") is None  # not asked for

    # Every output when none is named.
    result = await client.infer("mixed", inputs, headers=auth(platform.api_key))
    np.testing.assert_array_equal(result.as_numpy("k"), k + np.int8(1))
    meta = await client.get_model_metadata("mixed", headers=auth(platform.api_key), as_json=True)
    assert {t["name"]: t["datatype"] for t in meta["outputs"]} == {
        "y": "FP16",
        "k": "INT8",
        "pos": "BOOL",
    }


async def expect_error(call: Any, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    return info.value


def trailing(error: grpc.aio.AioRpcError) -> dict[str, str]:
    return {k: str(v) for k, v in error.trailing_metadata() or ()}


async def test_malformed_requests_name_the_field(
    platform: Platform, stub: pbg.GRPCInferenceServiceAsyncStub, mixed_dir: Path
) -> None:
    await deploy_mixed(platform, mixed_dir)
    meta = tuple(auth(platform.api_key).items())
    x16 = np.ones((1, 4), np.float16).tobytes()

    def request(*raw: bytes, shape: tuple[int, ...] = (1, 4)) -> pb.ModelInferRequest:
        r = pb.ModelInferRequest(model_name="mixed")
        r.inputs.add(name="x", datatype="FP16", shape=shape)
        r.inputs.add(name="k", datatype="INT8", shape=[shape[0]])
        r.raw_input_contents.extend(raw)
        return r

    cases = [
        (request(x16), "raw_input_contents"),  # one entry for two inputs
        (request(x16[:-1], b"\x01"), "raw_input_contents[0]"),  # a byte short
        (request(x16, b"\x01", shape=(1, 5)), "inputs[0].shape"),  # 4 columns, not 5
    ]
    typed = request()
    typed.inputs[0].contents.fp32_contents.extend([1.0] * 4)
    cases.append((typed, "inputs[0].contents"))  # FP16 has no typed field
    wrong = request()
    wrong.inputs[0].datatype = "FP32"
    cases.append((wrong, "inputs[0].datatype"))
    for req, field in cases:
        error = await expect_error(
            stub.ModelInfer(req, metadata=meta), grpc.StatusCode.INVALID_ARGUMENT
        )
        assert f"(field {field})" in (error.details() or ""), error.details()
        assert trailing(error)["gpufaas-error-field"] == field
        assert trailing(error)["gpufaas-error-code"] == "invalid_argument"

    big_k = pb.ModelInferRequest(model_name="mixed")
    big_k.inputs.add(name="x", datatype="FP16", shape=[0, 4])  # no elements: no data needed
    big_k.inputs.add(name="k", datatype="INT8", shape=[1]).contents.int_contents.append(300)
    error = await expect_error(
        stub.ModelInfer(big_k, metadata=meta), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert trailing(error)["gpufaas-error-field"] == "inputs[1].contents.int_contents"


async def test_unknown_model_no_key_and_another_tenant(
    platform: Platform, client: triton_aio.InferenceServerClient
) -> None:
    assert (await platform.client.post("/v1/functions", json=DEMO_BODY)).status == 201
    with pytest.raises(InferenceServerException) as info:
        await client.infer("nothing-here", [text_input(["x"])], headers=auth(platform.api_key))
    assert info.value.status() == "StatusCode.NOT_FOUND"
    assert "nothing-here" in info.value.message()

    for headers in (None, {"authorization": "Bearer not-a-key"}, {"authorization": "Basic x"}):
        with pytest.raises(InferenceServerException) as info:
            await client.infer("minilm", [text_input(["x"])], headers=headers)
        assert info.value.status() == "StatusCode.UNAUTHENTICATED"
    with pytest.raises(InferenceServerException) as info:
        await client.get_server_metadata()
    assert info.value.status() == "StatusCode.UNAUTHENTICATED"

    other = await platform.key_for("other")  # another tenant's key sees none of its models
    with pytest.raises(InferenceServerException) as info:
        await client.get_model_metadata("minilm", headers=auth(other))
    assert info.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as info:  # nor may it act as the tenant
        await client.infer(
            "minilm", [text_input(["x"])], headers=auth(other) | {"x-gpufaas-tenant": "default"}
        )
    assert info.value.status() == "StatusCode.PERMISSION_DENIED"


async def test_the_stream_answers_each_request_in_order(
    platform: Platform, client: triton_aio.InferenceServerClient
) -> None:
    assert (await platform.client.post("/v1/functions", json=DEMO_BODY)).status == 201
    names = ["minilm", "nothing-here", "minilm"]

    async def requests() -> AsyncIterator[dict[str, Any]]:
        for i, name in enumerate(names):
            yield {"model_name": name, "inputs": [text_input(TEXTS[:1])], "request_id": f"s{i}"}

    answers = []
    async for result, error in client.stream_infer(requests(), headers=auth(platform.api_key)):
        answers.append((result, error))
    assert len(answers) == 3
    (first, e0), (_, e1), (third, e2) = answers
    assert e0 is None
    assert e2 is None
    assert e1 is not None
    assert "nothing-here" in e1.message()
    assert [first.get_response().id, third.get_response().id] == ["s0", "s2"]
    want = await http_embeddings(platform, TEXTS[:1])
    np.testing.assert_allclose(first.as_numpy("embedding"), want, atol=1e-6)
    np.testing.assert_allclose(third.as_numpy("embedding"), want, atol=1e-6)


async def test_a_stream_without_a_key_is_refused(
    platform: Platform, stub: pbg.GRPCInferenceServiceAsyncStub
) -> None:
    async def one() -> AsyncIterator[pb.ModelInferRequest]:
        yield pb.ModelInferRequest(model_name="minilm")

    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in stub.ModelStreamInfer(one()):
            pass
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_admission_limits_the_tenants_calls(platform_factory: PlatformFactory) -> None:
    p = await platform_factory(tenant_burst=1, tenant_rate=0.01)
    async with grpc.aio.insecure_channel(target(p)) as channel:
        stub = pbg.GRPCInferenceServiceStub(channel)
        meta = tuple(auth(p.api_key).items())
        request = pb.ModelInferRequest(model_name="nothing-here")
        await expect_error(stub.ModelInfer(request, metadata=meta), grpc.StatusCode.NOT_FOUND)
        error = await expect_error(
            stub.ModelInfer(request, metadata=meta), grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        assert trailing(error)["gpufaas-error-code"] == "overloaded"
        assert int(trailing(error)["retry-after"]) >= 1


async def test_a_grpc_port_in_use_fails_the_gateways_start(platform: Platform) -> None:
    server = TestServer(create_app(platform.config))  # the platform's gateway holds the port
    try:
        with pytest.raises(Unavailable, match="cannot listen for gRPC") as info:
            await server.start_server()
        assert info.value.field == "GPUFAAS_GRPC_PORT"
    finally:
        await server.close()


# --- system shared memory --------------------------------------------------------------


@pytest.fixture
def regions() -> Iterator[list[Any]]:
    """Shared-memory regions the test makes (destroyed after it)."""
    made: list[Any] = []
    yield made
    for handle in made:
        shm.destroy_shared_memory_region(handle)


def shm_key(what: str) -> str:
    return f"/gpufaas_test_grpc_{what}_{secrets.token_hex(4)}"


async def test_tritonclient_system_shared_memory(
    platform: Platform,
    client: triton_aio.InferenceServerClient,
    mixed_dir: Path,
    regions: list[Any],
) -> None:
    """MiniLM with its input and output in shared memory; then a model with one input and
    one output of two in shared memory (the rest raw, where they belong); status and
    unregistering."""
    assert (await platform.client.post("/v1/functions", json=DEMO_BODY)).status == 201
    await deploy_mixed(platform, mixed_dir)
    key = platform.api_key
    texts = serialize_byte_tensor(np.array([t.encode() for t in TEXTS], dtype=np.object_))
    in_key, out_key = shm_key("in"), shm_key("out")
    in_region = shm.create_shared_memory_region("in", in_key, 1024)
    out_region = shm.create_shared_memory_region("out", out_key, 2 * 384 * 4 + 64)
    regions += [in_region, out_region]
    shm.set_shared_memory_region(in_region, [texts], offset=16)
    await client.register_system_shared_memory("in", in_key, 1024, headers=auth(key))
    await client.register_system_shared_memory("out", out_key, 2 * 384 * 4 + 64, headers=auth(key))

    text = triton_aio.InferInput("text", [2], "BYTES")
    text.set_shared_memory("in", serialized_byte_size(texts), offset=16)
    emb = triton_aio.InferRequestedOutput("embedding")
    emb.set_shared_memory("out", 2 * 384 * 4, offset=64)
    result = await client.infer("minilm", [text], outputs=[emb], headers=auth(key))
    (out,) = result.get_response().outputs
    assert out.parameters["shared_memory_region"].string_param == "out"
    assert out.parameters["shared_memory_offset"].int64_param == 64
    assert out.parameters["shared_memory_byte_size"].int64_param == 2 * 384 * 4
    assert list(result.get_response().raw_output_contents) == [b""]  # no bytes in the reply
    got = shm.get_contents_as_numpy(out_region, np.float32, [2, 384], offset=64)
    np.testing.assert_allclose(got, await http_embeddings(platform, TEXTS), atol=1e-6)

    # x from shared memory, k raw; y into shared memory, pos raw (its entry still second).
    x = np.array([[0.5, -1.0, 2.0, 0.0]], dtype=np.float16)
    shm.set_shared_memory_region(in_region, [x])
    inputs = [triton_aio.InferInput("x", [1, 4], "FP16"), triton_aio.InferInput("k", [1], "INT8")]
    inputs[0].set_shared_memory("in", x.nbytes)
    inputs[1].set_data_from_numpy(np.array([5], dtype=np.int8))
    y, pos = triton_aio.InferRequestedOutput("y"), triton_aio.InferRequestedOutput("pos")
    y.set_shared_memory("out", x.nbytes)
    result = await client.infer("mixed", inputs, outputs=[y, pos], headers=auth(key))
    np.testing.assert_array_equal(result.as_numpy("pos"), x > 0)
    got = shm.get_contents_as_numpy(out_region, np.float16, [1, 4])
    np.testing.assert_array_equal(got, x * np.float16(2))

    status = await client.get_system_shared_memory_status(headers=auth(key))
    assert {n: (r.key, r.offset, r.byte_size) for n, r in status.regions.items()} == {
        "in": (in_key, 0, 1024),
        "out": (out_key, 0, 2 * 384 * 4 + 64),
    }
    one = await client.get_system_shared_memory_status("in", headers=auth(key))
    assert list(one.regions) == ["in"]
    await client.unregister_system_shared_memory("in", headers=auth(key))
    status = await client.get_system_shared_memory_status(headers=auth(key))
    assert list(status.regions) == ["out"]
    await client.unregister_system_shared_memory(headers=auth(key))
    status = await client.get_system_shared_memory_status(headers=auth(key))
    assert not status.regions


async def refused(call: Any, code: grpc.StatusCode, field: str) -> None:
    error = await expect_error(call, code)
    assert trailing(error)["gpufaas-error-field"] == field, error.details()


def shm_infer(x: dict[str, Any], y_size: int | None = None) -> pb.ModelInferRequest:
    """``mixed`` with x's ``parameters`` as given, k raw, and y into region r (if sized)."""
    r = pb.ModelInferRequest(model_name="mixed", raw_input_contents=[b"\x01"])
    inp = r.inputs.add(name="x", datatype="FP16", shape=[1, 4])
    for name, value in x.items():
        param = inp.parameters[name]
        if isinstance(value, str):
            param.string_param = value
        else:
            param.int64_param = value
    r.inputs.add(name="k", datatype="INT8", shape=[1])
    if y_size is not None:
        out = r.outputs.add(name="y")
        out.parameters["shared_memory_region"].string_param = "r"
        out.parameters["shared_memory_byte_size"].int64_param = y_size
    return r


async def test_shared_memory_regions_are_the_tenants_own(
    platform: Platform,
    stub: pbg.GRPCInferenceServiceAsyncStub,
    mixed_dir: Path,
    regions: list[Any],
) -> None:
    p = platform
    await deploy_mixed(p, mixed_dir)
    meta = tuple(auth(p.api_key).items())
    key = shm_key("r")
    regions.append(shm.create_shared_memory_region("r", key, 64))

    def register(name: str = "r", **kw: Any) -> Any:
        request = pb.SystemSharedMemoryRegisterRequest(name=name, **({"key": key} | kw))
        return stub.SystemSharedMemoryRegister(request, metadata=meta)

    invalid = grpc.StatusCode.INVALID_ARGUMENT
    await refused(register(key="a/b", byte_size=8), invalid, "key")
    await refused(register(key="..", byte_size=8), invalid, "key")
    await refused(register(key=f"nosuch_{key[1:]}", byte_size=8), grpc.StatusCode.NOT_FOUND, "key")
    await refused(register(byte_size=60, offset=8), invalid, "byte_size")
    await refused(register(byte_size=0), invalid, "byte_size")
    await refused(register("a b", byte_size=8), invalid, "name")
    await register(byte_size=64)
    await refused(register(byte_size=64), grpc.StatusCode.ALREADY_EXISTS, "name")

    # Another tenant sees none of it, and cannot infer from it (with a mixed of its own).
    other_key = await p.key_for("other", admin=True)
    other = tuple(auth(other_key).items())
    body = {"name": "mixed", "model": {"path": str(mixed_dir), "architecture": "torch-export"}}
    resp = await p.client.post("/v1/functions", json=body, headers=bearer(other_key))
    assert resp.status == 201
    status = stub.SystemSharedMemoryStatus
    assert not (await status(pb.SystemSharedMemoryStatusRequest(), metadata=other)).regions
    await refused(
        status(pb.SystemSharedMemoryStatusRequest(name="r"), metadata=other),
        grpc.StatusCode.NOT_FOUND,
        "name",
    )
    unregister = pb.SystemSharedMemoryUnregisterRequest(name="r")
    await stub.SystemSharedMemoryUnregister(unregister, metadata=other)  # nothing of its own
    assert len((await status(pb.SystemSharedMemoryStatusRequest(), metadata=meta)).regions) == 1
    ok = {"shared_memory_region": "r", "shared_memory_byte_size": 8}
    await refused(
        stub.ModelInfer(shm_infer(ok), metadata=other),
        grpc.StatusCode.NOT_FOUND,
        "inputs[0].parameters.shared_memory_region",
    )

    # CUDA shared memory is not served here; and without a key, nothing is.
    error = await expect_error(
        stub.CudaSharedMemoryStatus(pb.CudaSharedMemoryStatusRequest(), metadata=meta),
        grpc.StatusCode.UNIMPLEMENTED,
    )
    assert "not supported on this node" in (error.details() or "")
    cuda = pb.CudaSharedMemoryRegisterRequest(name="g", raw_handle=bytes(64), byte_size=8)
    error = await expect_error(
        stub.CudaSharedMemoryRegister(cuda, metadata=meta), grpc.StatusCode.UNIMPLEMENTED
    )
    assert "not supported on this node" in (error.details() or "")
    metadata = await stub.ServerMetadata(pb.ServerMetadataRequest(), metadata=meta)
    assert "cuda_shared_memory" not in metadata.extensions
    await expect_error(
        stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest()),
        grpc.StatusCode.UNAUTHENTICATED,
    )


async def test_shared_memory_references_are_checked(
    platform: Platform,
    stub: pbg.GRPCInferenceServiceAsyncStub,
    mixed_dir: Path,
    regions: list[Any],
) -> None:
    await deploy_mixed(platform, mixed_dir)
    meta = tuple(auth(platform.api_key).items())
    key = shm_key("r")
    regions.append(shm.create_shared_memory_region("r", key, 64))
    register = pb.SystemSharedMemoryRegisterRequest(name="r", key=key, byte_size=64)
    await stub.SystemSharedMemoryRegister(register, metadata=meta)

    invalid = grpc.StatusCode.INVALID_ARGUMENT
    p0 = "inputs[0].parameters"
    ok: dict[str, Any] = {"shared_memory_region": "r", "shared_memory_byte_size": 8}
    cases: list[tuple[dict[str, Any], str]] = [
        ({**ok, "shared_memory_byte_size": 6}, "shared_memory_byte_size"),  # FP16 [1, 4]: 8
        ({**ok, "shared_memory_offset": 60}, "shared_memory_byte_size"),  # past the end
        ({"shared_memory_byte_size": 8}, "shared_memory_region"),  # no region
        ({**ok, "shared_memory_offset": -1}, "shared_memory_offset"),
        ({**ok, "shared_memory_region": 3}, "shared_memory_region"),  # not a string
    ]
    for params, field in cases:
        await refused(stub.ModelInfer(shm_infer(params), metadata=meta), invalid, f"{p0}.{field}")
    await refused(
        stub.ModelInfer(shm_infer(ok, 4), metadata=meta),
        invalid,
        "outputs[0].parameters.shared_memory_byte_size",
    )
    two_raw = shm_infer(ok)
    two_raw.raw_input_contents.append(b"\x01")  # x is in shared memory: one entry, not two
    await refused(stub.ModelInfer(two_raw, metadata=meta), invalid, "raw_input_contents")
    response = await stub.ModelInfer(shm_infer(ok, 8), metadata=meta)
    assert [o.name for o in response.outputs] == ["y"]
    # The client shrinks its file: INVALID_ARGUMENT, never a fault in the gateway.
    os.truncate(Path("/dev/shm") / key.lstrip("/"), 4)
    await refused(
        stub.ModelInfer(shm_infer(ok), metadata=meta), invalid, f"{p0}.shared_memory_region"
    )
