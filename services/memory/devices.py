"""The node's pools: one per GPU, the host tier's, and a thread for each device's calls.

The backend is chosen once, by the node's probed devices: a simulated GPU's pool accounts
the capacity (``SimBackend``); a real GPU's segments are ``cudaMalloc`` allocations
(``CudaBackend``) whose creation and release run on one thread per GPU, never on the
event loop. The host tier's pool (only on a node with GPUs) keeps its segments in
``/dev/shm`` files, kept across restarts.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Final, TypeVar

import structlog

from gpufaas.memory.pool import CUDA_ALIGN_BYTES, CudaBackend, HostBackend, SegmentPool, SimBackend
from gpufaas.shared.config import Config
from gpufaas.shared.devices import NodeDevices
from gpufaas.shared.errors import InvalidArgument
from gpufaas.shared.identity import HOST, Device
from gpufaas.shared.messages import DeviceInfo
from gpufaas.shared.shm import HOST_POOL_DIR

log = structlog.get_logger()
T = TypeVar("T")

HOST_SEGMENT_BYTES: Final = 64 << 20  # the host pool's segments (/dev/shm files)


class NodePools:
    """Every pool of the node by device name, and where each one's device calls run."""

    def __init__(
        self,
        node: str,
        gpus: dict[str, SegmentPool],
        host: SegmentPool | None = None,
        *,
        threaded: Iterable[str] = (),
    ) -> None:
        self.node = node
        self.gpus = gpus  # the GPUs' pools (``MemoryService.pools``)
        self.host = host  # the host tier's, where GPUs swap out what has no host copy
        self._threads = {
            d: ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"memory-{Device.parse(d).token}"
            )
            for d in threaded
        }

    @classmethod
    def from_config(
        cls, config: Config, node_devices: NodeDevices, *, cuda_segment_bytes: int | None = None
    ) -> NodePools:
        """The pools of the node's probed devices (real memory on a CUDA node)."""
        gpus = [d for d in node_devices.devices if d.kind != HOST]
        cuda = node_devices.backend == "cuda"
        pools = {d.name: _gpu_pool(d, config, cuda, cuda_segment_bytes) for d in gpus}
        host = None
        if gpus:
            info = next(d for d in node_devices.devices if d.kind == HOST)
            backend = HostBackend(config.shm_dir / HOST_POOL_DIR / config.node_id)
            host = SegmentPool(
                HOST,
                config.host_pool_bytes or _default_host_pool(info, backend.root),
                backend,
                segment_bytes=HOST_SEGMENT_BYTES,
                clock=time.time,
            )
        threaded = [*(pools if cuda else ()), *([HOST] if host else [])]
        return cls(config.node_id, pools, host, threaded=threaded)

    def all(self) -> dict[str, SegmentPool]:
        """Every pool: the GPUs' and the host tier's."""
        host = {HOST: self.host} if self.host is not None else {}
        return {**self.gpus, **host}

    def get(self, device: str) -> SegmentPool:
        """The pool of ``device``; ``InvalidArgument`` naming the field when it has none."""
        pools = self.all()
        pool = pools.get(device)
        if pool is None:
            raise InvalidArgument(
                f"device {device!r} has no pool on node {self.node} "
                f"(it has {', '.join(sorted(pools)) or 'none'})",
                field="device",
            )
        return pool

    async def run(self, pool: SegmentPool, fn: Callable[..., T], *args: object) -> T:
        """Run pool work that may call the device (grow, release) on its device's thread;
        a simulated pool's bookkeeping runs inline (a few microseconds)."""
        executor = self._threads.get(pool.device)
        if executor is None:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    async def close(self, *, release_gpus: bool) -> None:
        """Give a real GPU's segments back to the driver (``release_gpus``), stop the threads.
        The host pool's files stay, with what was swapped into them."""
        if release_gpus:
            for pool in self.gpus.values():
                await self.run(pool, pool.close)
        for executor in self._threads.values():
            await asyncio.to_thread(executor.shutdown, wait=True)

    def remove_orphans(self) -> None:
        """Delete host pool files no restored segment names (their KV record is gone)."""
        if self.host is None or not isinstance(self.host.backend, HostBackend):
            return
        known = self.host.segments()
        for f in self.host.backend.root.iterdir():
            if f.is_file() and f.name not in known:
                f.unlink(missing_ok=True)
                log.info("memory.orphan_removed", file=str(f))


def _gpu_pool(
    d: DeviceInfo, config: Config, cuda: bool, cuda_segment_bytes: int | None
) -> SegmentPool:
    if not cuda:
        return SegmentPool(d.name, d.memory_bytes, SimBackend(), clock=time.time)
    index = Device.parse(d.name).index  # a probed GPU "gpu:N" is CUDA device N
    assert index is not None
    return SegmentPool(
        d.name,
        d.memory_bytes,
        CudaBackend(index),
        segment_bytes=cuda_segment_bytes or config.memory_segment_bytes,
        align_bytes=CUDA_ALIGN_BYTES,
        clock=time.time,
    )


def _default_host_pool(host: DeviceInfo, root: Path) -> int:
    """A quarter of the host's memory, and no more than half of the shared-memory file
    system it lives on (a container's /dev/shm is often much smaller than the host)."""
    fs = os.statvfs(root)
    return min(host.memory_bytes // 4, fs.f_blocks * fs.f_frsize // 2)
