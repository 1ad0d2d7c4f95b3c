"""A second function for workflow tests: scores MiniLM's embeddings against one query
vector (``x`` FP32 [N, 384] -> ``scores`` [N]), exported with ``torch.export``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

DIM = 384  # MiniLM's embedding width


def query(scale: float = 1.0) -> np.ndarray[Any, Any]:
    """The query vector of a scorer exported with ``scale``."""
    return np.linspace(-1, 1, DIM, dtype=np.float32) * np.float32(scale)


class Scorer(torch.nn.Module):
    """``x`` FP32 [N, 384] -> ``scores`` [N] against ``query(scale)``."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.query = torch.nn.Parameter(torch.linspace(-1, 1, DIM) * scale)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"scores": x @ self.query}


def export_scorer(out: Path, scale: float = 1.0) -> Path:
    """A scorer's ``model.pt2`` in ``out`` (a model of its own for each ``scale``)."""
    batch = torch.export.Dim("batch", min=1, max=1024)
    ep = torch.export.export(Scorer(scale), (torch.randn(3, DIM),), dynamic_shapes=({0: batch},))
    torch.export.save(ep, out / "model.pt2")
    return out


def scorer_body(model_dir: Path, name: str = "scorer") -> dict[str, Any]:
    """The deploy body of a scorer function (a server path: an admin key's)."""
    return {"name": name, "model": {"path": str(model_dir), "architecture": "torch-export"}}
