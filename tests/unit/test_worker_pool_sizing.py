"""How many warm worker processes a node keeps: configured, demand, memory."""

from __future__ import annotations

import pytest

from gpufaas.worker.pool import MAX_EXTRA_SPARES, PROCESS_BYTES, process_cap, spares_wanted

pytestmark = pytest.mark.unit

GIB = 2**30


def test_an_idle_node_keeps_the_configured_spares() -> None:
    assert spares_wanted(1, 0, 64 * GIB) == 1
    assert spares_wanted(0, 5, 64 * GIB) == 0  # a pool of none stays none


def test_new_tenants_arriving_keep_more_ready_up_to_a_cap() -> None:
    assert spares_wanted(1, 2, 64 * GIB) == 2
    assert spares_wanted(1, 50, 64 * GIB) == 1 + MAX_EXTRA_SPARES


def test_only_as_many_as_free_memory_holds_twice_over() -> None:
    assert spares_wanted(1, 50, 3 * 2 * PROCESS_BYTES) == 3
    assert spares_wanted(1, 0, PROCESS_BYTES) == 0
    assert spares_wanted(2, 0, None) == 2  # unknown: the configuration decides


def test_the_process_cap_is_the_setting_else_what_memory_holds() -> None:
    assert process_cap(3, 64 * GIB) == 3
    assert process_cap(0, 64 * GIB) == 64 * GIB // PROCESS_BYTES
    assert process_cap(0, PROCESS_BYTES // 2) == 1  # never none
    assert process_cap(0, None) >= 2**31  # unknown memory: no cap
