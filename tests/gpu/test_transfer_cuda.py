"""The transfer service on a real GPU: discovery, calibration, copies by IPC handle."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

from gpufaas.memory.service import MemoryService
from gpufaas.shared import subjects
from gpufaas.shared.cuda_ipc import open_segment
from gpufaas.shared.messages import (
    EnsureReply,
    EnsureRequest,
    Tube,
    TubeReleaseReply,
    TubeReleaseRequest,
    decode_json,
    encode_json,
)
from gpufaas.shared.rpc import request
from gpufaas.shared.shm import write_tube
from gpufaas.transfer.discovery import calibrate, discover_topology
from gpufaas.transfer.service import TransferService
from tests.conftest import NatsServer
from tests.integration.conftest import make_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine"),
]


def test_the_topology_is_discovered_and_calibrated() -> None:
    topology = discover_topology()
    assert topology is not None
    assert len(topology.gpus) == torch.cuda.device_count()
    measured = calibrate(topology)
    assert all(link.gbps > 1 for link in measured.links)


@pytest.fixture
async def transfer(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[TransferService]:
    svc = TransferService(make_config(nats_server, tmp_path, node_id="node-g", devices="auto"))
    await svc.start()
    yield svc
    await svc.stop()


async def copy_to_gpu(transfer: TransferService, data: bytes) -> tuple[Tube, EnsureReply]:
    """Write ``data`` as a host tube of tenant t1 and ensure it on gpu:0."""
    node = transfer.config.node_id
    tube = write_tube(
        transfer.config.shm_dir, node, "t1", datatype="UINT8", shape=[len(data)], data=data
    )
    await transfer.buckets.tubes.put(tube.id, encode_json(tube))
    subject = subjects.node(node, "transfer", subjects.TRANSFER_ENSURE)
    req = EnsureRequest(tube_id=tube.id, tenant="t1", tier="gpu:0")
    return tube, await request(transfer.nc, subject, req, EnsureReply, timeout=60)


async def test_a_tube_is_copied_to_the_gpu_through_the_pinned_ring(
    transfer: TransferService,
) -> None:
    data = os.urandom(96 * 2**20)
    _, reply = await copy_to_gpu(transfer, data)
    assert not reply.simulated
    assert reply.placement.segment.startswith("ipc:")
    assert reply.placement.offset == 0  # no memory service: an allocation of its own
    handle = bytes.fromhex(reply.placement.segment.removeprefix("ipc:"))
    on_gpu = open_segment(handle, len(data), 0)  # same process: the exporter's own tensor
    assert bytes(on_gpu.cpu().numpy()) == data


# Reads a tube's GPU copy in another process, from its placement: (handle, offset, nbytes).
READER = """
import hashlib, sys
from gpufaas.shared.cuda_ipc import open_segment
handle, offset, nbytes = bytes.fromhex(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
copy = open_segment(handle, offset + nbytes, 0).narrow(0, offset, nbytes)
print(hashlib.sha256(copy.cpu().numpy().tobytes()).hexdigest())
"""


@pytest.fixture
async def node(
    nats_server: NatsServer, tmp_path: Path
) -> AsyncIterator[tuple[MemoryService, TransferService]]:
    config = make_config(nats_server, tmp_path, node_id="node-m", devices="auto")
    memory, transfer = MemoryService(config), TransferService(config)
    await memory.start()
    await transfer.start()
    yield memory, transfer
    await transfer.stop()
    await memory.stop()


async def test_a_copy_lands_in_a_memory_service_block_another_process_reads(
    node: tuple[MemoryService, TransferService],
) -> None:
    memory, transfer = node
    pool = memory.pools["gpu:0"]
    first = await transfer.memory.alloc("gpu:0", 2**20)  # the copy's block comes after it
    data = os.urandom(40 * 2**20 + 123)
    tube, reply = await copy_to_gpu(transfer, data)
    placed = reply.placement
    (block,) = [a for a in pool.allocations() if a.nbytes == len(data)]
    assert block.owner == transfer.memory.owner
    assert block.handle is not None
    assert placed.segment == f"ipc:{block.handle.hex()}"
    assert placed.offset == block.offset >= 2**20
    out = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", READER, block.handle.hex(), str(placed.offset), str(len(data))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == hashlib.sha256(data).hexdigest()
    # The tube expires: the sweeper drops the copy and gives its block back.
    await transfer.buckets.tubes.delete(tube.id)
    assert await transfer.sweep_once(time.time()) == [tube.id]
    assert [a.id for a in pool.allocations()] == [first.id]


async def test_a_gpu_only_copy_is_swapped_into_the_host_pool_by_release(
    node: tuple[MemoryService, TransferService],
) -> None:
    memory, transfer = node
    data = os.urandom(24 * 2**20 + 5)
    tube, reply = await copy_to_gpu(transfer, data)
    (host,) = [p for p in reply.tube.placements if p.tier == "host"]
    await transfer.directory.remove_placement(tube.id, host)  # as if produced on the GPU
    subject = subjects.node(transfer.config.node_id, "transfer", subjects.TRANSFER_RELEASE)
    done = await request(
        transfer.nc,
        subject,
        TubeReleaseRequest(tube_id=tube.id, tier="gpu:0"),
        TubeReleaseReply,
        timeout=60,
    )
    assert (done.released, done.swapped_bytes) == (True, len(data))
    (swapped,) = decode_json(
        (await transfer.buckets.tubes.get(tube.id)).value or b"", Tube
    ).placements
    assert swapped.segment.startswith("hostpool/")
    with (transfer.config.shm_dir / swapped.segment).open("rb") as f:
        assert os.pread(f.fileno(), len(data), swapped.offset) == data
    assert not [a for a in memory.pools["gpu:0"].allocations() if a.nbytes == len(data)]
