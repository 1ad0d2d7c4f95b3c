"""The in-process platform's fixtures (tests/integration/conftest.py), for security tests."""

from tests.integration.conftest import (  # noqa: F401 - fixtures are found by name
    platform,
    platform_config,
    platform_factory,
)
