"""The tensor store's device tier on a simulated GPU, step by step with a fake clock."""

from __future__ import annotations

import pytest

from gpufaas.shared.errors import ResourceExhausted
from gpufaas.shared.messages import TensorRef
from gpufaas.tensorstore.device_tier import DEVICE_ALIGN, DeviceTier

pytestmark = pytest.mark.unit

N = DEVICE_ALIGN  # one tensor per alignment unit keeps the arithmetic readable
FAR = 1e9  # a lease expiry that never comes in these tests


def model(*ids: str, nbytes: int = N) -> dict[str, TensorRef]:
    return {
        f"p.{t}": TensorRef(
            id=t, dtype="uint8", shape=[nbytes], nbytes=nbytes, segment="s", offset=0
        )
        for t in ids
    }


def no_read(ref: TensorRef) -> memoryview:
    raise AssertionError("a simulated GPU copies no bytes")


def place(tier: DeviceTier, lease: str, manifest: dict[str, TensorRef], now: float) -> int:
    p = tier.place(lease, "w", manifest, no_read, expires_at=FAR, now=now)
    assert set(p.refs) == {r.id for r in manifest.values()}
    return p.bytes_copied


def test_one_copy_per_tensor_shared_by_instances() -> None:
    tier = DeviceTier("gpu:0", 0, 10 * N, cuda=False)
    assert place(tier, "a", model("x", "y"), now=0) == 2 * N
    assert place(tier, "b", model("x", "z"), now=0) == N  # a variant sharing x: only z copied
    assert tier.used == 3 * N
    stats = tier.stats()
    assert (stats.bytes_stored, stats.bytes_without_sharing, stats.leases) == (3 * N, 4 * N, 2)


def test_unused_copies_stay_for_the_keep_alive_then_go() -> None:
    tier = DeviceTier("gpu:0", 0, 10 * N, cuda=False)
    place(tier, "a", model("x", "y"), now=0)
    tier.release("a")
    assert tier.reclaim_once(now=10, keep_alive_s=30) == []  # idle from 10
    assert tier.used == 2 * N
    assert place(tier, "a2", model("x", "y"), now=20) == 0  # within the keep-alive: no copy
    assert tier.reclaim_once(now=1000, keep_alive_s=30) == []  # in use: never freed
    tier.release("a2")
    assert tier.reclaim_once(now=1001, keep_alive_s=30) == []
    assert tier.reclaim_once(now=1031, keep_alive_s=30)[0][1:] == (2 * N, "keep-alive expired")
    assert tier.used == 0


def test_idle_copies_make_room_lru_first_and_refusal_is_all_or_nothing() -> None:
    tier = DeviceTier("gpu:0", 0, 3 * N, cuda=False)
    place(tier, "old", model("a"), now=0)
    place(tier, "newer", model("b"), now=0)
    tier.release("old")
    tier.reclaim_once(now=1, keep_alive_s=30)  # a idle since 1
    tier.release("newer")
    tier.reclaim_once(now=2, keep_alive_s=30)  # b idle since 2
    place(tier, "big", model("c", "d"), now=3)  # one idle copy must go: the oldest
    assert set(tier.refs) == {"b", "c", "d"}
    with pytest.raises(ResourceExhausted, match="gpu:0"):  # only b is freeable
        place(tier, "huge", model("e", "f"), now=4)
    assert set(tier.refs) == {"b", "c", "d"}  # nothing evicted, copied or leased
    assert "huge" not in tier.leases.leases
    assert tier.used == 3 * N


def test_a_lapsed_lease_frees_after_the_keep_alive() -> None:
    tier = DeviceTier("gpu:0", 0, 10 * N, cuda=False)
    tier.place("a", "dead-worker", model("x"), no_read, expires_at=5, now=0)
    assert tier.reclaim_once(now=4, keep_alive_s=30) == []
    assert tier.reclaim_once(now=6, keep_alive_s=30) == []  # lapsed: idle from 6
    assert len(tier.reclaim_once(now=36, keep_alive_s=30)) == 1


def test_renewal_after_a_store_restart() -> None:
    sim = DeviceTier("gpu:0", 0, 10 * N, cuda=False)  # a fresh store's empty tier
    assert sim.renew("a", "w", model("x", "y"), no_read, expires_at=FAR, now=0)
    assert sim.used == 2 * N  # re-accounted: nothing moved on a simulated GPU
    real = DeviceTier("gpu:0", 0, 10 * N, cuda=True)
    # A real GPU's copies died with the old process: the lease is lost, nothing allocated.
    assert not real.renew("a", "w", model("x"), no_read, expires_at=FAR, now=0)
    assert real.used == 0
