"""A worker's views of stored tensors: one per tensor per process, let go with the last user."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gpufaas.shared.messages import DevicePlacement, DeviceRef, DeviceSegment, TensorRef
from gpufaas.shared.shm import write_segment
from gpufaas.worker.tensor_map import TensorMap

pytestmark = pytest.mark.unit


def segment(root: Path, name: str, values: list[float]) -> TensorRef:
    data = torch.tensor(values, dtype=torch.float32).numpy().tobytes()
    write_segment(root, name, [data])
    return TensorRef(
        id=f"id-{name}",
        dtype="float32",
        shape=[len(values)],
        nbytes=len(data),
        segment=name,
        offset=0,
    )


def test_instances_share_views_and_the_last_one_unmaps(tmp_path: Path) -> None:
    tm = TensorMap(tmp_path)
    a = segment(tmp_path, "s1", [1.0, 2.0])
    b = segment(tmp_path, "s2", [3.0])
    w1, held1 = tm.acquire({"w": a, "v": b}, None)
    w2, held2 = tm.acquire({"w": a}, None)  # a variant sharing w
    assert w1["w"] is w2["w"]
    assert w1["v"].tolist() == [3.0]
    assert (held1, held2) == (frozenset({"s1", "s2"}), frozenset({"s1"}))
    tm.release(held1)
    assert tm.segments_mapped == 1  # s1 is still used by the second instance
    tm.release(held2)
    assert tm.segments_mapped == 0
    assert w2["w"].tolist() == [1.0, 2.0]  # a view outlives the cache: the mapping too


def test_a_simulated_gpu_computes_over_the_host_pages(tmp_path: Path) -> None:
    tm = TensorMap(tmp_path)
    a = segment(tmp_path, "s1", [1.0])
    placement = DevicePlacement(
        device="gpu:0",
        refs={a.id: DeviceRef(segment="d1", offset=0)},
        segments=[DeviceSegment(id="d1", nbytes=256)],  # no IPC handle: simulated
        bytes_copied=256,
        used_bytes=256,
    )
    weights, held = tm.acquire({"w": a}, placement)
    assert weights["w"].device.type == "cpu"
    assert held == frozenset({"s1"})
