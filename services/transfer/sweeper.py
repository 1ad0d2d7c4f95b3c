"""The sweeper: frees this node's copies of tubes that are gone from the directory (they
expired, or the request that made them died): tube files, real GPUs' device copies, and
the host pool's blocks of swapped-out copies.

A tube's bytes are written before its KV record, so a copy younger than
``SWEEP_GRACE_S`` is never swept: its record may be on its way. Staging files
(``.<name>.<pid>.<hex>.tmp``) that a crashed copy left behind go too, once old enough
that none is still being written (``paths.sweep_staging``).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import structlog

from gpufaas.shared.errors import PlatformError
from gpufaas.shared.memory_client import TUBE_ITEM, MemoryClient
from gpufaas.shared.messages import Placement
from gpufaas.shared.paths import sweep_staging
from gpufaas.shared.shm import TUBES_DIR, host_pool_segment
from gpufaas.transfer.directory import TubeDirectory, is_tube_key
from gpufaas.transfer.residency import GPU_DIR, LocalCopies

log = structlog.get_logger()

SWEEP_GRACE_S = 30.0  # a tube file younger than this may not be in KV yet (written first)


class Sweeper:
    """One sweep at a time (``sweep_once``), run by the service's supervised loop."""

    def __init__(
        self, directory: TubeDirectory, local: LocalCopies, host_memory: MemoryClient | None
    ) -> None:
        self.directory = directory
        self.local = local
        self.host_memory = host_memory  # None: this node swaps nothing into a host pool

    def tube_files(self) -> list[Path]:
        """This node's tube files: the machine's own tubes, copies fetched here, GPU copies."""
        root, node = self.local.config.shm_dir, self.local.node
        dirs = [root / TUBES_DIR, root / TUBES_DIR / node, *(root / GPU_DIR / node).glob("*")]
        return [
            f
            for d in dirs
            if d.is_dir()
            for f in d.iterdir()
            if f.is_file() and not f.name.startswith(".")
        ]

    def sweep_staging(self, now: float) -> list[Path]:
        """Remove the staging files of crashed copies in this node's tube directories (and
        the machine's own ``tubes/``, where workers write); the files removed."""
        root, node = self.local.config.shm_dir, self.local.node
        removed = sweep_staging(root / GPU_DIR / node, now)
        tubes = root / TUBES_DIR
        removed += sweep_staging(tubes / node, now)
        if tubes.is_dir():  # its own files only: other nodes' directories are theirs
            removed += sweep_staging(tubes, now, recursive=False)
        return removed

    async def sweep_once(self, now: float) -> list[str]:
        """Free the copies of tubes gone from KV; the ids swept (tests pass their ``now``)."""
        await asyncio.to_thread(self.sweep_staging, now)
        swept = await self._files(now)
        for tube_id, tier in list(self.local.devices):  # real GPUs: copies without files
            if not await self.directory.listed(tube_id):
                await self.local.drop_device_copy(tube_id, tier)
                swept.append(tube_id)
        swept += await self._host_blocks(now)
        await asyncio.to_thread(self.local.maps.forget_missing)  # swept files, released segments
        if swept:
            log.info("transfer.swept", tubes=len(swept))
        return swept

    async def _files(self, now: float) -> list[str]:
        files = await asyncio.to_thread(self.tube_files)
        swept: list[str] = []
        for f in files:
            tube_id = f.name.partition(".")[0]  # GPU copies: <tube>.<memory block>
            if not is_tube_key(tube_id):
                continue  # not a tube's name: not ours to delete
            try:
                if now - f.stat().st_mtime < SWEEP_GRACE_S:
                    continue
            except FileNotFoundError:
                continue
            if not await self.directory.listed(tube_id):
                await self.local.drop_file(f)
                swept.append(tube_id)
        return swept

    async def _host_blocks(self, now: float) -> list[str]:
        """Give back the host pool's blocks (swapped-out copies) whose tube is gone from KV
        or no longer names them."""
        if self.host_memory is None:
            return []
        try:
            blocks = await self.host_memory.list("host")
        except PlatformError as exc:  # no memory service: nothing of ours in its pool
            log.info("transfer.host_blocks_unknown", error=exc.message)
            return []
        swept = []
        for a in blocks:
            if not a.item.startswith(TUBE_ITEM) or now - a.at < SWEEP_GRACE_S:
                continue
            tube_id = a.item.removeprefix(TUBE_ITEM)
            node = self.local.node
            here = Placement(
                node=node, tier="host", segment=host_pool_segment(node, a.segment), offset=a.offset
            )
            tube = await self.directory.get(tube_id)
            if tube is not None and here in tube.placements:
                continue
            await self.host_memory.free("host", a.id)
            swept.append(tube_id)
        return swept
