"""Leases, refcounts and the reclaimer, driven step by step with a fake clock."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch

from gpufaas.tensorstore.leases import LeaseTable
from gpufaas.tensorstore.store import HostStore

pytestmark = pytest.mark.unit

NODE = "node-r"
KEEP = 100.0  # keep-alive, seconds
GRACE = 10.0  # lease TTL: how long a restarted store waits for leases to be re-announced


def _model(path: Path, seed: int, shared: int = 2, own: int = 2) -> Path:
    """A small model: ``shared`` tensors common to every seed, ``own`` specific to it."""
    g = torch.Generator().manual_seed(1234)
    tensors = {f"shared.{i}": torch.randn(64, 64, generator=g) for i in range(shared)}
    g = torch.Generator().manual_seed(seed)
    tensors |= {f"own.{i}": torch.randn(64, 64, generator=g) for i in range(own)}
    safetensors.torch.save_file(tensors, str(path))
    return path


@pytest.fixture
def store(tmp_path: Path) -> HostStore:
    s = HostStore(tmp_path / "shm", NODE)
    s.recover(now=0.0)
    return s


def reclaim(store: HostStore, now: float, capacity: int = 0) -> list[tuple[str, int, str]]:
    return store.reclaim_once(now, keep_alive_s=KEEP, capacity_bytes=capacity, grace_s=GRACE)


def test_lease_table_counts_each_lease_once() -> None:
    t = LeaseTable()
    t.put("a", "w1", ["x", "y"], 10)
    t.put("a", "w1", ["x", "y"], 20)  # a renewal, not a second reference
    t.put("b", "w2", ["y"], 10)
    assert (t.refcount("x"), t.refcount("y")) == (1, 2)
    assert t.expire(15) == ["b"]
    assert (t.refcount("x"), t.refcount("y")) == (1, 1)
    assert t.drop("a")
    assert not t.drop("a")
    assert not t.referenced(["x", "y"])


def test_referenced_tensors_are_never_freed(store: HostStore, tmp_path: Path) -> None:
    reg = store.register_file(_model(tmp_path / "m.safetensors", 1))
    ids = [r.id for r in reg.manifest.values()]
    store.lease("w1|f", "w1", ids, expires_at=1e9)
    assert reclaim(store, 1e6, capacity=1) == []  # far past keep-alive, over capacity: kept
    assert all(t in store.index for t in ids)


def test_keep_alive_then_free(store: HostStore, tmp_path: Path) -> None:
    reg = store.register_file(_model(tmp_path / "m.safetensors", 1))
    ids = [r.id for r in reg.manifest.values()]
    store.lease("w1|f", "w1", ids, expires_at=1e9)
    assert reclaim(store, 20) == []
    store.leases.drop("w1|f")  # the instance is unloaded
    assert reclaim(store, 30) == []  # idle from now on
    assert reclaim(store, 30 + KEEP - 1) == []
    [(seg, nbytes, reason)] = reclaim(store, 30 + KEEP)
    assert (nbytes, reason) == (reg.model_bytes, "keep-alive expired")
    assert store.index == {}
    assert list((store.dir).glob(f"{seg}*")) == []  # segment and its index are gone
    # Registering again reads the file again: the manifest alone is not enough.
    again = store.register_file(tmp_path / "m.safetensors")
    assert again.file_read
    assert again.bytes_stored == reg.model_bytes


def test_a_dead_holders_lease_lapses(store: HostStore, tmp_path: Path) -> None:
    reg = store.register_file(_model(tmp_path / "m.safetensors", 1))
    store.lease("w1|f", "w1", [r.id for r in reg.manifest.values()], expires_at=50)
    assert reclaim(store, 40) == []
    assert reclaim(store, 51) == []  # lease lapsed at 50: idle since 51
    assert [r[2] for r in reclaim(store, 51 + KEEP)] == ["keep-alive expired"]


def test_shared_tensors_outlive_one_variant(store: HostStore, tmp_path: Path) -> None:
    base = store.register_file(_model(tmp_path / "a.safetensors", 1))
    variant = store.register_file(_model(tmp_path / "b.safetensors", 2))
    assert variant.bytes_deduplicated == base.model_bytes // 2  # the shared half
    store.lease("w|a", "w", [r.id for r in base.manifest.values()], expires_at=1e9)
    store.lease("w|b", "w", [r.id for r in variant.manifest.values()], expires_at=1e9)
    store.leases.drop("w|a")  # base unloaded; the variant still uses the shared tensors
    reclaim(store, 1)
    assert reclaim(store, 1 + KEEP) == []  # base's segment holds the shared tensors: kept
    assert all(r.id in store.index for r in variant.manifest.values())


def test_lru_under_capacity_pressure(store: HostStore, tmp_path: Path) -> None:
    regs = [
        store.register_file(_model(tmp_path / f"m{i}.safetensors", i, shared=0)) for i in range(3)
    ]
    for i, reg in enumerate(regs):  # each becomes unreferenced at a different time
        store.lease(f"w|{i}", "w", [r.id for r in reg.manifest.values()], expires_at=1e9)
    for i in range(3):
        store.leases.drop(f"w|{i}")
        reclaim(store, 10 + i)
    one = regs[0].model_bytes
    freed = reclaim(store, 20, capacity=2 * one)  # one model too many: the oldest goes
    assert [(n, r) for _, n, r in freed] == [(one, "capacity")]
    assert all(r.id not in store.index for r in regs[0].manifest.values())
    assert all(r.id in store.index for reg in regs[1:] for r in reg.manifest.values())


def test_restarted_store_waits_for_leases_to_be_reannounced(
    store: HostStore, tmp_path: Path
) -> None:
    reg = store.register_file(_model(tmp_path / "m.safetensors", 1))
    ids = [r.id for r in reg.manifest.values()]
    store.lease("w1|f", "w1", ids, expires_at=1e9)
    restarted = HostStore(store.root, NODE)  # the store crashed; its lease table is gone
    restarted.recover(now=1000)
    assert reclaim(restarted, 1000 + GRACE - 1, capacity=1) == []  # grace: nothing freed
    assert restarted.lease("w1|f", "w1", ids, expires_at=2000) == []  # re-announced in time
    assert reclaim(restarted, 1000 + GRACE + KEEP, capacity=1) == []
    assert all(t in restarted.index for t in ids)


def test_lease_on_a_missing_tensor_is_reported(store: HostStore) -> None:
    assert store.lease("w|f", "w", ["not-a-tensor"], expires_at=10) == ["not-a-tensor"]
    assert store.leases.refcount("not-a-tensor") == 0


def test_private_tensors_are_shared_only_within_their_tenant(
    store: HostStore, tmp_path: Path
) -> None:
    path = _model(tmp_path / "m.safetensors", 1)
    public = store.register_file(path)
    a1 = store.register_file(path, private_to="tenant-a")
    a2 = store.register_file(path, private_to="tenant-a")
    b = store.register_file(path, private_to="tenant-b")
    # A private registration never deduplicates against public or another tenant's tensors:
    # nothing saved means nothing to observe (no bytes-saved figure, no faster response).
    assert (a1.bytes_deduplicated, b.bytes_deduplicated) == (0, 0)
    assert a2.bytes_stored == 0  # ... but a tenant shares its own
    ids = [{r.id for r in reg.manifest.values()} for reg in (public, a1, b)]
    assert len(ids[0] | ids[1] | ids[2]) == sum(map(len, ids))  # pairwise disjoint
    assert {r.id for r in a2.manifest.values()} == ids[1]
    # The keys survive a restart of the store (ids are stable), and stay secret.
    again = HostStore(store.root, NODE)
    again.recover(now=0)
    assert again.register_file(path, private_to="tenant-a").manifest == a1.manifest
    assert (store.dir / "keys" / "tenant-secret").stat().st_mode & 0o077 == 0
