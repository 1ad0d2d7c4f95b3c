"""``python -m gpufaas.transfer``."""

from gpufaas.shared.service import main
from gpufaas.transfer.service import TransferService

if __name__ == "__main__":
    main(TransferService)
