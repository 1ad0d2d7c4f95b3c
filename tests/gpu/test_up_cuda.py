"""`gpufaas up --demo --devices auto` on a real GPU: the whole platform as users start it.

The node's worker is the pool (spares create their CUDA context up front), the store's
device tier holds the model's GPU copy, and instances map it by IPC handle. Answers are
checked against the same model run on the CPU in this process.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch

from gpufaas.launch import Up
from gpufaas.shared.catalog import resolve_model_dir
from gpufaas.shared.messages import ModelSource
from gpufaas.worker.models.bert import BertConfig, BertEmbedder, load_tokenizer
from tests.e2e.test_up import http

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine"),
]

TEXTS = ["a request served from the GPU", "and a second, somewhat longer sentence"]


def cpu_reference(texts: list[str]) -> torch.Tensor:
    d = resolve_model_dir(ModelSource(builtin="all-minilm-l6-v2"))
    cfg = BertConfig.from_model_dir(d)
    weights = safetensors.torch.load_file(d / "model.safetensors")
    return BertEmbedder(weights, cfg, load_tokenizer(d, cfg.max_seq_length)).embed(texts)


def infer(up: Up, name: str) -> tuple[torch.Tensor, dict[str, object]]:
    body = {"inputs": [{"name": "text", "shape": [len(TEXTS)], "datatype": "BYTES", "data": TEXTS}]}
    status, reply = http(up, f"{up.url}/v2/models/{name}/infer", body)
    assert status == 200, reply
    out = reply["outputs"][0]
    return torch.tensor(out["data"]).reshape(out["shape"]), reply.get("parameters", {})


def test_up_on_the_gpu_answers_like_the_cpu(tmp_path: Path) -> None:
    up = Up.start(tmp_path / "data", "--demo", "--devices", "auto")
    try:
        up.wait_ready(300)
        node = http(up, f"{up.url}/v1/nodes")[1]["nodes"][0]
        assert "gpu:0" in node["tensor_store"], node
        got, params = infer(up, "minilm")
        assert (got - cpu_reference(TEXTS)).abs().max().item() <= 1e-4
        assert params["device"] == "gpu:0", params
        tier = http(up, f"{up.url}/v1/nodes")[1]["nodes"][0]["tensor_store"]["gpu:0"]
        assert tier["bytes_stored"] > 0  # the model's one device copy
    finally:
        assert up.stop() == 0
