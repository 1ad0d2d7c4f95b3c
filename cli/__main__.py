"""``python -m gpufaas``."""

from gpufaas.main import main

main()
