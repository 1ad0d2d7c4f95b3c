"""Architectures a worker can build, each over tensors it does not own (no weight copies).

A runner turns decoded inputs into outputs; ``RUNNERS`` maps an architecture name
(``ModelSource.architecture``) to the function that builds one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import tokenizers
import torch

from gpufaas.shared.errors import InvalidArgument, ModelInvalid
from gpufaas.shared.messages import TensorSpec
from gpufaas.shared.tensors import decode_bytes_elements
from gpufaas.worker.models.bert import (
    BertConfig,
    BertEmbedder,
    ModelFormatError,
    load_tokenizer,
)


@dataclass(frozen=True, slots=True)
class Output:
    """One output tensor as raw little-endian bytes (a view of the result, not a copy:
    the worker copies it once, into a message or a tube)."""

    datatype: str
    shape: list[int]
    data: bytes | memoryview


class Runner(Protocol):
    """A built model instance."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def infer(self, inputs: Mapping[str, tuple[list[int], bytes]]) -> dict[str, Output]: ...


_TOKENIZERS: dict[tuple[str, int, int, int], tokenizers.Tokenizer] = {}


def shared_tokenizer(model_dir: Path, max_seq_length: int) -> tokenizers.Tokenizer:
    """One tokenizer per tokenizer file and length, shared by the instances of a worker.

    Parsing tokenizer.json costs ~18 ms and ~6 MiB: as much as building the rest of an
    instance over resident tensors. Instances share it safely: each device's model work
    runs on that device's single executor thread.
    """
    path = model_dir / "tokenizer.json"
    try:
        st = path.stat()
    except OSError:
        return load_tokenizer(model_dir, max_seq_length)  # let it report the missing file
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, max_seq_length)
    tok = _TOKENIZERS.get(key)
    if tok is None:
        tok = _TOKENIZERS[key] = load_tokenizer(model_dir, max_seq_length)
    return tok


class BertEmbeddingRunner:
    """Sentence embeddings: ``text`` (BYTES [N]) -> ``embedding`` (FP32 [N, dim])."""

    def __init__(self, model_dir: Path, weights: Mapping[str, torch.Tensor]) -> None:
        try:
            config = BertConfig.from_model_dir(model_dir)
            self.model = BertEmbedder(
                weights, config, shared_tokenizer(model_dir, config.max_seq_length)
            )
        except ModelFormatError as exc:
            raise ModelInvalid(str(exc), field="model") from None
        self.inputs = [TensorSpec(name="text", datatype="BYTES", shape=[-1])]
        self.outputs = [TensorSpec(name="embedding", datatype="FP32", shape=[-1, self.model.dim])]

    def infer(self, inputs: Mapping[str, tuple[list[int], bytes]]) -> dict[str, Output]:
        shape, raw = inputs["text"]
        if len(shape) != 1:
            raise InvalidArgument(
                f"text must have shape [N], got {shape}", field="inputs[text].shape"
            )
        texts = []
        for i, item in enumerate(decode_bytes_elements(raw, shape[0], field="inputs[text].data")):
            try:
                texts.append(item.decode("utf-8"))
            except UnicodeDecodeError:
                raise InvalidArgument(
                    f"text element {i} is not UTF-8", field="inputs[text]"
                ) from None
        emb = self.model.embed(texts).numpy().astype(np.float32, copy=False)
        data = np.ascontiguousarray(emb).reshape(-1).view(np.uint8).data
        return {"embedding": Output("FP32", list(emb.shape), data)}


RUNNERS: dict[str, Callable[[Path, Mapping[str, torch.Tensor]], Runner]] = {
    "bert-embedding": BertEmbeddingRunner,
}
