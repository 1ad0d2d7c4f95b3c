"""The gateway's view of the scheduler replicas' load reports: the latest per replica,
summed per function, and a replica silent past the horizon no longer counted."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from gpufaas.gateway.loads import Load, Loads, LoadsCollector
from gpufaas.shared.messages import FunctionLoadReport, SchedulerLoad

pytestmark = pytest.mark.unit


def report(replica: str, *functions: tuple[str, int, int]) -> SchedulerLoad:
    return SchedulerLoad(
        replica=replica,
        at=0.0,
        functions=[
            FunctionLoadReport(key, 0, queued, running) for key, queued, running in functions
        ],
    )


def test_latest_report_per_replica_summed_and_expired() -> None:
    now = [100.0]
    loads = Loads(horizon_s=3.0, clock=lambda: now[0])
    assert loads.of("t.f") == Load()
    loads.report(report("a", ("t.f", 4, 1), ("t.g", 9, 9)))
    loads.report(report("b", ("t.f", 2, 2)))
    assert loads.of("t.f") == Load(queued=6, in_flight=3, replicas=2)
    loads.report(report("a", ("t.f", 1, 0)))  # replaces a's previous report
    assert loads.of("t.f") == Load(queued=3, in_flight=2, replicas=2)
    now[0] += 2.0
    loads.report(report("b"))  # b's queue emptied: the function is left out of its report
    assert loads.of("t.f") == Load(queued=1, in_flight=0, replicas=2)
    now[0] += 1.5  # a silent for 3.5 s: gone
    assert loads.of("t.f") == Load(queued=0, in_flight=0, replicas=1)
    assert loads.of("other.f").to_json() == {"queued": 0, "in_flight": 0, "replicas": 1}


def test_the_queues_are_prometheus_gauges_per_function() -> None:
    loads = Loads(horizon_s=3.0, clock=lambda: 100.0)
    loads.report(report("a", ("t.f", 4, 1)))
    loads.report(report("b", ("t.f", 2, 2), ("u.g", 0, 5)))
    registry = CollectorRegistry()
    registry.register(LoadsCollector(loads))
    text = generate_latest(registry).decode()
    assert 'gpufaas_function_queued{function="f",tenant="t"} 6.0' in text
    assert 'gpufaas_function_in_flight{function="f",tenant="t"} 3.0' in text
    assert 'gpufaas_function_in_flight{function="g",tenant="u"} 5.0' in text
