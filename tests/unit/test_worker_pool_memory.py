"""The pool starts no worker process the node's available memory does not hold."""

from __future__ import annotations

import pytest

from gpufaas.shared.config import Config
from gpufaas.shared.errors import Overloaded, http_status
from gpufaas.worker import pool as pool_module
from gpufaas.worker.pool import FULL_RETRY_AFTER_S, PROCESS_BYTES, WorkerPoolService

pytestmark = pytest.mark.unit


async def test_a_new_process_with_too_little_memory_available_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No spare ready and MemAvailable under what a worker needs: the bind is a 429
    with the reason and a Retry-After, and nothing is started (no OOM later)."""
    pool = WorkerPoolService(Config(devices="cpu", max_worker_processes=8))
    monkeypatch.setattr(pool_module, "free_memory_bytes", lambda: PROCESS_BYTES - 1)
    with pytest.raises(Overloaded) as err:
        await pool._find("t1")
    assert http_status(err.value) == 429
    assert err.value.retry_after_s == FULL_RETRY_AFTER_S
    assert "MiB of memory available" in err.value.message
    assert pool.started == 0
    assert not pool.bound
    # Nor does the pool keep spares it has no room for (twice a process, each).
    monkeypatch.setattr(pool_module, "free_memory_bytes", lambda: 2 * PROCESS_BYTES - 1)
    assert pool.want_spares == 0
