"""BERT sentence encoder (the all-MiniLM-L6-v2 demo model) in plain torch.

The encoder runs directly over borrowed weight tensors (possibly zero-copy views of shared
memory), so nothing here copies, converts or writes to a weight.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tokenizers
import torch
import torch.nn.functional as F

_CONFIG_FILE = "config.json"
_SENTENCE_CONFIG_FILE = "sentence_bert_config.json"
_TOKENIZER_FILE = "tokenizer.json"
_DEFAULT_MAX_SEQ_LENGTH = 512
_WEIGHT_DTYPE = torch.float32


class ModelFormatError(ValueError):
    """A model's files or tensors do not match what the architecture needs."""


@dataclass(frozen=True, slots=True)
class BertConfig:
    """Shape of a BERT encoder plus the sentence-level truncation length.

    Built from a model directory so a bad config fails before any weights are touched.
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    max_seq_length: int

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> BertConfig:
        """Read config.json and sentence_bert_config.json (optional, default max_seq_length 512).

        Raises ModelFormatError naming the file and field on a missing or bad value.
        """
        config_path = Path(model_dir) / _CONFIG_FILE
        data = _read_json_object(config_path)
        if data.get("hidden_act", "gelu") != "gelu":
            raise ModelFormatError(f"{config_path}: field 'hidden_act' must be 'gelu'")
        if data.get("position_embedding_type", "absolute") != "absolute":
            raise ModelFormatError(
                f"{config_path}: field 'position_embedding_type' must be 'absolute'"
            )
        hidden_size = _positive_int(data, "hidden_size", config_path)
        num_heads = _positive_int(data, "num_attention_heads", config_path)
        if hidden_size % num_heads != 0:
            raise ModelFormatError(
                f"{config_path}: field 'num_attention_heads' ({num_heads}) "
                f"does not divide hidden_size ({hidden_size})"
            )
        max_positions = _positive_int(data, "max_position_embeddings", config_path)
        return cls(
            vocab_size=_positive_int(data, "vocab_size", config_path),
            hidden_size=hidden_size,
            num_layers=_positive_int(data, "num_hidden_layers", config_path),
            num_heads=num_heads,
            intermediate_size=_positive_int(data, "intermediate_size", config_path),
            max_position_embeddings=max_positions,
            type_vocab_size=_positive_int(data, "type_vocab_size", config_path),
            layer_norm_eps=_positive_float(data, "layer_norm_eps", config_path),
            max_seq_length=_read_max_seq_length(Path(model_dir), max_positions),
        )


def _read_json_object(path: Path) -> dict[str, Any]:
    """Parse a JSON file that must hold an object, as a ModelFormatError when it does not."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelFormatError(f"{path}: file is missing") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path}: expected a JSON object")
    return data


def _positive_int(data: Mapping[str, Any], field: str, path: Path) -> int:
    """The integer field `field` of `data`, which must be present and > 0."""
    if field not in data:
        raise ModelFormatError(f"{path}: field {field!r} is missing")
    value = data[field]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ModelFormatError(f"{path}: field {field!r} must be a positive integer, got {value!r}")
    return value


def _positive_float(data: Mapping[str, Any], field: str, path: Path) -> float:
    """The numeric field `field` of `data`, which must be present, finite and > 0."""
    if field not in data:
        raise ModelFormatError(f"{path}: field {field!r} is missing")
    value = data[field]
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ModelFormatError(f"{path}: field {field!r} must be a positive number, got {value!r}")
    return float(value)


def _read_max_seq_length(model_dir: Path, max_positions: int) -> int:
    """max_seq_length from sentence_bert_config.json; 512 (capped by the positions) if absent."""
    path = model_dir / _SENTENCE_CONFIG_FILE
    if not path.exists():
        return min(_DEFAULT_MAX_SEQ_LENGTH, max_positions)
    value = _positive_int(_read_json_object(path), "max_seq_length", path)
    if value > max_positions:
        raise ModelFormatError(
            f"{path}: field 'max_seq_length' ({value}) exceeds "
            f"max_position_embeddings ({max_positions})"
        )
    return value


def expected_parameters(config: BertConfig) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Parameter name -> (dtype, shape) the encoder needs, named as in the safetensors file."""
    hidden, inter = config.hidden_size, config.intermediate_size
    params: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {
        "embeddings.word_embeddings.weight": (_WEIGHT_DTYPE, (config.vocab_size, hidden)),
        "embeddings.position_embeddings.weight": (
            _WEIGHT_DTYPE,
            (config.max_position_embeddings, hidden),
        ),
        "embeddings.token_type_embeddings.weight": (
            _WEIGHT_DTYPE,
            (config.type_vocab_size, hidden),
        ),
    }
    params.update(_layer_norm_params("embeddings.LayerNorm", hidden))
    for index in range(config.num_layers):
        prefix = f"encoder.layer.{index}"
        for proj in ("query", "key", "value"):
            params.update(_linear_params(f"{prefix}.attention.self.{proj}", hidden, hidden))
        params.update(_linear_params(f"{prefix}.attention.output.dense", hidden, hidden))
        params.update(_layer_norm_params(f"{prefix}.attention.output.LayerNorm", hidden))
        params.update(_linear_params(f"{prefix}.intermediate.dense", inter, hidden))
        params.update(_linear_params(f"{prefix}.output.dense", hidden, inter))
        params.update(_layer_norm_params(f"{prefix}.output.LayerNorm", hidden))
    return params


def _linear_params(
    prefix: str, out_features: int, in_features: int
) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Weight [out, in] and bias [out] of a dense layer."""
    return {
        f"{prefix}.weight": (_WEIGHT_DTYPE, (out_features, in_features)),
        f"{prefix}.bias": (_WEIGHT_DTYPE, (out_features,)),
    }


def _layer_norm_params(prefix: str, size: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Scale and shift of a LayerNorm."""
    return {
        f"{prefix}.weight": (_WEIGHT_DTYPE, (size,)),
        f"{prefix}.bias": (_WEIGHT_DTYPE, (size,)),
    }


def check_weights(weights: Mapping[str, torch.Tensor], config: BertConfig) -> None:
    """Raise ModelFormatError naming the first missing, mistyped, misshapen or misplaced parameter.

    Only float32 is accepted; extra tensors (position_ids, pooler) are ignored.
    """
    device: torch.device | None = None
    for name, (dtype, shape) in expected_parameters(config).items():
        tensor = weights.get(name)
        if tensor is None:
            raise ModelFormatError(f"parameter {name!r} is missing")
        if tensor.dtype != dtype:
            raise ModelFormatError(f"parameter {name!r} has dtype {tensor.dtype}, expected {dtype}")
        if tuple(tensor.shape) != shape:
            raise ModelFormatError(
                f"parameter {name!r} has shape {tuple(tensor.shape)}, expected {shape}"
            )
        if device is None:
            device = tensor.device
        elif tensor.device != device:
            raise ModelFormatError(
                f"parameter {name!r} is on {tensor.device}, the others are on {device}"
            )


WARM_UP_VOCAB = 128  # rows of the random embedding table warm_up runs over


def warm_up(config: BertConfig, device: str = "cpu", tokens: int = 16) -> None:
    """Run the encoder once over random weights of ``config``'s widths (one layer, a small
    vocabulary), so that a process pays torch's first-call costs of this code (operator
    dispatch, kernel and thread-pool set-up) before it serves anyone. Reads no model's
    weights; what it allocates is freed on return."""
    small = dataclasses.replace(config, vocab_size=WARM_UP_VOCAB, num_layers=1)
    gen = torch.Generator().manual_seed(0)
    weights = {
        name: (torch.randn(shape, generator=gen, dtype=dtype) * 0.02).to(device)
        for name, (dtype, shape) in expected_parameters(small).items()
    }
    with torch.inference_mode():
        input_ids = torch.randint(0, WARM_UP_VOCAB, (1, tokens), generator=gen).to(device)
        mask = torch.ones_like(input_ids)
        _mean_pool_normalize(_encode(weights, small, input_ids, mask), mask).cpu()


def load_tokenizer(model_dir: Path, max_seq_length: int) -> tokenizers.Tokenizer:
    """Load tokenizer.json, truncating to max_seq_length and padding to the batch's longest."""
    path = Path(model_dir) / _TOKENIZER_FILE
    try:
        tokenizer = tokenizers.Tokenizer.from_file(str(path))
    except Exception as exc:
        raise ModelFormatError(f"{path}: cannot load tokenizer ({exc})") from exc
    tokenizer.enable_truncation(max_length=max_seq_length)
    padding = tokenizer.padding or {}
    tokenizer.enable_padding(
        pad_id=padding.get("pad_id", 0),
        pad_type_id=padding.get("pad_type_id", 0),
        pad_token=padding.get("pad_token", "[PAD]"),
        length=None,
    )
    return tokenizer


class BertEmbedder:
    """Sentence embeddings (mean pooling over the attention mask, then L2 normalisation).

    Runs a plain-torch BERT encoder over the given weights in place: no copies, no writes.
    """

    def __init__(
        self,
        weights: Mapping[str, torch.Tensor],
        config: BertConfig,
        tokenizer: tokenizers.Tokenizer,
    ) -> None:
        check_weights(weights, config)
        truncation = tokenizer.truncation
        if truncation is None or truncation["max_length"] > config.max_position_embeddings:
            raise ValueError(
                "tokenizer must truncate to at most "
                f"{config.max_position_embeddings} tokens (see load_tokenizer)"
            )
        if tokenizer.padding is None:
            raise ValueError("tokenizer must pad batches (see load_tokenizer)")
        self._config = config
        self._tokenizer = tokenizer
        self._weights = {name: weights[name] for name in expected_parameters(config)}
        self._device = self._weights["embeddings.word_embeddings.weight"].device

    @property
    def dim(self) -> int:
        """Embedding width (the encoder's hidden size)."""
        return self._config.hidden_size

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-norm float32 embeddings [len(texts), dim] on the CPU, one padded batch."""
        if isinstance(texts, str):
            raise TypeError("embed takes a sequence of strings, not a single string")
        if not texts:
            return torch.zeros((0, self.dim), dtype=torch.float32)
        with torch.inference_mode():
            encodings = self._tokenizer.encode_batch(list(texts))
            input_ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
            mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
            input_ids, mask = input_ids.to(self._device), mask.to(self._device)
            hidden = _encode(self._weights, self._config, input_ids, mask)
            return _mean_pool_normalize(hidden, mask).cpu()

    def weight_data_ptrs(self) -> dict[str, int]:
        """Name -> data_ptr() of each weight held, so callers can prove nothing was copied."""
        return {name: tensor.data_ptr() for name, tensor in self._weights.items()}


def _encode(
    w: Mapping[str, torch.Tensor],
    config: BertConfig,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """Token states [B, S, H] after the embeddings and every encoder layer."""
    # Additive attention bias [B, 1, 1, S]: 0 for real tokens, a huge negative for padding.
    dtype = w["embeddings.word_embeddings.weight"].dtype
    bias = (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
    x = _embeddings(w, config, input_ids)
    for index in range(config.num_layers):
        x = _layer(w, f"encoder.layer.{index}", config, x, bias)
    return x


def _embeddings(
    w: Mapping[str, torch.Tensor], config: BertConfig, input_ids: torch.Tensor
) -> torch.Tensor:
    """Word + absolute position + token type (all zero) embeddings, layer-normalised."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    x = F.embedding(input_ids, w["embeddings.word_embeddings.weight"])
    x = x + F.embedding(positions, w["embeddings.position_embeddings.weight"])
    x = x + w["embeddings.token_type_embeddings.weight"][0]
    return _layer_norm(w, "embeddings.LayerNorm", config, x)


def _layer(
    w: Mapping[str, torch.Tensor],
    prefix: str,
    config: BertConfig,
    x: torch.Tensor,
    bias: torch.Tensor,
) -> torch.Tensor:
    """One post-LayerNorm transformer layer: self-attention, then an erf-GELU feed-forward."""
    attended = _linear(
        w, f"{prefix}.attention.output.dense", _attention(w, prefix, config, x, bias)
    )
    x = _layer_norm(w, f"{prefix}.attention.output.LayerNorm", config, x + attended)
    inner = F.gelu(_linear(w, f"{prefix}.intermediate.dense", x), approximate="none")
    out = _linear(w, f"{prefix}.output.dense", inner)
    return _layer_norm(w, f"{prefix}.output.LayerNorm", config, x + out)


def _attention(
    w: Mapping[str, torch.Tensor],
    prefix: str,
    config: BertConfig,
    x: torch.Tensor,
    bias: torch.Tensor,
) -> torch.Tensor:
    """Multi-head scaled dot-product self-attention with an additive mask; [B, S, H] out."""
    batch, seq, hidden = x.shape
    head_dim = hidden // config.num_heads

    def split_heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(batch, seq, config.num_heads, head_dim).transpose(1, 2)

    query = split_heads(_linear(w, f"{prefix}.attention.self.query", x))
    key = split_heads(_linear(w, f"{prefix}.attention.self.key", x))
    value = split_heads(_linear(w, f"{prefix}.attention.self.value", x))
    scores = query @ key.transpose(-1, -2) / math.sqrt(head_dim) + bias
    context = scores.softmax(dim=-1) @ value
    return context.transpose(1, 2).reshape(batch, seq, hidden)


def _linear(w: Mapping[str, torch.Tensor], prefix: str, x: torch.Tensor) -> torch.Tensor:
    """Dense layer `prefix` applied to x."""
    return F.linear(x, w[f"{prefix}.weight"], w[f"{prefix}.bias"])


def _layer_norm(
    w: Mapping[str, torch.Tensor], prefix: str, config: BertConfig, x: torch.Tensor
) -> torch.Tensor:
    """LayerNorm `prefix` over the hidden dimension."""
    return F.layer_norm(
        x, (config.hidden_size,), w[f"{prefix}.weight"], w[f"{prefix}.bias"], config.layer_norm_eps
    )


def _mean_pool_normalize(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the unmasked token states, L2-normalised (sentence-transformers semantics)."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * weights).sum(dim=1)
    counts = weights.sum(dim=1).clamp(min=1e-9)
    return F.normalize(summed / counts, p=2, dim=1).float()
