"""Architectures a worker can build, each over tensors it does not own (no weight copies).

A runner turns decoded inputs into outputs; ``RUNNERS`` maps an architecture name
(``ModelSource.architecture``) to the function that builds one.
"""

from __future__ import annotations

import contextlib
import ctypes
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import tokenizers
import torch

from gpufaas.shared.errors import Internal, InvalidArgument, ModelInvalid
from gpufaas.shared.messages import TensorSpec
from gpufaas.shared.tensors import (
    decode_bytes_elements,
    element_count,
    encode_bytes_elements,
    raw_nbytes,
)
from gpufaas.worker.models.bert import (
    BertConfig,
    BertEmbedder,
    ModelFormatError,
    load_tokenizer,
    warm_up,
)


@dataclass(frozen=True, slots=True)
class Output:
    """One output tensor as raw little-endian bytes (a view of the result, not a copy:
    the worker copies it once, into a message or a tube)."""

    datatype: str
    shape: list[int]
    data: bytes | memoryview


Inputs = Mapping[str, tuple[list[int], bytes]]  # name -> (shape, raw little-endian bytes)


class Runner(Protocol):
    """A built model instance.

    A runner is ``batchable`` when every input and output has the batch as its first
    dimension and rows are independent: requests can then be concatenated into one batch
    (:func:`merge`) and the outputs cut back per request (:func:`split`).
    """

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    batchable: bool

    def infer(self, inputs: Inputs) -> dict[str, Output]: ...

    def sample(self, batch: int) -> Inputs:
        """Typical inputs of ``batch`` rows, for profiling."""
        ...


def rows(inputs: Inputs) -> int:
    """The batch rows of a request (the first dimension of its first input; 1 if scalar)."""
    shape = next(iter(inputs.values()))[0] if inputs else []
    return shape[0] if shape else 1


def merge(requests: Sequence[Inputs]) -> Inputs:
    """One batch from several requests: each input concatenated along its first dimension.

    Raw bytes concatenate as they are (``BYTES`` elements are length-prefixed, fixed-size
    types are row-major). Raises ``InvalidArgument`` when the requests' trailing
    dimensions differ, which the caller answers by running them one at a time.
    """
    first = requests[0]
    out: dict[str, tuple[list[int], bytes]] = {}
    for name, (shape, _) in first.items():
        parts = [r[name] for r in requests]
        if any(len(s) != len(shape) or s[1:] != shape[1:] for s, _ in parts) or not shape:
            raise InvalidArgument(f"input {name!r} shapes differ across the batch")
        out[name] = ([sum(s[0] for s, _ in parts), *shape[1:]], b"".join(raw for _, raw in parts))
    return out


def split(outputs: Mapping[str, Output], counts: Sequence[int]) -> list[dict[str, Output]]:
    """Cut a batch's outputs back into one result per request (``counts`` rows each)."""
    total = sum(counts)
    results: list[dict[str, Output]] = [{} for _ in counts]
    for name, out in outputs.items():
        if not out.shape or out.shape[0] != total or out.datatype == "BYTES":
            raise Internal(f"output {name!r} is not batched along its first dimension")
        view = memoryview(out.data).cast("B")
        row = len(view) // total if total else 0
        start = 0
        for i, n in enumerate(counts):
            results[i][name] = Output(
                out.datatype, [n, *out.shape[1:]], view[start : start + n * row]
            )
            start += n * row
    return results


def sample_inputs(specs: Sequence[TensorSpec], batch: int) -> Inputs:
    """Zero inputs of ``batch`` rows for specs with fixed trailing dimensions (profiling)."""
    out: dict[str, tuple[list[int], bytes]] = {}
    for spec in specs:
        shape = [batch, *(max(d, 1) for d in spec.shape[1:])] if spec.shape else []
        if spec.datatype == "BYTES":
            out[spec.name] = (shape, encode_bytes_elements([b"sample"] * element_count(shape)))
        else:
            out[spec.name] = (shape, bytes(raw_nbytes(spec.datatype, shape) or 0))
    return out


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


# A sentence of typical length for profiling (about 20 tokens).
SAMPLE_TEXT = b"A serverless platform shares model weights across every instance on a GPU."


class BertEmbeddingRunner:
    """Sentence embeddings: ``text`` (BYTES [N]) -> ``embedding`` (FP32 [N, dim])."""

    batchable = True

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

    def sample(self, batch: int) -> Inputs:
        return {"text": ([batch], encode_bytes_elements([SAMPLE_TEXT] * batch))}

    def infer(self, inputs: Inputs) -> dict[str, Output]:
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


def warm_up_bert(model_dirs: Iterable[Path], device: str = "cpu") -> dict[str, int]:
    """(A spare, on its device thread.) Pay ahead what the first bert-embedding instance of
    a process pays in its cold start: the tokenizer of each of ``model_dirs`` parsed (kept
    in :func:`shared_tokenizer`, so the instances built later share it) and run once, and
    the encoder's code run once over random weights (``bert.warm_up``), whose freed memory
    is then given back (:func:`trim_heap`). Public model files only, never a tenant's.
    Returns the µs each step took, summed over the models."""
    took = {"tokenizer_us": 0, "encode_us": 0, "forward_us": 0}
    widths: set[tuple[int, int, int, int]] = set()
    for model_dir in model_dirs:
        t0 = time.perf_counter()
        try:
            config = BertConfig.from_model_dir(model_dir)
        except ModelFormatError:
            continue  # its deploy reports it
        tokenizer = shared_tokenizer(model_dir, config.max_seq_length)
        t1 = time.perf_counter()
        tokenizer.encode_batch([SAMPLE_TEXT.decode()])
        t2 = time.perf_counter()
        key = (
            config.hidden_size,
            config.num_heads,
            config.intermediate_size,
            config.max_position_embeddings,
        )
        if key not in widths:  # one forward per shape of encoder
            widths.add(key)
            warm_up(config, device)
        t3 = time.perf_counter()
        took["tokenizer_us"] += int((t1 - t0) * 1e6)
        took["encode_us"] += int((t2 - t1) * 1e6)
        took["forward_us"] += int((t3 - t2) * 1e6)
    trim_heap()
    return took


def trim_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc ``malloc_trim``; nothing
    elsewhere). After the warm-up's random weights are freed, glibc would otherwise keep
    ~7 MiB of them in an idle spare."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)
