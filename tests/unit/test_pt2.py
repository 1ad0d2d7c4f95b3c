"""Exported programs (.pt2): split into program and weights, rebuilt without copies, run.

The MiniLM export (scripts/export_minilm.py, about 4 s) is made once per session by
tests/conftest.py, and checked against the packaged model.safetensors and the
plain-torch BertEmbedder.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch.export.pt2_archive import constants as pt2_constants

from gpufaas.shared.catalog import resolve_model_dir
from gpufaas.shared.errors import InvalidArgument, ModelInvalid
from gpufaas.shared.messages import ModelSource
from gpufaas.tensorstore import pt2_file
from gpufaas.tensorstore.pt2_file import Pt2File
from gpufaas.worker.exported import ExportedRunner, load_program
from gpufaas.worker.models.bert import BertConfig, BertEmbedder, load_tokenizer
from gpufaas.worker.runners import Runner

pytestmark = pytest.mark.unit

SENTENCES = ["A man is playing a guitar on the stage.", "Hi!", "Rivers, mountains and weather."]


class Small(torch.nn.Module):
    """A Linear, a persistent buffer, a non-persistent one and a tensor constant."""

    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(128, 64)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 64))
        self.register_buffer("shift", torch.arange(64.0), persistent=False)
        self.offset = torch.full((64,), 0.25)  # lifted as a tensor constant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.lin(x)
        return y * self.scale + self.shift + self.offset


class Strided(torch.nn.Module):
    """Weights stored as views: transposed, and a slice of a larger tensor; a dict output."""

    part: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(4, 6).t())
        self.register_buffer("part", torch.arange(20.0)[5:9])

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": x @ self.w + self.part, "total": (x * 2).sum(dim=1)}


def _export(module: torch.nn.Module, path: Path, features: int) -> Path:
    x = torch.randn(3, features)
    ep = torch.export.export(module, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(ep, path)
    return path


def _weights(f: Pt2File) -> dict[str, torch.Tensor]:
    """Entries as tensors (own writable copies: torch warns on read-only buffers)."""
    return {
        e.name: torch.frombuffer(bytearray(f.view(e)), dtype=getattr(torch, e.dtype)).reshape(
            e.shape
        )
        for e in f.entries
    }


def _raw(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _attr(module: torch.nn.Module, name: str) -> torch.Tensor:
    owner, _, leaf = name.rpartition(".")
    value = getattr(module.get_submodule(owner), leaf)
    assert isinstance(value, torch.Tensor)
    return value


def _infer(runner: ExportedRunner, **tensors: torch.Tensor) -> dict[str, torch.Tensor]:
    raw = {name: (list(t.shape), _raw(t)) for name, t in tensors.items()}
    out = runner.infer(raw)
    return {
        name: torch.frombuffer(bytearray(o.data), dtype=torch.float32).reshape(o.shape)
        for name, o in out.items()
    }


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Small, Path]:
    torch.manual_seed(0)
    module = Small().eval()
    return module, _export(module, tmp_path_factory.mktemp("small") / "small.pt2", 128)


@pytest.fixture(scope="module")
def small_split(small: tuple[Small, Path]) -> tuple[bytes, dict[str, torch.Tensor]]:
    with Pt2File(small[1]) as f:
        return f.program, _weights(f)


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return resolve_model_dir(ModelSource(builtin="all-minilm-l6-v2"))


@pytest.fixture(scope="module")
def minilm(minilm_pt2: Path) -> Iterator[tuple[Pt2File, dict[str, torch.Tensor]]]:
    with Pt2File(minilm_pt2) as f:
        yield f, _weights(f)


@pytest.fixture(scope="module")
def minilm_runner(minilm: tuple[Pt2File, dict[str, torch.Tensor]]) -> ExportedRunner:
    f, weights = minilm
    return ExportedRunner.from_program(f.program, weights)


# --- splitting and rebuilding ---------------------------------------------------------


def test_split_keeps_weights_out_of_the_program(small: tuple[Small, Path]) -> None:
    module, path = small
    expected = dict(module.state_dict()) | {"shift": module.shift, "offset": module.offset}
    with Pt2File(path) as f:
        assert {e.name for e in f.entries} == set(expected)
        for e in f.entries:
            assert (e.dtype, e.shape) == ("float32", tuple(expected[e.name].shape))
            with f.view(e) as view:
                assert view.tobytes() == _raw(expected[e.name])
        weight_bytes = sum(e.end - e.start for e in f.entries)
        assert len(f.program) < weight_bytes / 3
        assert _raw(module.lin.weight)[:256] not in f.program
        json.loads(f.program)  # the program is torch's JSON schema


def test_rebuild_runs_like_the_original_over_the_same_tensors(
    small: tuple[Small, Path], small_split: tuple[bytes, dict[str, torch.Tensor]]
) -> None:
    module, _ = small
    program, weights = small_split
    runner = ExportedRunner.from_program(program, weights)
    assert [(s.name, s.datatype, s.shape) for s in runner.inputs] == [("x", "FP32", [-1, 128])]
    assert [(s.name, s.datatype, s.shape) for s in runner.outputs] == [
        ("output__0", "FP32", [-1, 64])
    ]
    x = torch.randn(5, 128)
    out = _infer(runner, x=x)["output__0"]
    with torch.no_grad():
        torch.testing.assert_close(out, module(x), rtol=0, atol=1e-6)
    for name, tensor in weights.items():
        assert _attr(runner.module, name).data_ptr() == tensor.data_ptr(), name


# torch.export.save warns when a weight is a slice of a storage no weight covers whole; it
# then saves the whole storage with an offset, which is the case this test is about.
@pytest.mark.filterwarnings("ignore:No complete tensor found in the group:UserWarning")
def test_strided_weights_are_stored_contiguous(tmp_path: Path) -> None:
    module = Strided().eval()
    path = _export(module, tmp_path / "strided.pt2", 6)
    with Pt2File(path) as f:
        for e in f.entries:
            with f.view(e) as view:
                assert view.tobytes() == _raw(getattr(module, e.name)), e.name
        runner = ExportedRunner.from_program(f.program, _weights(f))
    assert [s.name for s in runner.outputs] == ["out", "total"]
    x = torch.randn(2, 6)
    out = _infer(runner, x=x)
    with torch.no_grad():
        torch.testing.assert_close(out["out"], module(x)["out"], rtol=0, atol=1e-6)


def test_runner_from_a_model_directory(
    tmp_path: Path, small: tuple[Small, Path], small_split: tuple[bytes, dict[str, torch.Tensor]]
) -> None:
    (tmp_path / "model.pt2").write_bytes(small[1].read_bytes())
    build: Callable[[Path, Mapping[str, torch.Tensor]], Runner] = ExportedRunner  # fits RUNNERS
    runner = build(tmp_path, small_split[1])
    assert [s.name for s in runner.inputs] == ["x"]


# --- the MiniLM export shares its weights with model.safetensors ------------------------


def test_minilm_entries_are_the_safetensors_tensors(
    minilm: tuple[Pt2File, dict[str, torch.Tensor]], model_dir: Path
) -> None:
    f, _ = minilm
    reference = load_file(str(model_dir / "model.safetensors"))
    assert sorted(e.name for e in f.entries) == sorted(reference)
    for e in f.entries:
        ref = reference[e.name]
        assert (e.dtype, e.shape) == (str(ref.dtype).removeprefix("torch."), tuple(ref.shape))
        with f.view(e) as view:
            assert view.tobytes() == _raw(ref), e.name
    assert len(f.program) < sum(e.end - e.start for e in f.entries) / 100


def test_minilm_matches_bert_embedder(
    minilm_runner: ExportedRunner,
    minilm: tuple[Pt2File, dict[str, torch.Tensor]],
    model_dir: Path,
) -> None:
    config = BertConfig.from_model_dir(model_dir)
    tokenizer = load_tokenizer(model_dir, config.max_seq_length)
    reference = BertEmbedder(load_file(str(model_dir / "model.safetensors")), config, tokenizer)
    encodings = tokenizer.encode_batch(SENTENCES)
    ids = torch.tensor([e.ids for e in encodings], dtype=torch.int64)
    mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.int64)
    out = _infer(minilm_runner, input_ids=ids, attention_mask=mask)["output__0"]
    torch.testing.assert_close(out, reference.embed(SENTENCES), rtol=0, atol=1e-5)
    one = _infer(minilm_runner, input_ids=ids[1:2, :1], attention_mask=mask[1:2, :1])
    assert list(one["output__0"].shape) == [1, 384]
    for name, tensor in minilm[1].items():
        assert _attr(minilm_runner.module, name).data_ptr() == tensor.data_ptr(), name


# --- bad files --------------------------------------------------------------------------


def _rewrite(src: Path, dst: Path, edit: Callable[[str, bytes], bytes]) -> Path:
    """A copy of a zip with each record's bytes passed through ``edit(path, data)``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, edit(info.filename.partition("/")[2], zin.read(info)))
    return dst


def _truncated(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    return dst


def _corrupt(src: Path, dst: Path) -> Path:
    data = bytearray(src.read_bytes())
    with Pt2File(src) as f:
        middle = (f.entries[0].start + f.entries[0].end) // 2
    data[middle] ^= 0xFF
    dst.write_bytes(bytes(data))
    return dst


def _not_zip(src: Path, dst: Path) -> Path:
    dst.write_bytes(b"\x00" * 100 + b"this is not a zip file")
    return dst


def _plain_zip(src: Path, dst: Path) -> Path:
    with zipfile.ZipFile(dst, "w") as z:
        z.writestr("archive/hello.txt", "hello")
    return dst


def _empty(src: Path, dst: Path) -> Path:
    dst.write_bytes(b"")
    return dst


def _complex(src: Path, dst: Path) -> Path:
    def edit(path: str, data: bytes) -> bytes:
        if path != pt2_file.WEIGHTS_CONFIG:
            return data
        doc = json.loads(data)
        doc["config"]["scale"]["tensor_meta"]["dtype"] = 10
        return json.dumps(doc).encode()

    return _rewrite(src, dst, edit)


def _pickled(src: Path, dst: Path) -> Path:
    def edit(path: str, data: bytes) -> bytes:
        if path != pt2_file.WEIGHTS_CONFIG:
            return data
        doc = json.loads(data)
        doc["config"]["scale"]["use_pickle"] = True
        return json.dumps(doc).encode()

    return _rewrite(src, dst, edit)


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (_truncated, "not a readable zip"),
        (_corrupt, "corrupt"),
        (_not_zip, "not a readable zip"),
        (_plain_zip, "archive_format"),
        (_empty, "cannot read"),
        (_complex, "unsupported dtype complex64"),
        (_pickled, "pickled"),
    ],
)
def test_bad_files_are_model_invalid_naming_the_file(
    tmp_path: Path,
    small: tuple[Small, Path],
    make: Callable[[Path, Path], Path],
    why: str,
) -> None:
    path = make(small[1], tmp_path / "bad.pt2")
    with pytest.raises(ModelInvalid) as err:
        Pt2File(path)
    assert err.value.field == "model"
    assert "bad.pt2" in err.value.message
    assert why in err.value.message


def test_a_missing_file_is_model_invalid(tmp_path: Path) -> None:
    with pytest.raises(ModelInvalid, match=r"cannot read gone\.pt2"):
        Pt2File(tmp_path / "gone.pt2")


def test_archive_layout_matches_torch() -> None:
    """The reader's record paths and dtype codes are torch's own (it does not import torch)."""
    from torch._export.serde.serialize import _TORCH_TO_SERIALIZE_DTYPE  # noqa: PLC0415

    ours = [
        pt2_file.PROGRAM_RECORD,
        pt2_file.WEIGHTS_CONFIG,
        pt2_file.CONSTANTS_CONFIG,
        pt2_file.WEIGHTS_DIR,
        pt2_file.CONSTANTS_DIR,
        pt2_file.FORMAT_RECORD,
        pt2_file.VERSION_RECORD,
        pt2_file.SUPPORTED_VERSION.decode(),
    ]
    assert ours == [
        pt2_constants.MODELS_FILENAME_FORMAT.format("model"),
        pt2_constants.WEIGHTS_CONFIG_FILENAME_FORMAT.format("model"),
        pt2_constants.CONSTANTS_CONFIG_FILENAME_FORMAT.format("model"),
        pt2_constants.WEIGHTS_DIR,
        pt2_constants.CONSTANTS_DIR,
        pt2_constants.ARCHIVE_FORMAT_PATH,
        pt2_constants.ARCHIVE_VERSION_PATH,
        pt2_constants.ARCHIVE_VERSION_VALUE,
    ]
    for code, (name, size) in pt2_file.SCALAR_TYPES.items():
        dtype = getattr(torch, name)
        assert (int(_TORCH_TO_SERIALIZE_DTYPE[dtype]), dtype.itemsize) == (code, size)


# --- bad weights and programs at rebuild -------------------------------------------------


def _edited(weights: dict[str, torch.Tensor], name: str, how: str) -> dict[str, torch.Tensor]:
    out = dict(weights)
    if how == "missing":
        del out[name]
    elif how == "extra":
        out[name] = torch.zeros(1)
    elif how == "dtype":
        out[name] = out[name].double()
    else:
        out[name] = out[name][:-1]
    return out


@pytest.mark.parametrize(
    ("name", "how", "why"),
    [
        ("lin.bias", "missing", "missing"),
        ("stray.weight", "extra", "not used"),
        ("scale", "dtype", "dtype torch.float64"),
        ("offset", "shape", "shape (63,)"),
    ],
)
def test_rebuild_with_wrong_weights_names_the_tensor(
    small_split: tuple[bytes, dict[str, torch.Tensor]], name: str, how: str, why: str
) -> None:
    program, weights = small_split
    with pytest.raises(ModelInvalid) as err:
        load_program(program, _edited(weights, name, how))
    assert err.value.field == "model"
    assert repr(name) in err.value.message
    assert why in err.value.message


def _first(doc: Any, key: str) -> dict[str, Any]:
    """The first dict (depth first) that has ``key``."""
    if isinstance(doc, dict):
        if key in doc:
            return doc
        items: list[Any] = list(doc.values())
    elif isinstance(doc, list):
        items = doc
    else:
        items = []
    for item in items:
        found = _first(item, key)
        if found:
            return found
    return {}


@pytest.mark.parametrize(
    ("key", "value", "why"),
    [
        ("target", "builtins.eval", "calls 'builtins.eval'"),
        ("target", "torch.ops.aten.save.default", "not allowed"),
        ("expr_str", "__import__('os').system('true')", "not plain arithmetic"),
        ("parameter_name", 'lin"); import os; ("', "invalid name"),
    ],
)
def test_programs_that_would_run_code_are_refused(
    small_split: tuple[bytes, dict[str, torch.Tensor]], key: str, value: str, why: str
) -> None:
    program, weights = small_split
    doc = json.loads(program)
    holder = _first(doc, key)
    assert holder, key  # the dynamic batch size gives the program a symbolic expression
    holder[key] = value
    with pytest.raises(ModelInvalid, match=why):
        load_program(json.dumps(doc).encode(), weights)


# --- bad inputs -----------------------------------------------------------------------


def test_infer_checks_inputs_against_the_signature(
    small_split: tuple[bytes, dict[str, torch.Tensor]],
) -> None:
    runner = ExportedRunner.from_program(*small_split)
    good = _raw(torch.zeros(2, 128))
    cases = [
        ({"x": ([2, 128, 1], good)}, "inputs[x].shape"),
        ({"x": ([2, 127], good)}, "inputs[x].shape"),
        ({"x": ([2, 128], good[:-4])}, "inputs[x].data"),
        ({}, "inputs[x]"),
        ({"x": ([2, 128], good), "y": ([1], b"\x00" * 4)}, "inputs[y]"),
    ]
    for inputs, field in cases:
        with pytest.raises(InvalidArgument) as err:
            runner.infer(inputs)
        assert err.value.field == field, inputs.keys()


def test_minilm_inputs_must_agree_and_fit(minilm_runner: ExportedRunner) -> None:
    ids = torch.ones(2, 4, dtype=torch.int64)
    with pytest.raises(InvalidArgument, match="must equal input_ids dimension 0") as err:
        minilm_runner.infer(
            {
                "input_ids": ([2, 4], _raw(ids)),
                "attention_mask": ([3, 4], _raw(ids[:1].repeat(3, 1))),
            }
        )
    assert err.value.field == "inputs[attention_mask].shape"
    long = torch.ones(1, 513, dtype=torch.int64)
    with pytest.raises(InvalidArgument, match="must be at most 512"):
        minilm_runner.infer(
            {"input_ids": ([1, 513], _raw(long)), "attention_mask": ([1, 513], _raw(long))}
        )
