"""The tensor store's parts beside its service: the store thread and its reports."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import safetensors.torch
import torch

from gpufaas.shared.messages import ModelQuery, ModelSource
from gpufaas.tensorstore.device_tier import DeviceTier
from gpufaas.tensorstore.reports import model_item, residency, store_stats
from gpufaas.tensorstore.store import HostStore
from gpufaas.tensorstore.store_thread import StoreThread

pytestmark = pytest.mark.unit

NODE = "node-p"


@pytest.fixture
def store(tmp_path: Path) -> HostStore:
    s = HostStore(tmp_path / "shm", NODE)
    s.recover(now=0.0)
    return s


def _model(path: Path) -> Path:
    g = torch.Generator().manual_seed(7)
    tensors = {f"w.{i}": torch.randn(32, 32, generator=g) for i in range(3)}
    safetensors.torch.save_file(tensors, str(path))
    return path


async def test_store_thread_runs_in_order_and_inline_only_when_idle() -> None:
    thread = StoreThread()
    order: list[int] = []
    await thread.run(order.append, 1)
    assert thread.inline(lambda: len(order)) == 1
    order.append(2)
    started, release = threading.Event(), threading.Event()

    def busy() -> None:
        started.set()
        release.wait(timeout=10)
        order.append(3)

    task = asyncio.ensure_future(thread.run(busy))
    await asyncio.to_thread(started.wait, 10)
    assert thread.inline(lambda: order.append(99)) is None  # the thread holds the store
    release.set()
    await task
    assert order == [1, 2, 3]
    await thread.shutdown()


def test_stats_count_what_is_stored_and_leased(store: HostStore, tmp_path: Path) -> None:
    reg = store.register_file(_model(tmp_path / "m.safetensors"))
    ids = [r.id for r in reg.manifest.values()]
    store.lease("w|f", "w", ids, expires_at=1e9)
    tier = DeviceTier("gpu:0", 0, 1 << 30, cuda=False)
    stats = store_stats(store, {"gpu:0": tier}, NODE)
    assert (stats.node, stats.tensors, stats.leases) == (NODE, 3, 1)
    assert stats.bytes_stored == stats.bytes_referenced == 3 * 32 * 32 * 4
    assert [d.device for d in stats.devices] == ["gpu:0"]


def test_residency_names_a_queried_model_or_why_not(store: HostStore, tmp_path: Path) -> None:
    weights = _model(tmp_path / "model.safetensors")
    store.register_file(weights)
    tier = DeviceTier("gpu:0", 0, 1 << 30, cuda=False)
    known = ModelQuery(source=ModelSource(path=str(tmp_path)))
    missing = ModelQuery(source=ModelSource(path=str(tmp_path / "nowhere")))
    reply = residency(
        store, {"gpu:0": tier}, node=NODE, owner="me", queries=[known, missing], now=1.0
    )
    assert (reply.node, reply.owner) == (NODE, "me")
    assert [(d.device, d.models) for d in reply.devices] == [("gpu:0", [])]  # none on the GPU
    found, absent = reply.models
    assert found.known
    assert found.nbytes == 3 * 32 * 32 * 4
    assert found.item
    assert not absent.known
    assert absent.error
    assert model_item(store, known) == found
