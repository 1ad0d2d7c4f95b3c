"""``python -m gpufaas.worker``: the node's worker, or its pool, or one of the pool's
processes, as ``GPUFAAS_WORKER_ROLE`` says (shared, pool, spare, tenant)."""

from gpufaas.shared.config import Config
from gpufaas.shared.service import Service, main
from gpufaas.worker.pool import WorkerPoolService
from gpufaas.worker.service import PooledWorkerService, WorkerService


def _service(config: Config) -> Service:
    if config.worker_role == "pool":
        return WorkerPoolService(config)
    if config.worker_role in ("spare", "tenant"):
        return PooledWorkerService(config)
    return WorkerService(config)


if __name__ == "__main__":
    main(_service)
