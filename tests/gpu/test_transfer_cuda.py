"""The transfer service on a real GPU: discovery, calibration, copies by IPC handle."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

from gpufaas.shared import subjects
from gpufaas.shared.cuda_ipc import open_segment
from gpufaas.shared.messages import EnsureReply, EnsureRequest, encode_json
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


async def test_a_tube_is_copied_to_the_gpu_through_the_pinned_ring(
    transfer: TransferService,
) -> None:
    data = os.urandom(96 * 2**20)
    tube = write_tube(transfer.config.shm_dir, "node-g", "t1", datatype="UINT8",
                      shape=[len(data)], data=data)  # fmt: skip
    await transfer.buckets.tubes.put(tube.id, encode_json(tube))
    subject = subjects.node("node-g", "transfer", subjects.TRANSFER_ENSURE)
    req = EnsureRequest(tube_id=tube.id, tenant="t1", tier="gpu:0")
    reply = await request(transfer.nc, subject, req, EnsureReply, timeout=60)
    assert not reply.simulated
    assert reply.placement.segment.startswith("ipc:")
    handle = bytes.fromhex(reply.placement.segment.removeprefix("ipc:"))
    on_gpu = open_segment(handle, len(data), 0)  # same process: the exporter's own tensor
    assert bytes(on_gpu.cpu().numpy()) == data
