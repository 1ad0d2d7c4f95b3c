"""Immutable shared weights (issue 15, deliverable 4).

Weights are shared across tenants by content, so the attack of the issue: tenant
``mallory`` exports (plain ``torch.export.export``) a module whose buffer is a copy of
MiniLM's ``embeddings.LayerNorm.weight`` and whose forward runs ``self.w.mul_(0.0)``,
deploys it and invokes it. The platform runs it in its functional form, the buffer update
lands in the instance's own copy, and ``default``'s embeddings stay bit-identical. A file
edited to claim another dialect or to call what is not a functional ATen operator, and a
symbolic-shape bomb, are refused at deploy (422 ``model_invalid`` naming the node); a write
through a weight's view at run time changes a private copy-on-write page, never the file.
"""

from __future__ import annotations

import json
import mmap
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gpufaas.shared.catalog import resolve_model_dir
from gpufaas.shared.errors import ModelInvalid
from gpufaas.shared.messages import (
    DevicePlacement,
    DeviceRef,
    DeviceSegment,
    ModelSource,
    TensorRef,
)
from gpufaas.shared.shm import write_segment
from gpufaas.tensorstore.pt2_file import Pt2File
from gpufaas.tensorstore.service import TensorStoreService
from gpufaas.worker.exported import ExportedRunner, load_program
from gpufaas.worker.program_check import ATEN_ALLOWED, check_expr, is_allowed
from gpufaas.worker.tensor_map import TensorMap
from tests.integration.conftest import DEMO_BODY, Platform, bearer, text_request

LAYER_NORM = "embeddings.LayerNorm.weight"
SEGMENT = "tensors/node-t/weights"


class Mallory(torch.nn.Module):
    """The issue's program: a buffer equal to a shared weight, zeroed in place by forward."""

    w: torch.Tensor

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("w", weight.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.w.mul_(0.0)
        return x + self.w.sum()


class ViewWriter(torch.nn.Module):
    """Writes its input into a slice of its buffer (a view), then reads the buffer."""

    w: torch.Tensor

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("w", weight.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.w[1:3].copy_(x)
        self.w.view(-1)[0:1].fill_(7.0)
        return self.w * 1.0


def layer_norm_weight() -> torch.Tensor:
    model_dir = resolve_model_dir(ModelSource(builtin="all-minilm-l6-v2"))
    return load_file(str(model_dir / "model.safetensors"))[LAYER_NORM]


def export(module: torch.nn.Module, path: Path, example: torch.Tensor, *, dynamic: bool) -> Path:
    """``module`` exported the plain way (the default TRAINING dialect) and saved."""
    shapes = ({0: torch.export.Dim("n", min=2, max=64)},) if dynamic else None
    ep = torch.export.export(module, (example,), dynamic_shapes=shapes)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(ep, path)
    return path


def edit_program(src: Path, dst: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """A copy of a .pt2 whose program JSON went through ``edit`` (CRCs rewritten)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("/models/model.json"):
                doc = json.loads(data)
                edit(doc)
                data = json.dumps(doc).encode()
            zout.writestr(info.filename, data)
    return dst


def nodes(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return list(doc["graph_module"]["graph"]["nodes"])


def node_calling(doc: dict[str, Any], prefix: str) -> dict[str, Any]:
    return next(n for n in nodes(doc) if n["target"].startswith(prefix))


def first_expr(doc: Any) -> dict[str, Any]:
    """The first dict (depth first) holding a symbolic expression."""
    stack = [doc]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if "expr_str" in item:
                return item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    raise AssertionError("no symbolic expression in the program")


def deploy_body(name: str, model_dir: Path) -> dict[str, Any]:
    return {"name": name, "model": {"path": str(model_dir), "architecture": "torch-export"}}


def store_of(platform: Platform) -> TensorStoreService:
    store = platform.services["tensorstore"]
    assert isinstance(store, TensorStoreService)
    return store


async def embedding(platform: Platform) -> list[float]:
    resp = await platform.client.post("/v2/models/minilm/infer", json=text_request(["hello world"]))
    body = await resp.json()
    assert resp.status == 200, body
    data: list[float] = body["outputs"][0]["data"]
    return data


# --- (1) the demonstration ----------------------------------------------------------------


@pytest.mark.integration
async def test_an_in_place_program_leaves_other_tenants_outputs_bit_identical(
    platform: Platform, tmp_path: Path
) -> None:
    c = platform.client
    assert (await c.post("/v1/functions", json=DEMO_BODY)).status == 201
    before = await embedding(platform)
    store = store_of(platform).store
    stored = store.bytes_stored

    pt2 = export(
        Mallory(layer_norm_weight()),
        tmp_path / "mallory" / "model.pt2",
        torch.ones(4),
        dynamic=False,
    )
    mallory = bearer(await platform.key_for("mallory", admin=True))
    resp = await c.post("/v1/functions", json=deploy_body("zeroer", pt2.parent), headers=mallory)
    assert resp.status == 201, await resp.json()
    assert store.bytes_stored == stored  # the buffer IS the LayerNorm weight: shared bytes

    x = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [4], "data": [1, 2, 3, 4]}]}
    for _ in range(2):  # the update is the instance's own: later calls see it
        resp = await c.post("/v2/models/zeroer/infer", json=x, headers=mallory)
        body = await resp.json()
        assert resp.status == 200, body
        assert body["outputs"][0]["data"] == [1.0, 2.0, 3.0, 4.0]  # x + sum(0 * w)

    assert await embedding(platform) == before  # bit-identical, for every caller


# --- (2) crafted files --------------------------------------------------------------------


def claim_aten(doc: dict[str, Any]) -> None:
    doc["verifiers"] = ["ATEN"]  # "functional", with the in-place node still there


def claim_edge(doc: dict[str, Any]) -> None:
    doc["verifiers"] = ["EDGE"]


def call_from_file(doc: dict[str, Any]) -> None:
    node_calling(doc, "torch.ops.aten.add.")["target"] = "torch.ops.aten.from_file.default"


def call_as_strided(doc: dict[str, Any]) -> None:
    node_calling(doc, "torch.ops.aten.add.")["target"] = "torch.ops.aten.as_strided.default"


def call_empty(doc: dict[str, Any]) -> None:
    node_calling(doc, "torch.ops.aten.add.")["target"] = "torch.ops.aten.empty_like.default"


def power_tower(doc: dict[str, Any]) -> None:
    first_expr(doc)["expr_str"] = "2**10**10"


@pytest.mark.integration
@pytest.mark.parametrize(
    ("edit", "why"),
    [
        (claim_aten, "claims the functional ATEN dialect, but node 'mul_' calls aten.mul_"),
        (claim_edge, "claims the dialect ['EDGE']"),
        (call_from_file, "node 'add' of the program calls 'torch.ops.aten.from_file.default'"),
        (call_as_strided, "calls 'torch.ops.aten.as_strided.default', which is not allowed"),
        (call_empty, "calls 'torch.ops.aten.empty_like.default', which is not allowed"),
        (power_tower, "symbolic shape that is not bounded"),
    ],
)
async def test_a_crafted_program_is_refused_at_deploy(
    platform: Platform, tmp_path: Path, edit: Callable[[dict[str, Any]], None], why: str
) -> None:
    pt2 = export(Mallory(torch.ones(8)), tmp_path / "src.pt2", torch.ones(4), dynamic=True)
    crafted = edit_program(pt2, tmp_path / "crafted" / "model.pt2", edit)
    c = platform.client
    t0 = time.perf_counter()
    resp = await c.post("/v1/functions", json=deploy_body("crafted", crafted.parent))
    body = await resp.json()
    assert resp.status == 422, body
    assert body["code"] == "model_invalid"
    assert why in body["error"]
    assert time.perf_counter() - t0 < 20  # refused, not evaluated
    assert (await c.get("/v1/functions/crafted")).status == 404


# --- (3) writes at run time ---------------------------------------------------------------


def stored_segment(root: Path, values: torch.Tensor) -> tuple[TensorRef, bytes]:
    data = values.contiguous().numpy().tobytes()
    write_segment(root, SEGMENT, [data])
    ref = TensorRef(
        id="ab" * 32,
        dtype="float32",
        shape=list(values.shape),
        nbytes=len(data),
        segment=SEGMENT,
        offset=0,
    )
    return ref, data


def shared_view(root: Path) -> bytes:
    """The segment as any other process maps it (the store maps MAP_SHARED)."""
    with open(root / SEGMENT, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        return bytes(m)


@pytest.mark.unit
@pytest.mark.parametrize("device", ["host", "sim"])
def test_a_write_through_a_weight_view_never_reaches_the_shared_bytes(
    tmp_path: Path, device: str
) -> None:
    ref, data = stored_segment(tmp_path, torch.arange(384, dtype=torch.float32))
    placement = None
    if device == "sim":  # a simulated GPU's device tier is host memory: the same mapping
        placement = DevicePlacement(
            device="gpu:0",
            refs={ref.id: DeviceRef(segment="d1", offset=0)},
            segments=[DeviceSegment(id="d1", nbytes=ref.nbytes)],
            bytes_copied=ref.nbytes,
            used_bytes=ref.nbytes,
        )
    writer, other = TensorMap(tmp_path), TensorMap(tmp_path)  # two processes' mappings
    weights, _ = writer.acquire({"w": ref}, placement)
    seen, _ = other.acquire({"w": ref}, placement)
    assert seen["w"][5].item() == 5.0  # mapped before the write, read after it

    weights["w"].mul_(0.0)  # what an in-place program, or a bug, would do
    weights["w"][:8].copy_(torch.full((8,), 9.0))
    assert weights["w"][0].item() == 9.0  # the writer sees its own, private page

    assert (tmp_path / SEGMENT).read_bytes() == data
    assert shared_view(tmp_path) == data
    assert torch.equal(seen["w"], torch.arange(384, dtype=torch.float32))
    later, _ = TensorMap(tmp_path).acquire({"w": ref}, placement)
    assert torch.equal(later["w"], torch.arange(384, dtype=torch.float32))


@pytest.mark.unit
def test_a_program_writing_through_a_view_keeps_its_writes_to_itself(tmp_path: Path) -> None:
    original = torch.arange(8, dtype=torch.float32)
    ref, data = stored_segment(tmp_path, original)
    pt2 = export(ViewWriter(original), tmp_path / "view.pt2", torch.ones(2), dynamic=False)
    tensors = TensorMap(tmp_path)
    weights, _ = tensors.acquire({"w": ref}, None)
    with Pt2File(pt2) as f:
        first = ExportedRunner.from_program(f.program, weights)
        second = ExportedRunner.from_program(f.program, weights)
    x = torch.tensor([-1.0, -2.0])
    out = first.infer({"x": ([2], x.numpy().tobytes())})["output__0"]
    got = np.frombuffer(bytes(out.data), dtype=np.float32).tolist()
    assert got == [7.0, -1.0, -2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    # The shared view (same process), the file and another instance are untouched.
    assert torch.equal(weights["w"], original)
    assert (tmp_path / SEGMENT).read_bytes() == data
    assert torch.equal(second.module.w, original)  # type: ignore[arg-type]


# --- (4) symbolic expressions -------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    "expr",
    [
        "2**10**10",
        "Pow(Integer(2), Pow(Integer(10), Integer(10)))",
        "Pow(Symbol('s0', integer=True), Symbol('s0', integer=True))",
        "LShift(Integer(1), Integer(100000000))",
        "Mul(Integer(" + "9" * 400 + "), Symbol('s0'))",
        "Integer('" + "9" * 1990 + "')**Integer(64)",
        "Add(" + ", ".join(["Symbol('s0')"] * 400) + ")",
        "(" * 100 + "Symbol('s0')" + ")" * 100,
        "Symbol('s0')" + "+1" * 2000,
    ],
)
def test_a_symbolic_expression_bomb_is_refused(expr: str) -> None:
    t0 = time.perf_counter()
    with pytest.raises(ModelInvalid, match="symbolic shape that is not"):
        check_expr(expr)
    assert time.perf_counter() - t0 < 0.5


@pytest.mark.unit
def test_torchs_own_expressions_pass() -> None:
    for expr in [
        "Symbol('s53', positive=True, integer=True)",
        "Mul(Integer(12), Pow(Symbol('s53', positive=True, integer=True), Integer(2)))",
        "Max(Integer(1), Mul(Integer(384), Symbol('s0', positive=True, integer=True)))",
        "FloorDiv(Symbol('s0', integer=True), Integer(2))",
        "Pow(Symbol('s0', integer=True), Rational(1, 2))",
        "Float('1.5', precision=53)",
    ]:
        check_expr(expr)


@pytest.mark.unit
def test_a_bomb_in_a_program_is_refused_before_torch_reads_it(tmp_path: Path) -> None:
    pt2 = export(Mallory(torch.ones(8)), tmp_path / "m.pt2", torch.ones(4), dynamic=True)
    with Pt2File(pt2) as f:
        doc = json.loads(f.program)
        weights = {
            e.name: torch.frombuffer(bytearray(f.view(e)), dtype=torch.float32) for e in f.entries
        }
    first_expr(doc)["expr_str"] = "Integer(2)**Integer(10)**Integer(10)"
    with pytest.raises(ModelInvalid, match="not bounded"):
        load_program(json.dumps(doc).encode(), weights)


# --- the allowlist --------------------------------------------------------------------------


@pytest.mark.unit
def test_the_allowlist_names_functional_aten_operators_only() -> None:
    for name in sorted(ATEN_ALLOWED):
        packet = getattr(torch.ops.aten, name)
        overloads = [getattr(packet, o) for o in packet.overloads()]
        assert any(not o._schema.is_mutable for o in overloads), name
    for name in ("mul_", "copy_", "set_", "resize_", "save", "from_file", "_print", "empty"):
        assert name not in ATEN_ALLOWED
    assert not is_allowed(torch.ops.aten.add.out)  # an allowed packet's out= form mutates
    assert is_allowed(torch.ops.aten.add.Tensor)


class Cnn(torch.nn.Module):
    """Convolution, batch norm (running statistics), pooling: a typical image model."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.relu(self.bn(self.conv(x)))
        return torch.nn.functional.adaptive_avg_pool2d(y, 1).flatten(1)


def _pt2_weights(f: Pt2File) -> dict[str, torch.Tensor]:
    return {
        e.name: torch.frombuffer(bytearray(f.view(e)), dtype=getattr(torch, e.dtype)).reshape(
            e.shape
        )
        if e.end > e.start
        else torch.zeros(e.shape, dtype=getattr(torch, e.dtype))
        for e in f.entries
    }


@pytest.mark.unit
@pytest.mark.parametrize("train", [False, True])
def test_batch_norm_runs_functional_and_keeps_its_statistics_to_itself(
    tmp_path: Path, train: bool
) -> None:
    """``batch_norm`` hides an in-place update of its running statistics behind a schema
    that says it mutates nothing, so it is never taken as functional: it is decomposed."""
    torch.manual_seed(0)
    module = Cnn().train(train)
    x = torch.randn(2, 3, 8, 8)
    pt2 = export(module, tmp_path / "cnn.pt2", x, dynamic=False)
    with Pt2File(pt2) as f:
        weights = _pt2_weights(f)
        runner = ExportedRunner.from_program(f.program, weights)
    shared = {name: t.clone() for name, t in weights.items()}
    out = runner.infer({"x": ([2, 3, 8, 8], x.numpy().tobytes())})["output__0"]
    got = torch.frombuffer(bytearray(out.data), dtype=torch.float32).reshape(out.shape)
    with torch.no_grad():
        torch.testing.assert_close(got, module(x), rtol=1e-5, atol=1e-5)
    for name, tensor in weights.items():  # running_mean, running_var, num_batches_tracked
        assert torch.equal(tensor, shared[name]), name
    if train:  # the statistics moved, in the instance's own copies
        moved = runner.module.get_buffer("bn.running_mean")
        assert not torch.equal(moved, weights["bn.running_mean"])
