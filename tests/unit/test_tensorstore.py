"""Unit tests of the tensor store's host tier (HostStore) and its safetensors reader.

Each test uses its own tmp_path as the shared-memory root and small safetensors files.
"""

from __future__ import annotations

import itertools
import json
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from gpufaas.shared.constants import SEGMENT_ALIGN
from gpufaas.shared.errors import ModelInvalid
from gpufaas.shared.shm import TENSORS_DIR, SegmentCache
from gpufaas.tensorstore.safetensors_file import SafetensorsFile
from gpufaas.tensorstore.store import HostStore, tensor_id

pytestmark = pytest.mark.unit

NODE = "node-a"


def _base_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(3, generator=g),  # 12 bytes: forces alignment padding
        "b": torch.arange(10, dtype=torch.int64),  # 80 bytes
        "c": torch.randn(5, 7, generator=g),  # 140 bytes
        "d": torch.tensor([True, False, True]),  # 3 bytes
        "e": torch.randn(2, 3, generator=g).to(torch.float16),  # 12 bytes
    }


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file(tensors, str(path))
    return path


def _store_files(store: HostStore) -> list[str]:
    """Segments, their indexes and model manifests (as models/<key>.json)."""
    if not store.dir.exists():
        return []
    return sorted(str(p.relative_to(store.dir)) for p in store.dir.rglob("*") if p.is_file())


@pytest.fixture
def store(tmp_path: Path) -> HostStore:
    s = HostStore(tmp_path / "shm", NODE)
    s.recover()
    return s


def test_register_stores_each_tensor_once(store: HostStore, tmp_path: Path) -> None:
    tensors = _base_tensors()
    total = sum(_nbytes(t) for t in tensors.values())
    reg = store.register_file(_save(tmp_path / "base.safetensors", tensors))
    assert reg.model_bytes == total
    assert reg.bytes_stored == total
    assert reg.bytes_deduplicated == 0
    assert set(reg.manifest) == set(tensors)
    assert store.bytes_stored == total
    assert store.bytes_requested == total
    assert len(store.index) == len(tensors)
    [seg] = store.segments
    [manifest] = [f for f in _store_files(store) if f.startswith("models/")]
    assert _store_files(store) == sorted([seg, f"{seg}.idx.json", manifest])
    for name, t in tensors.items():
        ref = reg.manifest[name]
        assert ref.dtype == str(t.dtype).removeprefix("torch.")
        assert ref.shape == list(t.shape)
        assert ref.nbytes == _nbytes(t)
        assert ref.segment == f"{TENSORS_DIR}/{NODE}/{seg}"
        assert store.index[ref.id] == ref


def test_registering_the_same_file_again_stores_nothing(store: HostStore, tmp_path: Path) -> None:
    tensors = _base_tensors()
    path = _save(tmp_path / "base.safetensors", tensors)
    first = store.register_file(path)
    files = _store_files(store)
    again = store.register_file(path)
    copy = store.register_file(_save(tmp_path / "copy.safetensors", tensors))
    for reg in (again, copy):
        assert reg.bytes_stored == 0
        assert reg.bytes_deduplicated == reg.model_bytes == first.model_bytes
        assert reg.manifest == first.manifest
    segments = [f for f in _store_files(store) if not f.startswith("models/")]
    assert segments == [f for f in files if not f.startswith("models/")]  # not even an empty one
    assert store.bytes_stored == first.model_bytes
    assert store.bytes_requested == 3 * first.model_bytes
    # The same file again was answered from its manifest without being read; the copy
    # (another file) was read and hashed, and got a manifest of its own.
    assert (first.file_read, again.file_read, copy.file_read) == (True, False, True)
    assert store.files_read == 2


def test_resident_model_manifest_survives_a_restart(store: HostStore, tmp_path: Path) -> None:
    path = _save(tmp_path / "base.safetensors", _base_tensors())
    first = store.register_file(path)
    fresh = HostStore(store.root, NODE)
    fresh.recover()
    again = fresh.register_file(path)
    assert not again.file_read
    assert again.manifest == first.manifest


def test_a_changed_file_is_read_again(store: HostStore, tmp_path: Path) -> None:
    tensors = _base_tensors()
    path = _save(tmp_path / "base.safetensors", tensors)
    store.register_file(path)
    tensors["extra"] = torch.ones(3)
    _save(path, tensors)  # same path, new contents
    reg = store.register_file(path)
    assert reg.file_read
    assert "extra" in reg.manifest


def test_fine_tuned_variant_stores_only_the_changed_tensor(
    store: HostStore, tmp_path: Path
) -> None:
    base = _base_tensors()
    base_reg = store.register_file(_save(tmp_path / "base.safetensors", base))
    tuned = dict(base)
    tuned["c"] = base["c"] + 0.01
    reg = store.register_file(_save(tmp_path / "tuned.safetensors", tuned))
    changed = _nbytes(tuned["c"])
    assert reg.bytes_stored == changed
    assert reg.bytes_deduplicated == reg.model_bytes - changed
    for name in ("a", "b", "d", "e"):
        assert reg.manifest[name] == base_reg.manifest[name]
    assert reg.manifest["c"].id != base_reg.manifest["c"].id
    assert reg.manifest["c"].segment != base_reg.manifest["c"].segment
    assert reg.manifest["c"].offset == 0  # the new segment holds only that tensor
    assert len(store.segments) == 2
    assert store.bytes_stored == base_reg.model_bytes + changed
    new_seg = reg.manifest["c"].segment.rsplit("/", 1)[1]
    assert (store.dir / new_seg).stat().st_size == changed


def test_duplicate_tensors_inside_one_file_are_stored_once(
    store: HostStore, tmp_path: Path
) -> None:
    t = torch.randn(4, 4)
    reg = store.register_file(_save(tmp_path / "tied.safetensors", {"x": t, "y": t.clone()}))
    assert reg.model_bytes == 2 * _nbytes(t)
    assert reg.bytes_stored == _nbytes(t)
    assert reg.bytes_deduplicated == _nbytes(t)
    assert reg.manifest["x"] == reg.manifest["y"]


def test_tensor_id_depends_on_dtype_and_shape(store: HostStore, tmp_path: Path) -> None:
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    raw = memoryview(_raw(t))
    ids = {
        tensor_id("float32", (2, 3), raw),
        tensor_id("float32", (3, 2), raw),
        tensor_id("float32", (6,), raw),
        tensor_id("int32", (2, 3), raw),
    }
    assert len(ids) == 4
    assert tensor_id("float32", (2, 3), raw) == tensor_id("float32", (2, 3), memoryview(bytes(raw)))

    first = store.register_file(_save(tmp_path / "a.safetensors", {"w": t}))
    reshaped = store.register_file(_save(tmp_path / "b.safetensors", {"w": t.reshape(3, 2)}))
    as_int = store.register_file(_save(tmp_path / "c.safetensors", {"w": t.view(torch.int32)}))
    assert _raw(t.reshape(3, 2)) == _raw(t.view(torch.int32)) == _raw(t)
    for reg in (reshaped, as_int):
        assert reg.bytes_stored == 24
        assert reg.bytes_deduplicated == 0
    assert len({first.manifest["w"].id, reshaped.manifest["w"].id, as_int.manifest["w"].id}) == 3
    assert reshaped.manifest["w"].shape == [3, 2]
    assert as_int.manifest["w"].dtype == "int32"


def test_segment_bytes_match_the_original_tensors(store: HostStore, tmp_path: Path) -> None:
    tensors = _base_tensors()
    reg = store.register_file(_save(tmp_path / "base.safetensors", tensors))
    cache = SegmentCache(store.root)
    seen: list[tuple[int, int]] = []
    for name, t in tensors.items():
        ref = reg.manifest[name]
        assert ref.offset % SEGMENT_ALIGN == 0
        data = (store.root / ref.segment).read_bytes()
        assert data[ref.offset : ref.offset + ref.nbytes] == _raw(t)
        mapped = cache.map(ref.segment)
        assert mapped[ref.offset : ref.offset + ref.nbytes] == _raw(t)
        seen.append((ref.offset, ref.offset + ref.nbytes))
    seen.sort()
    assert all(end <= start for (_, end), (start, _) in itertools.pairwise(seen))
    [seg] = store.segments
    cache.map(f"{TENSORS_DIR}/{NODE}/{seg}").close()


def test_recover_rebuilds_the_same_index(tmp_path: Path) -> None:
    root = tmp_path / "shm"
    store = HostStore(root, NODE)
    store.recover()
    base = _base_tensors()
    store.register_file(_save(tmp_path / "base.safetensors", base))
    tuned = dict(base, c=base["c"] * 2)
    store.register_file(_save(tmp_path / "tuned.safetensors", tuned))
    files = _store_files(store)

    fresh = HostStore(root, NODE)
    fresh.recover()
    assert fresh.index == store.index
    assert fresh.segments == store.segments
    assert fresh.bytes_stored == store.bytes_stored
    assert _store_files(fresh) == files
    reg = fresh.register_file(tmp_path / "tuned.safetensors")
    assert reg.bytes_stored == 0  # everything found through the rebuilt index
    # A store of another node on the same root sees nothing of this one.
    other = HostStore(root, "node-b")
    other.recover()
    assert other.index == {}


def test_recover_removes_orphans_and_temp_files(tmp_path: Path) -> None:
    root = tmp_path / "shm"
    store = HostStore(root, NODE)
    store.recover()
    reg = store.register_file(_save(tmp_path / "base.safetensors", _base_tensors()))
    kept = _store_files(store)
    (store.dir / "orphan-seg").write_bytes(b"x" * 100)  # crashed before its index was written
    (store.dir / ".orphan-seg.123.tmp").write_bytes(b"half")  # crashed mid-write
    (store.dir / ".seg.idx.json.9.tmp").write_bytes(b"[")
    (store.dir / "gone.idx.json").write_bytes(b"[]")  # index whose segment is missing

    fresh = HostStore(root, NODE)
    fresh.recover()
    assert _store_files(fresh) == kept
    assert fresh.index == store.index
    assert all(fresh.index[ref.id] == ref for ref in reg.manifest.values())
    assert "orphan-seg" not in fresh.segments
    assert "gone" not in fresh.segments


# --- bad input -----------------------------------------------------------------------


def _header_file(header: Any, data: bytes = b"", hlen: int | None = None) -> bytes:
    body = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(body) if hlen is None else hlen) + body + data


def _truncated(tmp_path: Path) -> bytes:
    good = _save(tmp_path / "good.safetensors", _base_tensors()).read_bytes()
    return good[:-5]


def _no_tensors(tmp_path: Path) -> bytes:
    return _save(tmp_path / "empty.safetensors", {}).read_bytes()


BAD_FILES: dict[str, tuple[Callable[[Path], bytes], str]] = {
    "truncated": (_truncated, "truncated or wrong"),
    "empty-file": (lambda _: b"", "cannot read"),
    "shorter-than-8": (lambda _: b"\x10\x00\x00", "shorter than its 8-byte header length"),
    "header-length-too-large": (
        lambda _: _header_file(b"{}", hlen=10_000),
        "header length 10000 exceeds the file size",
    ),
    "header-length-huge": (lambda _: _header_file(b"{}", hlen=2**63), "exceeds the file size"),
    "non-json-header": (lambda _: _header_file(b"not json at all"), "header is not JSON"),
    "non-utf8-header": (lambda _: _header_file(b'{"\xff": 1}'), "header is not JSON"),
    "header-not-object": (lambda _: _header_file([1, 2]), "header is not a JSON object"),
    "unsupported-dtype": (
        lambda _: _header_file(
            {"w": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}, b"\0\0"
        ),
        "tensor 'w' has unsupported dtype 'F8_E4M3'",
    ),
    "missing-offsets": (
        lambda _: _header_file({"w": {"dtype": "F32", "shape": [1]}}, b"\0" * 4),
        "tensor 'w' lacks dtype/shape/data_offsets",
    ),
    "size-mismatch": (
        lambda _: _header_file(
            {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 8
        ),
        "truncated or wrong",
    ),
    "no-tensors": (_no_tensors, "holds no tensors"),
    "metadata-only": (
        lambda _: _header_file({"__metadata__": {"format": "pt"}}),
        "holds no tensors",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_files_raise_model_invalid_and_store_nothing(
    case: str, store: HostStore, tmp_path: Path
) -> None:
    store.register_file(_save(tmp_path / "base.safetensors", _base_tensors()))
    before_files, before_index = _store_files(store), dict(store.index)
    before_requested = store.bytes_requested
    make, message = BAD_FILES[case]
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(make(tmp_path))

    with pytest.raises(ModelInvalid, match=message) as info:
        store.register_file(path)
    assert info.value.field == "model"
    assert path.name in info.value.message
    assert _store_files(store) == before_files
    assert store.index == before_index
    assert store.bytes_requested == before_requested


def test_missing_file_is_model_invalid(store: HostStore, tmp_path: Path) -> None:
    with pytest.raises(ModelInvalid, match="cannot read"):
        store.register_file(tmp_path / "nope.safetensors")
    assert _store_files(store) == []


def test_safetensors_file_views_without_copying(tmp_path: Path) -> None:
    tensors = _base_tensors()
    f = SafetensorsFile(_save(tmp_path / "m.safetensors", tensors))
    try:
        assert {e.name for e in f.entries} == set(tensors)
        for e in f.entries:
            t = tensors[e.name]
            assert e.dtype == str(t.dtype).removeprefix("torch.")
            assert e.shape == tuple(t.shape)
            view = f.view(e)
            assert view.readonly
            assert bytes(view) == _raw(t)
            view.release()
    finally:
        f.close()


@pytest.mark.parametrize(
    "meta",
    [
        {"dtype": "F32", "shape": [1], "data_offsets": ["0", "4"]},  # TypeError
        {"dtype": "F32", "shape": ["a"], "data_offsets": [0, 4]},  # ValueError
        {"dtype": "F32", "shape": 1, "data_offsets": [0, 4]},  # TypeError
        {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]},  # TypeError (unhashable)
        {"dtype": "F32", "shape": [-1, -1], "data_offsets": [0, 4]},  # accepted
        {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]},  # accepted
        {"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4.0]},  # accepted
    ],
    ids=[
        "str-offsets",
        "str-dim",
        "int-shape",
        "list-dtype",
        "negative-dims",
        "float-dim",
        "float-offsets",
    ],
)
def test_malformed_header_types_raise_model_invalid(
    meta: dict[str, Any], store: HostStore, tmp_path: Path
) -> None:
    path = tmp_path / "odd.safetensors"
    path.write_bytes(_header_file({"w": meta}, b"\0" * 4))
    with pytest.raises(ModelInvalid):
        store.register_file(path)


def test_the_store_process_does_not_import_torch() -> None:
    # torch costs a node ~180 MiB; the store needs it only to copy to a real GPU.
    code = "import sys, gpufaas.tensorstore.service; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "False"
