"""The gateway's rendering of every service's statistics as Prometheus text."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gpufaas.gateway.service_stats import exposition
from gpufaas.shared.messages import EndpointStats, LoopStats, ServiceStatsReply

pytestmark = pytest.mark.unit


def reply(service: str, node: str = "n1", pid: int = 7) -> ServiceStatsReply:
    return ServiceStatsReply(
        service=service,
        node=node,
        pid=pid,
        uptime_s=1.5,
        endpoints=[
            EndpointStats(
                name="invoke",
                subject=f"gpufaas.v1.{service}.invoke",
                requests=3,
                errors=1,
                p50_us=1500,
                p99_us=20_000,
            )
        ],
        loops=[LoopStats(name="heartbeat", runs=4, failures=2, last_error="TimeoutError()")],
        malformed_records={"functions": 2},
    )


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def test_families_per_endpoint_loop_and_bucket() -> None:
    got = samples(exposition([reply("scheduler"), reply("worker", pid=8)]).decode())
    who = {"service": "scheduler", "node": "n1", "pid": "7"}
    at = {**who, "endpoint": "invoke", "subject": "gpufaas.v1.scheduler.invoke"}
    assert (at, 3.0) in got["gpufaas_endpoint_requests_total"]
    assert (at, 1.0) in got["gpufaas_endpoint_errors_total"]
    assert ({**at, "quantile": "0.5"}, 0.0015) in got["gpufaas_endpoint_latency_seconds"]
    assert ({**at, "quantile": "0.99"}, 0.02) in got["gpufaas_endpoint_latency_seconds"]
    assert ({**who, "loop": "heartbeat"}, 4.0) in got["gpufaas_loop_runs_total"]
    assert ({**who, "loop": "heartbeat"}, 2.0) in got["gpufaas_loop_failures_total"]
    assert ({**who, "bucket": "functions"}, 2.0) in got["gpufaas_kv_malformed_records_total"]
    assert (who, 1.5) in got["gpufaas_service_uptime_seconds"]
    assert len(got["gpufaas_endpoint_requests_total"]) == 2


def test_each_family_declared_once_labels_escaped_duplicates_dropped() -> None:
    odd = 'n"1\\x\ny'
    text = exposition([reply("scheduler", node=odd), reply("scheduler", node=odd)]).decode()
    assert text.count("# TYPE gpufaas_endpoint_requests_total counter") == 1
    assert text.count("# HELP gpufaas_endpoint_requests_total ") == 1
    got = samples(text)
    (only,) = got["gpufaas_endpoint_requests_total"]  # the same service twice: once
    assert only[0]["node"] == odd


def test_no_replies_no_samples() -> None:
    got = samples(exposition([]).decode())
    assert all(not v for v in got.values())
