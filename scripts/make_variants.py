"""Write fine-tuned variants of the demo all-MiniLM-L6-v2 model that share most tensors.

Each variant perturbs the weights of the last ``layers`` encoder layers
(``encoder.layer.5``, then ``encoder.layer.4``, ...) with small seeded noise, so its
embeddings differ from the base model's but stay sane; every other tensor is
byte-identical to the base. That is what a fine-tune of the top layers looks like to a
content-addressed tensor store: the variants share every untouched tensor with the base.

Each variant is written to ``<out_dir>/variant-<i>/`` as ``model.safetensors`` (with
``safetensors.torch.save_file``) plus copies of the base's config and tokenizer files, so
it can be deployed with ``POST /v1/functions {"model": {"path": ...}}``.

Run:  .venv/bin/python scripts/make_variants.py OUT_DIR [--count 9] [--layers 1] [--seed 0]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch

WEIGHTS_FILE = "model.safetensors"
# Copied beside each variant's weights when present in the base directory.
SIDE_FILES = (
    "config.json",
    "sentence_bert_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "modules.json",
)
# Noise standard deviation relative to each perturbed tensor's own standard deviation.
RELATIVE_NOISE = 0.02


def _num_layers(names: list[str]) -> int:
    indices = {int(n.split(".")[2]) for n in names if n.startswith("encoder.layer.")}
    if not indices:
        raise ValueError("the base model has no encoder.layer.* tensors")
    return max(indices) + 1


def perturbed_prefixes(num_layers: int, layers: int) -> list[str]:
    """Name prefixes of the last ``layers`` encoder layers (the top one first)."""
    if not 1 <= layers <= num_layers:
        raise ValueError(f"layers must be between 1 and {num_layers}, got {layers}")
    return [f"encoder.layer.{num_layers - 1 - i}." for i in range(layers)]


def _perturb(tensor: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The tensor plus Gaussian noise scaled to its own spread (float tensors only)."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return tensor.clone()
    base = tensor.to(torch.float32)
    scale = float(base.std()) if base.numel() > 1 else 0.0
    if scale == 0.0:
        scale = float(base.abs().mean()) or 1e-3
    noise = torch.randn(base.shape, generator=gen, dtype=torch.float32) * (scale * RELATIVE_NOISE)
    return (base + noise).to(tensor.dtype).contiguous()


def make_variants(
    base_dir: Path, out_dir: Path, count: int, layers: int = 1, seed: int = 0
) -> list[Path]:
    """Write ``count`` variants of the model in ``base_dir``; returns their directories.

    Variant ``i`` perturbs the last ``layers`` encoder layers with noise seeded by
    ``(seed, i)``; every other tensor is written byte-identical to the base.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    base = safetensors.torch.load_file(str(base_dir / WEIGHTS_FILE))
    # Own copies (the loaded tensors are views of one mapping of the base file).
    weights: dict[str, torch.Tensor] = {n: t.contiguous().clone() for n, t in base.items()}
    del base
    prefixes = perturbed_prefixes(_num_layers(list(weights)), layers)
    dirs: list[Path] = []
    for i in range(count):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
        variant = {
            name: _perturb(t, gen) if name.startswith(tuple(prefixes)) else t
            for name, t in sorted(weights.items())
        }
        vdir = out_dir / f"variant-{i}"
        vdir.mkdir(parents=True, exist_ok=True)
        safetensors.torch.save_file(variant, str(vdir / WEIGHTS_FILE), metadata={"format": "pt"})
        for side in SIDE_FILES:
            if (base_dir / side).is_file():
                shutil.copyfile(base_dir / side, vdir / side)
        dirs.append(vdir)
    return dirs


@dataclass(frozen=True, slots=True)
class Difference:
    """How a variant's tensors compare with the base's, by name."""

    tensors_changed: int
    tensors_shared: int
    bytes_changed: int
    bytes_shared: int


def _raw(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 tensor (no copy when already contiguous)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def compare(base_file: Path, variant_file: Path) -> Difference:
    """Count tensors (and their bytes) that differ from the base vs are byte-identical."""
    base = safetensors.torch.load_file(str(base_file))
    variant = safetensors.torch.load_file(str(variant_file))
    changed = shared = bytes_changed = bytes_shared = 0
    for name, t in variant.items():
        b = base.get(name)
        nbytes = t.numel() * t.element_size()
        same = (
            b is not None
            and b.dtype == t.dtype
            and b.shape == t.shape
            and torch.equal(_raw(b), _raw(t))
        )
        if same:
            shared += 1
            bytes_shared += nbytes
        else:
            changed += 1
            bytes_changed += nbytes
    return Difference(changed, shared, bytes_changed, bytes_shared)


def demo_model_dir() -> Path:
    """The installed all-MiniLM-L6-v2 model directory (the platform's demo model)."""
    from gpufaas.shared.catalog import resolve_model_dir  # noqa: PLC0415 - only when needed
    from gpufaas.shared.messages import ModelSource  # noqa: PLC0415

    return resolve_model_dir(ModelSource(builtin="all-minilm-l6-v2"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="where variant-<i>/ are written")
    ap.add_argument("--count", type=int, default=9, help="number of variants (default 9)")
    ap.add_argument(
        "--layers", type=int, default=1, help="top encoder layers perturbed per variant (default 1)"
    )
    ap.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    ap.add_argument(
        "--base",
        type=Path,
        default=None,
        help="base model dir (default: the demo all-MiniLM-L6-v2)",
    )
    args = ap.parse_args(argv)
    base_dir: Path = args.base if args.base is not None else demo_model_dir()
    try:
        dirs = make_variants(base_dir, args.out_dir, args.count, args.layers, args.seed)
    except ValueError as exc:
        ap.error(str(exc))
    print(f"base: {base_dir}")
    for vdir in dirs:
        d = compare(base_dir / WEIGHTS_FILE, vdir / WEIGHTS_FILE)
        print(
            f"{vdir}: {d.bytes_changed:,} bytes changed ({d.tensors_changed} tensors), "
            f"{d.bytes_shared:,} bytes shared with the base ({d.tensors_shared} tensors)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
