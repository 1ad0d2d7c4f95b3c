"""Unit tests of the worker's BERT embedding runner over the packaged demo weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch
from safetensors.torch import load_file

from gpufaas.shared.catalog import DEMO_MODEL, resolve_model_dir
from gpufaas.shared.errors import InvalidArgument, ModelInvalid
from gpufaas.shared.messages import ModelSource, TensorSpec
from gpufaas.shared.tensors import encode_bytes_elements
from gpufaas.worker.runners import RUNNERS, BertEmbeddingRunner, merge, sample_inputs, split

pytestmark = pytest.mark.unit

DIM = 384
TEXTS = [
    "A man is playing a guitar on the stage.",
    "Someone is strumming a guitar in front of an audience.",
    "The central bank raised interest rates by half a percent.",
]


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return resolve_model_dir(ModelSource(builtin=DEMO_MODEL))


@pytest.fixture(scope="module")
def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "model.safetensors")


@pytest.fixture(scope="module")
def runner(model_dir: Path, weights: dict[str, torch.Tensor]) -> BertEmbeddingRunner:
    return BertEmbeddingRunner(model_dir, weights)


def _embed(runner: BertEmbeddingRunner, texts: list[str]) -> npt.NDArray[np.float32]:
    raw = encode_bytes_elements([t.encode() for t in texts])
    out = runner.infer({"text": ([len(texts)], raw)})
    assert list(out) == ["embedding"]
    emb = out["embedding"]
    assert emb.datatype == "FP32"
    assert emb.shape == [len(texts), DIM]
    assert len(emb.data) == len(texts) * DIM * 4
    return np.frombuffer(emb.data, dtype="<f4").reshape(emb.shape)


def test_signature(runner: BertEmbeddingRunner) -> None:
    assert runner.inputs == [TensorSpec(name="text", datatype="BYTES", shape=[-1])]
    assert runner.outputs == [TensorSpec(name="embedding", datatype="FP32", shape=[-1, DIM])]
    assert RUNNERS["bert-embedding"] is BertEmbeddingRunner


def test_infer_gives_unit_norm_rows(runner: BertEmbeddingRunner) -> None:
    emb = _embed(runner, TEXTS)
    assert np.all(np.isfinite(emb))
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    sims = emb @ emb.T
    assert sims[0, 1] > sims[0, 2] + 0.2  # paraphrases are closer than unrelated text
    assert sims[0, 1] > sims[1, 2] + 0.2


def test_rows_do_not_depend_on_the_batch(runner: BertEmbeddingRunner) -> None:
    batch = _embed(runner, TEXTS)
    single = _embed(runner, [TEXTS[2]])
    np.testing.assert_allclose(single[0], batch[2], atol=1e-5)


def test_empty_batch(runner: BertEmbeddingRunner) -> None:
    out = runner.infer({"text": ([0], b"")})
    assert out["embedding"].shape == [0, DIM]
    assert out["embedding"].data == b""


def test_non_utf8_text_is_invalid_argument(runner: BertEmbeddingRunner) -> None:
    raw = encode_bytes_elements([b"fine", b"\xff\xfe broken"])
    with pytest.raises(InvalidArgument, match="element 1 is not UTF-8") as info:
        runner.infer({"text": ([2], raw)})
    assert info.value.field == "inputs[text]"


def test_element_count_mismatch_is_invalid_argument(runner: BertEmbeddingRunner) -> None:
    raw = encode_bytes_elements([b"one", b"two"])
    with pytest.raises(InvalidArgument, match="expected 3 BYTES elements, got 2") as info:
        runner.infer({"text": ([3], raw)})
    assert info.value.field == "inputs[text].data"
    with pytest.raises(InvalidArgument, match="truncated") as info:
        runner.infer({"text": ([2], raw[:-1])})
    assert info.value.field == "inputs[text].data"


def test_runner_borrows_the_weights(
    runner: BertEmbeddingRunner, weights: dict[str, torch.Tensor]
) -> None:
    ptrs = runner.model.weight_data_ptrs()
    assert ptrs
    assert all(weights[name].data_ptr() == ptr for name, ptr in ptrs.items())


def test_missing_weights_are_model_invalid(model_dir: Path) -> None:
    with pytest.raises(ModelInvalid, match="is missing") as info:
        BertEmbeddingRunner(model_dir, {})
    assert info.value.field == "model"


def test_merged_requests_give_each_its_own_rows(runner: BertEmbeddingRunner) -> None:
    requests = [
        {"text": ([n], encode_bytes_elements([t.encode() for t in TEXTS[:n]]))} for n in (1, 3, 2)
    ]
    merged = merge(requests)
    assert merged["text"][0] == [6]
    parts = split(runner.infer(merged), [1, 3, 2])
    for req, part in zip(requests, parts, strict=True):
        alone = runner.infer(req)["embedding"]
        assert part["embedding"].shape == alone.shape
        got = np.frombuffer(part["embedding"].data, dtype=np.float32)
        np.testing.assert_allclose(got, np.frombuffer(alone.data, dtype=np.float32), atol=1e-5)


def test_requests_of_other_trailing_shapes_do_not_merge() -> None:
    with pytest.raises(InvalidArgument):
        merge([{"x": ([1, 2], b"\0" * 8)}, {"x": ([1, 3], b"\0" * 12)}])


def test_sample_inputs_have_the_batch_rows(runner: BertEmbeddingRunner) -> None:
    out = runner.infer(runner.sample(4))
    assert out["embedding"].shape == [4, DIM]
    zeros = sample_inputs([TensorSpec(name="x", datatype="FP32", shape=[-1, 3])], 2)
    assert zeros == {"x": ([2, 3], bytes(24))}
