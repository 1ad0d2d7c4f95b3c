"""Files in shared memory: a full tmpfs is a 507 naming the tier (never a SIGBUS), with
nothing left behind; staging files of crashed copies are swept by age, never one that
is still being written.

A tmpfs cannot be mounted here, so "full" is a real condition on the real ``/dev/shm``:
a copy larger than the whole file system (``os.statvfs``), which tmpfs refuses at once
(``ENOSPC``) without allocating anything. The source of such a copy is a sparse file.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from gpufaas.memory.pool import HostBackend
from gpufaas.memory.service import MemoryService
from gpufaas.shared import constants as c
from gpufaas.shared import subjects
from gpufaas.shared.config import Config
from gpufaas.shared.errors import ResourceExhausted, http_status
from gpufaas.shared.messages import EnsureReply, EnsureRequest, Placement, Tube, encode_json
from gpufaas.shared.paths import allocate, create_new, make_dirs, staging_name, sweep_staging
from gpufaas.shared.rpc import request
from gpufaas.shared.shm import TUBES_DIR, new_id
from gpufaas.transfer.service import TransferService
from tests.conftest import NatsServer
from tests.integration.conftest import make_config

pytestmark = pytest.mark.integration

SHM = Path("/dev/shm")


def tmpfs_bytes() -> int:
    """The size of the tmpfs at /dev/shm (skips the test where there is none)."""
    if not SHM.is_dir() or not os.access(SHM, os.W_OK):
        pytest.skip("no writable /dev/shm")
    st = os.statvfs(SHM)
    if st.f_blocks == 0:
        pytest.skip("/dev/shm has no size limit")
    return st.f_blocks * st.f_frsize


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    """A private directory on the real tmpfs (removed after the test)."""
    tmpfs_bytes()
    d = Path(tempfile.mkdtemp(prefix="gpufaas-test-", dir=SHM))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def leftovers(root: Path) -> list[Path]:
    """Files that are neither a finished copy nor the source: staging files."""
    return [p for p in root.rglob("*") if p.is_file() and p.name.endswith(".tmp")]


def test_allocate_beyond_the_tmpfs_is_a_507_naming_the_tier(shm_dir: Path) -> None:
    path = shm_dir / "x"
    fd = create_new(path)
    try:
        with pytest.raises(ResourceExhausted, match="tier gpu:3 is full") as caught:
            allocate(fd, tmpfs_bytes() + (1 << 30), path, "gpu:3")
        assert http_status(caught.value) == 507
        assert caught.value.field == "tier"
        assert os.fstat(fd).st_blocks == 0  # refused at once: nothing was allocated
        allocate(fd, 1 << 20, path, "host")  # what fits is committed
        assert os.fstat(fd).st_size == 1 << 20
    finally:
        os.close(fd)


def huge_topology(tmp_path: Path) -> Path:
    """One simulated GPU with far more memory than the tmpfs that holds its copies."""
    topo = {
        "name": "huge-1gpu",
        "source": "tests: a GPU larger than /dev/shm",
        "gpus": [
            {"index": 0, "model": "huge", "memory_bytes": 1 << 45, "numa": 0, "pcie_switch": 0}
        ],
        "links": [{"a": "host", "b": "gpu:0", "kind": "pcie4", "gbps": 25.0, "latency_us": 10}],
    }
    path = tmp_path / "huge.json"
    path.write_text(json.dumps(topo))
    return path


class Node:
    """One node's memory and transfer services on a real NATS."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.memory = MemoryService(config)
        self.transfer = TransferService(config)

    async def tube_larger_than_tmpfs(self) -> Tube:
        """A host tube (a sparse file: no memory) bigger than the whole tmpfs, in KV."""
        n = tmpfs_bytes() + (1 << 30)
        tube_id = new_id()
        relpath = f"{TUBES_DIR}/{tube_id}"
        make_dirs(self.config.shm_dir / TUBES_DIR)
        fd = create_new(self.config.shm_dir / relpath, os.O_RDWR)
        os.ftruncate(fd, n)
        os.close(fd)
        tube = Tube(
            id=tube_id,
            tenant="t1",
            datatype="UINT8",
            shape=[n],
            nbytes=n,
            placements=[
                Placement(node=self.config.node_id, tier="host", segment=relpath, offset=0)
            ],
            created_at=time.time(),
        )
        await self.transfer.buckets.tubes.put(tube_id, encode_json(tube))
        return tube

    async def ensure(self, node: str, tube_id: str, tier: str) -> EnsureReply:
        subject = subjects.node(node, "transfer", subjects.TRANSFER_ENSURE)
        req = EnsureRequest(tube_id=tube_id, tenant="t1", tier=tier)
        return await request(self.transfer.nc, subject, req, EnsureReply, timeout=20)


@pytest.fixture
async def nodes(
    nats_server: NatsServer, tmp_path: Path, shm_dir: Path
) -> AsyncIterator[tuple[Node, Node]]:
    """node-a and node-b, each with its shm directory on the real tmpfs."""
    topology = huge_topology(tmp_path)
    made = []
    for name in ("node-a", "node-b"):
        config = make_config(
            nats_server,
            tmp_path,
            node_id=name,
            devices="sim:1",
            topology=str(topology),
            shm_dir=shm_dir / name,
        )
        made.append(Node(config))
    started = []
    try:
        for n in made:
            for svc in (n.memory, n.transfer):
                await svc.start()
                started.append(svc)
        yield made[0], made[1]
    finally:
        for svc in reversed(started):
            await svc.stop()


async def test_a_full_tmpfs_fails_a_gpu_copy_with_507_naming_the_gpu(
    nodes: tuple[Node, Node],
) -> None:
    a, _ = nodes
    tube = await a.tube_larger_than_tmpfs()
    with pytest.raises(ResourceExhausted, match="tier gpu:0 is full") as caught:
        await a.ensure("node-a", tube.id, "gpu:0")
    assert http_status(caught.value) == 507
    assert leftovers(a.config.shm_dir) == []  # the staging file is gone
    assert not list((a.config.shm_dir / "gpu").rglob(f"{tube.id}*"))
    # The GPU's room was given back: its pool holds nothing for the tube.
    blocks = await a.transfer.memory.list("gpu:0")
    assert [b for b in blocks if tube.id in b.item] == []


async def test_a_full_tmpfs_fails_a_fetch_from_another_node_with_507_naming_host(
    nodes: tuple[Node, Node],
) -> None:
    a, b = nodes
    tube = await a.tube_larger_than_tmpfs()
    with pytest.raises(ResourceExhausted, match="tier host is full") as caught:
        await b.ensure("node-b", tube.id, "host")
    assert http_status(caught.value) == 507
    assert leftovers(b.config.shm_dir) == []
    assert not list(b.config.shm_dir.rglob(tube.id))


def test_a_full_host_pool_is_a_507_naming_it(shm_dir: Path) -> None:
    backend = HostBackend(shm_dir / "pool")
    with pytest.raises(ResourceExhausted, match=r"tier host \(host pool\) is full") as caught:
        backend.create("seg0", tmpfs_bytes() + (1 << 30))
    assert http_status(caught.value) == 507
    assert list((shm_dir / "pool").iterdir()) == []


# --- staging files of crashed copies ----------------------------------------------------------


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def staging_file(final: Path, pid: int, age_s: float, now: float) -> Path:
    """A staging file beside ``final`` as a writer with ``pid`` leaves it, ``age_s`` old."""
    make_dirs(final.parent)  # private (0700), as the platform makes them
    name = staging_name(final).name.split(".")
    name[-3] = str(pid)  # .<final>.<pid>.<hex>.tmp
    path = final.with_name(".".join(name))
    path.write_bytes(b"half a copy")
    os.utime(path, (now - age_s, now - age_s))
    return path


def test_sweep_staging_by_age_and_writer(tmp_path: Path) -> None:
    now = time.time()
    gone, me = dead_pid(), os.getpid()
    old = c.STAGING_GRACE_S * 2
    crashed = staging_file(tmp_path / "gpu" / "a", gone, old, now)
    young = staging_file(tmp_path / "b", gone, c.STAGING_GRACE_S / 2, now)
    writing = staging_file(tmp_path / "c", me, old, now)  # its writer is alive
    ancient = staging_file(tmp_path / "d", me, c.STAGING_MAX_AGE_S * 2, now)
    finished = tmp_path / "e.tmp"  # not a staging name: never ours to remove
    finished.write_bytes(b"x")
    os.utime(finished, (now - old, now - old))
    swept = sweep_staging(tmp_path, now)
    assert sorted(swept) == sorted([crashed, ancient])
    assert young.exists()
    assert writing.exists()
    assert finished.exists()


async def test_the_transfer_service_sweeps_staging_files_at_start_and_in_its_sweeper(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    config = make_config(nats_server, tmp_path, node_id="node-a")
    shm, now = config.shm_dir, time.time()
    old = c.STAGING_GRACE_S * 2
    at_start = [
        staging_file(shm / TUBES_DIR / "node-a" / "t1", dead_pid(), old, now),
        staging_file(shm / "gpu" / "node-a" / "gpu0" / "t2.1", dead_pid(), old, now),
        staging_file(shm / TUBES_DIR / "t3", dead_pid(), old, now),  # a worker's tube
    ]
    young = staging_file(shm / TUBES_DIR / "node-a" / "t4", dead_pid(), 0, now)
    svc = TransferService(config)
    await svc.start()
    try:
        assert [p for p in at_start if p.exists()] == []
        assert young.exists()  # may still be written
        await svc.sweep_once(now + old)  # the sweeper, once it is old
        assert not young.exists()
    finally:
        await svc.stop()


def test_the_host_pool_sweeps_its_staging_files_at_start(tmp_path: Path) -> None:
    now = time.time()
    crashed = staging_file(tmp_path / "pool" / "seg1", dead_pid(), c.STAGING_GRACE_S * 2, now)
    HostBackend(tmp_path / "pool")
    assert not crashed.exists()


async def test_a_copy_in_progress_is_never_swept(
    nodes: tuple[Node, Node],
) -> None:
    """A staging file of a live copy (this process) survives a sweep however old."""
    a, _ = nodes
    final = a.config.shm_dir / TUBES_DIR / "node-a" / new_id()
    now = time.time()
    live = staging_file(final, os.getpid(), c.STAGING_GRACE_S * 2, now)
    await asyncio.to_thread(a.transfer.sweeper.sweep_staging, now)
    assert live.exists()
