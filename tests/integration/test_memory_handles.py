"""The memory service's replies name each block's segment handle and offset (what a real
GPU's holders open), kept in KV, and re-made by a restarted manager (new memory)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpufaas.memory.service import MemoryService
from gpufaas.shared import subjects
from gpufaas.shared.config import Config
from gpufaas.shared.messages import MemAllocation, MemAllocRequest, decode_json
from gpufaas.shared.rpc import request
from tests.conftest import NatsServer
from tests.integration.conftest import make_config
from tests.unit.test_memory_pool_handles import HandleBackend

pytestmark = pytest.mark.integration


@pytest.fixture
def config(nats_server: NatsServer, tmp_path: Path) -> Config:
    return make_config(nats_server, tmp_path, devices="sim:1", topology="pcie-1gpu")


def with_handles(config: Config) -> tuple[MemoryService, HandleBackend]:
    """A memory service whose GPU pool's segments are opened by handle, as a real GPU's."""
    svc, backend = MemoryService(config), HandleBackend()
    svc.pools["gpu:0"].backend = backend
    return svc, backend


async def alloc(svc: MemoryService, nbytes: int) -> MemAllocation:
    subject = subjects.node(svc.config.node_id, "memory", subjects.MEMORY_ALLOC)
    req = MemAllocRequest(device="gpu:0", nbytes=nbytes, owner="tensorstore@n/1")
    return await request(svc.nc, subject, req, MemAllocation, timeout=5)


async def test_a_simulated_gpu_s_blocks_have_no_handle(config: Config) -> None:
    svc = MemoryService(config)
    await svc.start()
    try:
        a = await alloc(svc, 1000)
        assert a.handle is None
    finally:
        await svc.stop()


async def test_replies_carry_handle_and_offset_and_a_restart_re_makes_them(
    config: Config,
) -> None:
    svc, backend = with_handles(config)
    await svc.start()
    try:
        a, b = await alloc(svc, 1000), await alloc(svc, 5000)
        assert a.segment == b.segment
        assert a.handle is not None
        assert a.handle == b.handle == backend.handles[a.segment]
        assert a.offset != b.offset
        kept = await svc.buckets.memory.get(f"{config.node_id}.gpu0.a.{b.id}")
        assert kept.value is not None
        assert decode_json(kept.value, MemAllocation) == b
    finally:
        await svc.stop()

    again, backend2 = with_handles(config)
    await again.start()
    try:
        restored = {x.id: x for x in again.pools["gpu:0"].allocations()}
        new_handle = backend2.handles[a.segment]  # the segment re-made: new memory
        assert new_handle != a.handle
        assert {x.handle for x in restored.values()} == {new_handle}
        assert (restored[b.id].offset, restored[b.id].nbytes) == (b.offset, b.nbytes)
        c = await alloc(again, 100)  # fits the restored segment
        assert (c.segment, c.handle) == (a.segment, new_handle)
        assert c.offset not in (a.offset, b.offset)
    finally:
        await again.stop()
