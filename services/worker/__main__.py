"""``python -m gpufaas.worker``: the node's worker, or its pool, or one of the pool's
processes, as ``GPUFAAS_WORKER_ROLE`` says (shared, pool, spare, tenant).

Only the role's own modules are imported: the pool manager computes nothing, so it never
imports torch (~180 MiB and a second of start-up that a spare pays instead).

``--parent-pid PID`` (given by the pool to its processes): die with that process. The
pool starts its processes without a ``preexec_fn`` (vfork, not a fork of the pool), so
the child asks for SIGTERM on its parent's death itself, first thing, then checks that
its parent is still ``PID``: a pool that died before the request was made is noticed
too, and a killed ``gpufaas up`` leaves no worker behind.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from gpufaas.shared.process import die_with_parent

if TYPE_CHECKING:
    from gpufaas.shared.config import Config
    from gpufaas.shared.service import Service


def die_with(argv: list[str]) -> None:
    """Honour ``--parent-pid PID`` (see the module docstring)."""
    if "--parent-pid" not in argv:
        return
    parent = int(argv[argv.index("--parent-pid") + 1])
    die_with_parent()
    if os.getppid() != parent:  # it died before we asked: we were handed to a reaper
        raise SystemExit(1)


def service_for(config: Config) -> Service:
    """The service of ``config.worker_role``, importing only what that role needs."""
    if config.worker_role == "pool":
        from gpufaas.worker.pool import WorkerPoolService  # noqa: PLC0415 - no torch here

        return WorkerPoolService(config)
    from gpufaas.worker.service import PooledWorkerService, WorkerService  # noqa: PLC0415

    if config.worker_role in ("spare", "tenant"):
        return PooledWorkerService(config)
    return WorkerService(config)


def run(argv: list[str]) -> None:
    die_with(argv)  # before the imports: a spare's take a second (torch)
    from gpufaas.shared.service import main  # noqa: PLC0415

    main(service_for)


if __name__ == "__main__":
    run(sys.argv)
