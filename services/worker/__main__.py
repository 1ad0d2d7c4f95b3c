"""``python -m gpufaas.worker``."""

from gpufaas.shared.service import main
from gpufaas.worker.service import WorkerService

if __name__ == "__main__":
    main(WorkerService)
