"""The OpenAI-compatible front end's pure parts: the error shape, which functions are
embedding functions, token counts, and the autoscaler forgetting activity before a
repository load or unload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpufaas.gateway.openai_api import embedding_io, openai_error
from gpufaas.gateway.token_counts import TokenCounter, max_seq_length
from gpufaas.scheduler.autoscale import Autoscaler, FunctionLoad
from gpufaas.shared.catalog import resolve_model_dir
from gpufaas.shared.errors import InvalidArgument
from gpufaas.shared.messages import FunctionRecord, FunctionSpec, ModelSource, TensorSpec
from gpufaas.worker.models.bert import BertConfig, load_tokenizer

pytestmark = pytest.mark.unit

MINILM = ModelSource(builtin="all-minilm-l6-v2")


def record(inputs: list[TensorSpec], outputs: list[TensorSpec]) -> FunctionRecord:
    return FunctionRecord(
        spec=FunctionSpec(name="f", model=MINILM),
        inputs=inputs,
        outputs=outputs,
        model_bytes=0,
        tensor_count=0,
        nodes=[],
        created_at=0,
    )


def test_errors_take_openai_shape() -> None:
    body = {"code": "not_found", "error": "model 'x' not found", "field": "model_name"}
    assert openai_error(body, 404) == {
        "error": {
            "message": "model 'x' not found",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }
    worker = openai_error({"code": "invalid_argument", "error": "e", "field": "inputs[text]"}, 400)
    assert worker["error"]["param"] == "input"
    busy = openai_error({"code": "overloaded", "error": "slow down"}, 429)["error"]
    assert (busy["type"], busy["code"], busy["param"]) == ("requests", "rate_limit_exceeded", None)
    assert (
        openai_error({"code": "internal", "error": "bug"}, 500)["error"]["type"] == "server_error"
    )


def test_only_text_to_fp32_matrix_functions_embed() -> None:
    text = TensorSpec(name="text", datatype="BYTES", shape=[-1])
    emb = TensorSpec(name="embedding", datatype="FP32", shape=[-1, 384])
    assert embedding_io(record([text], [emb])) == ("text", "embedding", 384)
    others = [
        ([TensorSpec(name="x", datatype="FP32", shape=[-1, 4])], [emb]),
        ([text], [TensorSpec(name="y", datatype="FP16", shape=[-1, 384])]),
        ([text], [TensorSpec(name="y", datatype="FP32", shape=[-1])]),
        ([text], [emb, emb]),
        ([text, text], [emb]),
    ]
    for ins, outs in others:
        with pytest.raises(InvalidArgument) as err:
            embedding_io(record(ins, outs))
        assert err.value.field == "model"


def test_token_counts_match_the_workers_tokenizer(tmp_path: Path) -> None:
    model_dir = resolve_model_dir(MINILM)
    cfg = BertConfig.from_model_dir(model_dir)
    assert max_seq_length(model_dir) == cfg.max_seq_length == 256
    worker = load_tokenizer(model_dir, cfg.max_seq_length)
    texts = ["hello world", "", "word " * 1000]
    want = sum(sum(e.attention_mask) for e in worker.encode_batch(texts))
    counter = TokenCounter(tmp_path)
    spec = FunctionSpec(name="f", model=MINILM)
    assert counter.count_blocking(spec, texts) == want
    # A model whose directory this node does not hold: unknown, not a guess.
    upload = FunctionSpec(name="g", model=ModelSource(upload="a" * 64))
    assert counter.count_blocking(upload, texts) is None


def test_max_seq_length_defaults_as_the_worker(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 128}))
    assert max_seq_length(tmp_path) == 128  # 512 capped by the positions
    (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64}))
    assert max_seq_length(tmp_path) == 64


def test_autoscaler_forgets_activity_before_a_rescale() -> None:
    scaler = Autoscaler(keep_alive_s=60, scale_down_delay_s=0)
    scaler.observe("t.f", 100.0)
    idle = FunctionLoad("t.f", 0, 0, 0, 4, 0.0)
    # Unloaded at 101: the arrival at 100 no longer brings an instance back.
    assert scaler.decide(100.5, [idle])["t.f"].desired == 1
    scaler.forget_before("t.f", 101.0)
    assert scaler.decide(102.0, [idle])["t.f"].desired == 0
    # Loaded at 200: its keep-alive starts from the instance it has then.
    scaler.forget_before("t.f", 200.0)
    one = FunctionLoad("t.f", 1, 0, 0, 4, 0.0)
    assert scaler.decide(200.0, [one])["t.f"].desired == 1
    assert scaler.decide(259.0, [one])["t.f"].desired == 1
    assert scaler.decide(261.0, [one])["t.f"].desired == 0
    scaler.forget_before("t.f", 100.0)  # older than what it knows: kept
    assert scaler.tracked() == 1
