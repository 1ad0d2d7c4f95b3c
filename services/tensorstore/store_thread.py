"""The tensor store's one thread: every change to the store runs there, in order.

Registrations, placements on GPUs, leases and the reclaimer are serialised, so the
reclaimer never races a registration and two loads of one model never race either.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class StoreThread:
    """One executor thread and the lock held by every change to the store."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tensorstore")
        self._lock = threading.Lock()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run store work on the store's thread, in order with every other change."""

        def locked() -> T:
            with self._lock:
                return fn(*args)

        return await asyncio.get_running_loop().run_in_executor(self._executor, locked)

    def inline(self, fn: Callable[[], T]) -> T | None:
        """Run short store work on the event loop if the store thread is idle, else None.

        The lock keeps it apart from the thread's work; it is never waited for here.
        """
        if not self._lock.acquire(blocking=False):
            return None
        try:
            return fn()
        finally:
            self._lock.release()

    async def shutdown(self) -> None:
        """Off the event loop: a registration still hashing finishes in its thread."""
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
