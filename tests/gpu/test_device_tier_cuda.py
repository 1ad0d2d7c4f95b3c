"""The tensor store's device tier on a real GPU, through the whole in-process platform."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gpufaas.memory.pool import CUDA_SEGMENT_BYTES
from gpufaas.memory.service import MemoryService
from gpufaas.shared import subjects
from gpufaas.shared.config import Config
from gpufaas.shared.memory_client import MemoryClient
from gpufaas.shared.messages import (
    ModelSource,
    RegisterReply,
    RegisterRequest,
    ReleaseReply,
    ReleaseRequest,
    encode,
)
from gpufaas.shared.rpc import request
from gpufaas.tensorstore.service import TensorStoreService
from tests.conftest import NatsServer
from tests.integration.conftest import DEMO_BODY, Platform, make_config, text_request

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine"),
]

MIB = 2**20

# A worker process's view: the placement mapped by (handle, offset) through the worker's
# own TensorMap, each device tensor compared with the store's host copy.
WORKER = """
import sys, torch
from pathlib import Path
from gpufaas.shared.messages import RegisterReply, decode
from gpufaas.worker.tensor_map import TensorMap
reply = decode(Path(sys.argv[1]).read_bytes(), RegisterReply)
maps = TensorMap(Path(sys.argv[2]))
on_gpu, _ = maps.acquire(reply.manifest, reply.placement)
on_host, _ = maps.acquire(reply.manifest, None)
bad = [n for n, t in on_gpu.items()
       if t.device.type != "cuda" or not torch.equal(t.cpu(), on_host[n])]
print(len(on_gpu), len(bad), *bad[:5])
"""


@pytest.fixture
def platform_config(nats_server: NatsServer, tmp_path: Path) -> Config:
    return make_config(nats_server, tmp_path, devices="auto")


async def test_two_instances_hold_one_device_copy(platform: Platform) -> None:
    c = platform.client
    rec = await (await c.post("/v1/functions", json=DEMO_BODY)).json()
    assert (await c.post("/v1/functions", json={**DEMO_BODY, "name": "minilm-b"})).status == 201
    tier = (await (await c.get("/v1/nodes")).json())["nodes"][0]["tensor_store"]["gpu:0"]
    assert rec["model_bytes"] <= tier["bytes_stored"] < rec["model_bytes"] * 1.01
    assert tier["bytes_without_sharing"] == 2 * rec["model_bytes"]
    a = await (await c.post("/v2/models/minilm/infer", json=text_request(["on the GPU"]))).json()
    b = await (await c.post("/v2/models/minilm-b/infer", json=text_request(["on the GPU"]))).json()
    assert a["outputs"][0]["data"] == pytest.approx(b["outputs"][0]["data"], abs=1e-6)


def driver_free() -> int:
    from gpufaas.shared.cuda_ipc import mem_get_info  # noqa: PLC0415 - needs cupy

    return mem_get_info(0)[0]


async def test_copies_lie_in_memory_service_blocks_and_a_worker_process_reads_them(
    platform: Platform, tmp_path: Path
) -> None:
    store, memory = platform.services["tensorstore"], platform.services["memory"]
    assert isinstance(store, TensorStoreService)
    assert isinstance(memory, MemoryService)
    node = platform.config.node_id
    pool = memory.pools["gpu:0"]
    # Another holder's block first: the model's block starts past it, in the same segment.
    other = MemoryClient(lambda: store.nc, node, "someone-else", timeout_s=5)
    first = await other.alloc("gpu:0", MIB)
    assert first.handle is not None

    subject = subjects.node(node, "tensorstore", subjects.TENSORSTORE_REGISTER)
    req = RegisterRequest(
        source=ModelSource(builtin="all-minilm-l6-v2"), lease="l1", holder="test", device="gpu:0"
    )
    reply = await request(store.nc, subject, req, RegisterReply, timeout=120)
    placement = reply.placement
    assert placement is not None
    assert placement.bytes_copied > 0
    blocks = {a.offset: a for a in pool.allocations() if a.owner == store.memory.owner}
    segs = {s.id: s for s in placement.segments}
    for seg in segs.values():
        block = blocks[seg.offset]  # each segment of copies is one of the store's blocks
        assert seg.ipc_handle is not None
        assert seg.ipc_handle == block.handle == pool.handle(block.segment)
        assert seg.offset >= MIB  # past the other holder's block
        assert seg.offset < seg.nbytes <= seg.offset + block.nbytes
    for tid, ref in placement.refs.items():  # offsets from the segment start, block included
        seg = segs[ref.segment]
        assert seg.offset <= ref.offset <= seg.nbytes, tid
        assert ref.offset % 256 == 0

    saved = tmp_path / "reply.msgpack"
    saved.write_bytes(encode(reply))
    out = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", WORKER, str(saved), str(platform.config.shm_dir)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    count, bad, *names = out.stdout.split()
    assert (int(count), int(bad)) == (len(reply.manifest), 0), names

    # Idle: the lease goes, the copies are reclaimed, the blocks freed, and the pool gives
    # its segment back to the driver.
    held = driver_free()
    release = subjects.node(node, "tensorstore", subjects.TENSORSTORE_RELEASE)
    released = await request(store.nc, release, ReleaseRequest(lease="l1"), ReleaseReply, timeout=5)
    assert released.released
    await store.reclaim_once(time.time() + 1e6)
    await other.free("gpu:0", first.id)
    assert not [a for a in pool.allocations() if a.owner == store.memory.owner]
    await memory.reconcile_once(time.time() + 1e6)
    assert pool.stats().reserved_bytes == 0
    assert driver_free() - held >= CUDA_SEGMENT_BYTES - 64 * MIB
