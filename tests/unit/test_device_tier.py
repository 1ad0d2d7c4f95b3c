"""The device tier's accounting on a simulated GPU, step by step with a fake clock."""

from __future__ import annotations

import pytest
import torch

from gpufaas.shared.errors import ResourceExhausted
from gpufaas.shared.messages import TensorRef
from gpufaas.worker.device_tier import DeviceTier

pytestmark = pytest.mark.unit


def model(*ids: str, nbytes: int = 100) -> tuple[dict[str, TensorRef], dict[str, torch.Tensor]]:
    refs = {f"p.{t}": TensorRef(id=t, dtype="uint8", shape=[nbytes], nbytes=nbytes, segment="s",
                                offset=0) for t in ids}  # fmt: skip
    return refs, {name: torch.zeros(nbytes, dtype=torch.uint8) for name in refs}


def test_one_copy_per_tensor_shared_by_instances() -> None:
    tier = DeviceTier("gpu:0", 1000, None)
    a, host_a = model("x", "y")
    b, host_b = model("x", "z")  # a variant sharing x
    wa = tier.acquire(a, host_a, now=0)
    wb = tier.acquire(b, host_b, now=0)
    assert tier.used == 300  # x once
    assert wa["p.x"] is wb["p.x"]


def test_unused_copies_stay_for_the_keep_alive_then_go() -> None:
    tier = DeviceTier("gpu:0", 1000, None)
    a, host = model("x", "y")
    tier.acquire(a, host, now=0)
    tier.release({"x", "y"}, now=10)
    assert tier.used == 200  # still resident: idle
    assert tier.reclaim_once(now=10 + 29, keep_alive_s=30) == 0
    tier.acquire(a, host, now=20)  # used again within the keep-alive: no copy, not idle
    assert tier.idle_since == {}
    assert tier.reclaim_once(now=1000, keep_alive_s=30) == 0  # in use: never freed
    tier.release({"x", "y"}, now=50)
    assert tier.reclaim_once(now=80, keep_alive_s=30) == 200
    assert tier.used == 0


def test_idle_copies_make_room_lru_first_and_refusal_is_all_or_nothing() -> None:
    tier = DeviceTier("gpu:0", 300, None)
    old, h_old = model("a")
    newer, h_newer = model("b")
    tier.acquire(old, h_old, now=0)
    tier.acquire(newer, h_newer, now=0)
    tier.release({"a"}, now=1)
    tier.release({"b"}, now=2)
    big, h_big = model("c", "d")  # 200 bytes: one idle copy must go, the oldest
    tier.acquire(big, h_big, now=3)
    assert set(tier.copies) == {"b", "c", "d"}
    huge, h_huge = model("e", "f", nbytes=150)  # 300 bytes: only b (100) is freeable
    with pytest.raises(ResourceExhausted, match="gpu:0"):
        tier.acquire(huge, h_huge, now=4)
    assert set(tier.copies) == {"b", "c", "d"}  # nothing evicted, copied or counted
    assert tier.used == 300
