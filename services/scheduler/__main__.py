"""``python -m gpufaas.scheduler``."""

from gpufaas.scheduler.service import SchedulerService
from gpufaas.shared.service import main

if __name__ == "__main__":
    main(SchedulerService)
