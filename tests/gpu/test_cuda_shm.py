"""Triton's CUDA shared-memory extension on a real GPU: `gpufaas up --demo --devices auto`
(the gateway in its own process, so that this one exports the handles), MiniLM's input
read from one device region and its output written into another, checked against the
model on the CPU; status, another tenant refused, unregister. Then the same with the
official client (``tritonclient.utils.cuda_shared_memory``) where it imports.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from typing import Any

import numpy as np
import pytest
import torch
import tritonclient.http as httpclient
from tritonclient.utils import serialize_byte_tensor

from gpufaas.launch import Up
from gpufaas.shared.cuda_ipc import CudaSegment
from tests.e2e.test_up import http
from tests.gpu.test_up_cuda import TEXTS, cpu_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine"),
]
BASE = "/v2/cudasharedmemory"


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Any:
    platform = Up.start(tmp_path_factory.mktemp("cudashm") / "data", "--demo", "--devices", "auto")
    try:
        platform.wait_ready(300)
        yield platform
    finally:
        assert platform.stop() == 0


def request(up: Up, path: str, body: Any = None, tenant: str | None = None) -> tuple[int, Any]:
    """``http`` to ``up``'s gateway, as ``tenant`` (its admin key acting for it) if given."""
    headers = up.headers | ({"x-gpufaas-tenant": tenant} if tenant else {})
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{up.url}{path}", data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_minilm_through_device_regions(up: Up) -> None:
    pytest.importorskip("cupy", reason="the gpu extra (cupy) is not installed")
    text = serialize_byte_tensor(np.array([t.encode() for t in TEXTS], dtype=object))
    raw = text.item() if text.size else b""
    meta = http(up, f"{up.url}/v2/models/minilm")[1]
    output = meta["outputs"][0]["name"]
    want = cpu_reference(TEXTS).numpy()
    # Whole cudaMalloc allocations (cupy's pool would export a handle to a larger block).
    src, dst = CudaSegment(0, len(raw)), CudaSegment(0, want.nbytes)
    src.write(0, memoryview(raw))
    try:
        check_regions(up, raw, output, want, src=src, dst=dst)
    finally:
        src.free()
        dst.free()


def check_regions(
    up: Up, raw: bytes, output: str, want: np.ndarray, *, src: CudaSegment, dst: CudaSegment
) -> None:
    def register(name: str, seg: CudaSegment) -> tuple[int, Any]:
        body = {"raw_handle": {"b64": base64.b64encode(seg.handle).decode()}}
        return request(
            up, f"{BASE}/region/{name}/register", body | {"device_id": 0, "byte_size": seg.nbytes}
        )

    assert "cuda_shared_memory" in http(up, f"{up.url}/v2")[1]["extensions"]
    assert register("in", src)[0] == 200
    assert register("out", dst)[0] == 200
    assert register("out", dst)[0] == 409  # already there
    status, regions = request(up, f"{BASE}/status")
    assert status == 200, regions
    assert {r["name"] for r in regions} == {"in", "out"}, regions

    def in_ref(region: str) -> dict[str, Any]:
        return {"shared_memory_region": region, "shared_memory_byte_size": len(raw)}

    body: dict[str, Any] = {
        "inputs": [
            {"name": "text", "shape": [len(TEXTS)], "datatype": "BYTES", "parameters": in_ref("in")}
        ],
        "outputs": [
            {
                "name": output,
                "parameters": {
                    "shared_memory_region": "out",
                    "shared_memory_byte_size": want.nbytes,
                },
            }
        ],
    }
    status, reply = request(up, "/v2/models/minilm/infer", body)
    assert status == 200, reply
    assert reply["outputs"][0]["parameters"]["shared_memory_region"] == "out"
    assert dst.tensor is not None
    got = dst.tensor.cpu().numpy().view(np.float32).reshape(want.shape)
    assert np.abs(got - want).max() <= 1e-4

    # Another tenant neither sees nor uses them.
    assert request(up, f"{BASE}/status", tenant="other") == (200, [])
    status, err = request(up, "/v2/models/minilm/infer", body, tenant="other")
    assert status == 404, err
    # A reference past the region's end is a 400 naming the field; then unregistered.
    body["inputs"][0]["parameters"]["shared_memory_offset"] = 1
    status, err = request(up, "/v2/models/minilm/infer", body)
    assert (status, err["field"]) == (400, "inputs[0].parameters.shared_memory_byte_size"), err
    assert request(up, f"{BASE}/region/in/unregister", {})[0] == 200
    assert request(up, f"{BASE}/unregister", {})[0] == 200
    assert request(up, f"{BASE}/status") == (200, [])


def test_tritonclient_cuda_shared_memory(up: Up) -> None:
    try:
        import tritonclient.utils.cuda_shared_memory as cudashm  # noqa: PLC0415 - needs cuda-python
    except (ImportError, RuntimeError) as exc:
        pytest.skip(f"tritonclient's CUDA shared memory does not import: {exc}")
    want = cpu_reference(TEXTS).numpy()
    text = np.array([t.encode() for t in TEXTS], dtype=object)
    raw = serialize_byte_tensor(text).item()
    client = httpclient.InferenceServerClient(up.url.removeprefix("http://"), network_timeout=120.0)
    src = cudashm.create_shared_memory_region("tin", len(raw), 0)
    dst = cudashm.create_shared_memory_region("tout", want.nbytes, 0)
    try:
        cudashm.set_shared_memory_region(src, [text])
        headers = up.headers
        client.register_cuda_shared_memory(
            "tin", cudashm.get_raw_handle(src), 0, len(raw), headers=headers
        )
        client.register_cuda_shared_memory(
            "tout", cudashm.get_raw_handle(dst), 0, want.nbytes, headers=headers
        )
        assert len(client.get_cuda_shared_memory_status(headers=headers)) == 2
        inp = httpclient.InferInput("text", [len(TEXTS)], "BYTES")
        inp.set_shared_memory("tin", len(raw))
        meta = client.get_model_metadata("minilm", headers=headers)
        out = httpclient.InferRequestedOutput(meta["outputs"][0]["name"], binary_data=True)
        out.set_shared_memory("tout", want.nbytes)
        client.infer("minilm", [inp], outputs=[out], headers=headers)
        got = cudashm.get_contents_as_numpy(dst, "FP32", list(want.shape))
        assert np.abs(got - want).max() <= 1e-4
        client.unregister_cuda_shared_memory(headers=headers)
        assert client.get_cuda_shared_memory_status(headers=headers) == []
    finally:
        client.close()
        cudashm.destroy_shared_memory_region(src)
        cudashm.destroy_shared_memory_region(dst)
