"""Exported programs (.pt2) deployed through the platform: weights split into the store."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import pytest

from gpufaas.shared.catalog import resolve_model_dir
from gpufaas.shared.messages import ModelSource
from gpufaas.tensorstore.service import TensorStoreService
from gpufaas.worker.models.bert import BertConfig, load_tokenizer
from tests.integration.conftest import DEMO_BODY, Platform, text_request

pytestmark = pytest.mark.integration


def exported_body(name: str, model_dir: Path) -> dict[str, Any]:
    return {"name": name, "model": {"path": str(model_dir), "architecture": "torch-export"}}


def token_request(texts: list[str]) -> dict[str, Any]:
    d = resolve_model_dir(ModelSource(builtin="all-minilm-l6-v2"))
    tok = load_tokenizer(d, BertConfig.from_model_dir(d).max_seq_length)
    enc = tok.encode_batch(texts)
    shape = [len(texts), len(enc[0].ids)]
    ids = [v for e in enc for v in e.ids]
    mask = [v for e in enc for v in e.attention_mask]
    return {
        "inputs": [
            {"name": "input_ids", "datatype": "INT64", "shape": shape, "data": ids},
            {"name": "attention_mask", "datatype": "INT64", "shape": shape, "data": mask},
        ]
    }


def store_of(platform: Platform) -> TensorStoreService:
    store = platform.services["tensorstore"]
    assert isinstance(store, TensorStoreService)
    return store


async def test_an_exported_program_shares_the_safetensors_tensors(
    platform: Platform, minilm_pt2: Path, tmp_path: Path
) -> None:
    c = platform.client
    model_dir = tmp_path / "minilm-export"
    model_dir.mkdir()
    shutil.copy(minilm_pt2, model_dir / "model.pt2")
    assert (await c.post("/v1/functions", json=DEMO_BODY)).status == 201
    store = store_of(platform).store
    stored = store.bytes_stored
    resp = await c.post("/v1/functions", json=exported_body("exported", model_dir))
    rec = await resp.json()
    assert resp.status == 201, rec
    # Same names, dtypes and bytes as model.safetensors: every tensor deduplicated.
    assert store.bytes_stored == stored
    assert rec["model_bytes"] == stored

    meta = await (await c.get("/v2/models/exported")).json()
    assert [(i["name"], i["datatype"], i["shape"]) for i in meta["inputs"]] == [
        ("input_ids", "INT64", [-1, -1]),
        ("attention_mask", "INT64", [-1, -1]),
    ]
    texts = ["an exported program", "runs over the stored tensors"]
    out = await (await c.post("/v2/models/exported/infer", json=token_request(texts))).json()
    ref = await (await c.post("/v2/models/minilm/infer", json=text_request(texts))).json()
    assert out["outputs"][0]["shape"] == ref["outputs"][0]["shape"] == [2, 384]
    assert out["outputs"][0]["data"] == pytest.approx(ref["outputs"][0]["data"], abs=1e-5)

    # A second instance starts from the stored graph and tensors: the file is not read.
    files_read = store.files_read
    assert (await c.post("/v1/functions", json=exported_body("again", model_dir))).status == 201
    assert store.files_read == files_read

    bad = await c.post("/v2/models/exported/infer", json=token_request(["x"]) | {"inputs": []})
    assert bad.status == 400


async def test_a_corrupt_program_is_refused_and_leaves_nothing(
    platform: Platform, minilm_pt2: Path, tmp_path: Path
) -> None:
    c = platform.client
    model_dir = tmp_path / "broken"
    model_dir.mkdir()
    data = await asyncio.to_thread(minilm_pt2.read_bytes)
    await asyncio.to_thread((model_dir / "model.pt2").write_bytes, data[: len(data) // 2])
    resp = await c.post("/v1/functions", json=exported_body("broken", model_dir))
    body = await resp.json()
    assert resp.status == 422, body
    assert body["code"] == "model_invalid"
    assert "model.pt2" in body["error"]
    store = store_of(platform).store
    assert (store.index, store.segments, store.leases.leases) == ({}, set(), {})
    assert (await (await c.get("/v1/functions")).json())["functions"] == []

    missing = await c.post("/v1/functions", json=exported_body("none", tmp_path))
    assert missing.status == 422
    assert "has no model.pt2" in (await missing.json())["error"]
