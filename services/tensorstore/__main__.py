"""``python -m gpufaas.tensorstore``."""

from gpufaas.shared.service import main
from gpufaas.tensorstore.service import TensorStoreService

if __name__ == "__main__":
    main(TensorStoreService)
