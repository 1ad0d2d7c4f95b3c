"""The tensor store service of one node (host tier; GPU tier and reclaimer come later)."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import structlog

from gpufaas.shared import subjects
from gpufaas.shared.catalog import resolve_model_dir
from gpufaas.shared.config import Config
from gpufaas.shared.errors import ModelInvalid
from gpufaas.shared.messages import RegisterReply, RegisterRequest, StoreStats, StoreStatsRequest
from gpufaas.shared.service import Service
from gpufaas.tensorstore.store import HostStore, Registration

log = structlog.get_logger()

WEIGHTS_FILE = "model.safetensors"


class TensorStoreService(Service):
    """Registers models' tensors content-addressed in host shared memory, once per node."""

    name = "tensorstore"

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.store = HostStore(config.shm_dir, config.node_id)
        # One thread: registrations are serialised, so two loads of one model never race.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tensorstore")

    async def on_start(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self.store.recover)
        log.info("tensorstore.recovered", tensors=len(self.store.index))
        node = self.config.node_id
        await self.serve(
            subjects.node(node, self.name, subjects.TENSORSTORE_REGISTER),
            RegisterRequest,
            self.register,
        )
        await self.serve(
            subjects.node(node, self.name, subjects.TENSORSTORE_STATS),
            StoreStatsRequest,
            self.stats,
        )

    async def on_stop(self) -> None:
        # Off the loop: a registration still hashing finishes in its thread.
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)

    async def register(self, req: RegisterRequest) -> RegisterReply:
        model_dir = resolve_model_dir(req.source)
        weights = model_dir / WEIGHTS_FILE
        if not weights.is_file():
            raise ModelInvalid(f"{model_dir} has no {WEIGHTS_FILE}", field="model")
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        reg: Registration = await loop.run_in_executor(
            self._executor, self.store.register_file, Path(weights)
        )
        took_us = int((time.perf_counter() - t0) * 1e6)
        log.info(
            "tensorstore.registered",
            model=str(model_dir),
            stored=reg.bytes_stored,
            deduplicated=reg.bytes_deduplicated,
            us=took_us,
            file_read=reg.file_read,
        )
        if reg.bytes_deduplicated:
            await self.publish_event(
                "tensor.deduplicated",
                {
                    "node": self.config.node_id,
                    "model": str(model_dir),
                    "bytes_saved": reg.bytes_deduplicated,
                    "tenant": req.tenant,
                },
            )
        return RegisterReply(
            model_dir=str(model_dir),
            manifest=reg.manifest,
            model_bytes=reg.model_bytes,
            bytes_stored=reg.bytes_stored,
            bytes_deduplicated=reg.bytes_deduplicated,
            register_us=took_us,
            file_read=reg.file_read,
        )

    async def stats(self, _: StoreStatsRequest) -> StoreStats:
        return StoreStats(
            node=self.config.node_id,
            tensors=len(self.store.index),
            segments=len(self.store.segments),
            bytes_stored=self.store.bytes_stored,
            bytes_requested=self.store.bytes_requested,
        )
