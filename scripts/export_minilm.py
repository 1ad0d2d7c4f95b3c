"""Export the demo all-MiniLM-L6-v2 encoder with ``torch.export`` to ``OUT_DIR/model.pt2``.

The exported module takes ``input_ids`` and ``attention_mask`` (int64 [B, S], any batch,
up to 512 tokens) and returns unit-norm mean-pooled embeddings (float32 [B, 384]): the
plain-torch encoder of ``gpufaas.worker.models.bert``. Every tensor of the packaged
model.safetensors is kept under its own name, byte for byte, so the tensor store holds one
copy of each for both the safetensors model and this program.

Run:  .venv/bin/python scripts/export_minilm.py OUT_DIR
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import safetensors.torch
import torch

from gpufaas.shared.catalog import resolve_model_dir
from gpufaas.shared.messages import ModelSource
from gpufaas.worker.models.bert import BertConfig, _encode, _mean_pool_normalize

WEIGHTS_FILE = "model.safetensors"
PT2_FILE = "model.pt2"


class MiniLMEncoder(torch.nn.Module):
    """Token ids and attention mask in, unit-norm sentence embeddings out.

    Tensors are registered under their safetensors names (floats as parameters, the rest
    as buffers), so the exported state_dict has the file's names, dtypes and bytes.
    """

    def __init__(self, weights: Mapping[str, torch.Tensor], config: BertConfig) -> None:
        super().__init__()
        self._config = config
        for name, tensor in weights.items():
            owner_path, _, leaf = name.rpartition(".")
            owner = self._owner(owner_path)
            if tensor.is_floating_point():
                owner.register_parameter(leaf, torch.nn.Parameter(tensor, requires_grad=False))
            else:
                owner.register_buffer(leaf, tensor)

    def _owner(self, path: str) -> torch.nn.Module:
        """The submodule at a dotted path, made of empty containers where missing."""
        module: torch.nn.Module = self
        for part in path.split(".") if path else []:
            if part not in dict(module.named_children()):
                module.add_module(part, torch.nn.Module())
            module = module.get_submodule(part)
        return module

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        weights = dict(self.named_parameters()) | dict(self.named_buffers())
        hidden = _encode(weights, self._config, input_ids, attention_mask)
        return _mean_pool_normalize(hidden, attention_mask)


def demo_model_dir() -> Path:
    """The installed all-MiniLM-L6-v2 model directory (the platform's demo model)."""
    return resolve_model_dir(ModelSource(builtin="all-minilm-l6-v2"))


def export(model_dir: Path) -> torch.export.ExportedProgram:
    """The encoder in ``model_dir`` exported with dynamic batch and sequence lengths."""
    config = BertConfig.from_model_dir(model_dir)
    weights = safetensors.torch.load_file(str(model_dir / WEIGHTS_FILE))
    model = MiniLMEncoder(weights, config).eval()
    batch = torch.export.Dim("batch")
    seq = torch.export.Dim("seq", max=config.max_position_embeddings)
    ids = torch.zeros((2, 8), dtype=torch.int64)
    dims = {0: batch, 1: seq}
    return torch.export.export(
        model,
        (ids, torch.ones_like(ids)),
        dynamic_shapes={"input_ids": dims, "attention_mask": dims},
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("out_dir", type=Path, metavar="OUT_DIR", help=f"where {PT2_FILE} is written")
    args = ap.parse_args(argv)
    out_dir: Path = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    program = export(demo_model_dir())
    exported = time.perf_counter()
    torch.export.save(program, out_dir / PT2_FILE)
    saved = time.perf_counter()
    size = (out_dir / PT2_FILE).stat().st_size
    print(
        f"{out_dir / PT2_FILE}: {size:,} bytes "
        f"(export {exported - start:.1f} s, save {saved - exported:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
