"""A worker process's lanes: one per device it computes on, each with its own threads,
ready queue and tensor I/O.

One process drives every GPU of its node that its tenant's instances are placed on (like
a Triton server driving per-GPU model instances): an instance computes on its lane's
executor (one ordered stream of work per device, each thread with the lane's CUDA
device current), batches with the other requests of its lane only, and reads and writes
its tubes on its lane's (simulated) GPU tier. A lane is made on first use; a CUDA lane
creates its device context on its own thread when made.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from gpufaas.shared.devices import NodeDevices
from gpufaas.shared.errors import InvalidArgument
from gpufaas.shared.identity import Device
from gpufaas.shared.service import Service
from gpufaas.worker.batcher import Batcher, Execute, Infer
from gpufaas.worker.runners import Inputs, Output
from gpufaas.worker.tensor_io import TensorIO


def _set_cuda_device(index: int) -> None:
    """(Each thread of a CUDA lane, as it starts.) Make the lane's GPU the current device,
    so that what a runner or a profile does without naming a device happens there."""
    import torch  # noqa: PLC0415 - only on a CUDA node

    torch.cuda.set_device(index)


def init_cuda(index: int) -> None:
    """Create the CUDA context of GPU ``index`` on the calling (device) thread."""
    import torch  # noqa: PLC0415 - only on a CUDA node

    torch.cuda.set_device(index)
    torch.zeros(1, device=f"cuda:{index}")


def trim_cuda_cache(index: int) -> int:
    """(The device thread of an idle worker.) Give torch's cached, unused CUDA blocks back
    to the driver: a function's intermediates live in its reservation, a hold of the
    memory manager's budget that ends with its load, so an idle worker must not keep
    them. Returns the bytes given back."""
    import torch  # noqa: PLC0415 - only on a CUDA node

    before = torch.cuda.memory_reserved(index)
    torch.cuda.empty_cache()
    return int(before - torch.cuda.memory_reserved(index))


@dataclass(slots=True)
class Lane:
    """One device a worker process computes on."""

    gpu: str | None  # "gpu:N"; None on a node without a GPU
    device: str  # what instances and replies name: the GPU, or "cpu"
    cuda_index: int | None  # its CUDA device (real GPUs only)
    executor: ThreadPoolExecutor  # its ordered stream of device work
    batcher: Batcher
    io: TensorIO


def _on(executor: ThreadPoolExecutor) -> Execute:
    """What runs a batch's ``fn(inputs)`` on a lane's threads (its batcher's executor)."""

    def execute(fn: Infer, inputs: Inputs) -> asyncio.Future[dict[str, Output]]:
        return asyncio.get_running_loop().run_in_executor(executor, fn, inputs)

    return execute


class Lanes:
    """A worker process's lanes by device, made on first use."""

    def __init__(
        self, service: Service, devices: NodeDevices, *, streams: int, batch_wait_s: float
    ) -> None:
        self.service = service
        self.backend = devices.backend
        self.streams = streams
        self.batch_wait_s = batch_wait_s
        self.gpus = [d.name for d in devices.devices if d.kind != "host"]
        self.by_device: dict[str, Lane] = {}
        self._ready: dict[str, asyncio.Future[None]] = {}  # CUDA lanes: context made
        # The node's first GPU (or the host): the lane of a request that names none.
        self.default = self._make(self.gpus[0] if self.gpus else None)

    def check(self, device: str | None) -> str | None:
        """The GPU a request names, checked to be one of this node's (None: the default)."""
        if device is None or device == self.default.gpu:
            return self.default.gpu
        if device not in self.gpus:
            raise InvalidArgument(
                f"device {device!r} is not a GPU of node {self.service.config.node_id} "
                f"(it has {', '.join(self.gpus) or 'none'})",
                field="device",
            )
        return device

    async def lane(self, device: str | None) -> Lane:
        """The lane of ``device`` (checked; None: the default), made and its CUDA context
        created on its own thread on first use."""
        gpu = self.check(device)
        lane = self.by_device.get(gpu or "cpu") or self._make(gpu)
        if lane.cuda_index is not None and lane is not self.default:
            ready = self._ready.get(lane.device)
            if ready is None:
                loop = asyncio.get_running_loop()
                ready = loop.run_in_executor(lane.executor, init_cuda, lane.cuda_index)
                self._ready[lane.device] = ready
            try:
                await asyncio.shield(ready)
            except BaseException:
                if ready.done():  # failed: the next request tries again
                    self._ready.pop(lane.device, None)
                raise
        return lane

    def _make(self, gpu: str | None) -> Lane:
        device = gpu or "cpu"
        index = Device.parse(gpu).index if gpu is not None and self.backend == "cuda" else None
        executor = (
            ThreadPoolExecutor(
                max_workers=self.streams,
                thread_name_prefix=f"dev-{device}",
                initializer=_set_cuda_device,
                initargs=(index,),
            )
            if index is not None
            else ThreadPoolExecutor(max_workers=self.streams, thread_name_prefix=f"dev-{device}")
        )
        batcher = Batcher(_on(executor), streams=self.streams, batch_wait_s=self.batch_wait_s)
        io = TensorIO(self.service, gpu=gpu, backend=self.backend)
        lane = Lane(gpu, device, index, executor, batcher, io)
        self.by_device[device] = lane
        return lane

    def of(self, device: str) -> Lane:
        """The lane an instance on ``device`` computes on."""
        return self.by_device[device]

    def cuda(self) -> list[Lane]:
        """The lanes of real GPUs."""
        return [lane for lane in self.by_device.values() if lane.cuda_index is not None]

    async def stop_batching(self) -> None:
        """Stop every lane's dispatcher; the requests still waiting hear why."""
        for lane in list(self.by_device.values()):
            await lane.batcher.stop()

    async def shutdown(self) -> None:
        """Stop every lane's threads, off the loop (a batch still computing finishes)."""
        for lane in list(self.by_device.values()):
            await asyncio.to_thread(lane.executor.shutdown, wait=True, cancel_futures=True)
