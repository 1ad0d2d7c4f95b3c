"""``python -m gpufaas.memory``."""

from gpufaas.memory.service import MemoryService
from gpufaas.shared.service import main

if __name__ == "__main__":
    main(MemoryService)
