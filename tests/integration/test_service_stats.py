"""Per-endpoint and per-loop statistics: each service's ``service_stats`` verb, and the
gateway's ``/metrics``, which gathers every service's over the stats broadcast."""

from __future__ import annotations

from typing import Any

import nats
import pytest
from nats.aio.msg import Msg as NatsMsg
from prometheus_client.parser import text_string_to_metric_families

from gpufaas.gateway.service_stats import gather
from gpufaas.shared import constants as c
from gpufaas.shared import subjects
from gpufaas.shared.messages import ServiceStatsReply, ServiceStatsRequest, encode
from gpufaas.shared.rpc import request
from tests.conftest import NatsServer
from tests.integration.conftest import DEMO_BODY, Platform, text_request
from tests.support import eventually

pytestmark = pytest.mark.integration

Samples = dict[str, list[tuple[dict[str, str], float]]]


async def scrape(p: Platform) -> tuple[str, Samples]:
    """``GET /metrics``: its text, and its samples by name (parsed, so valid exposition)."""
    resp = await p.client.get("/metrics")
    assert resp.status == 200
    text = await resp.text()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return text, samples


def count(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(v for lab, v in samples.get(name, []) if labels.items() <= lab.items())


async def test_metrics_hold_every_services_endpoints_and_loops(platform: Platform) -> None:
    c = platform.client
    assert (await c.post("/v1/functions", json=DEMO_BODY)).status == 201
    assert (await c.post("/v2/models/minilm/infer", json=text_request(["hi"]))).status == 200
    last: dict[str, Any] = {}

    async def complete() -> bool:
        text, samples = await scrape(platform)
        last.update(text=text, samples=samples)
        loops = {
            lab["service"]: lab["loop"] for lab, _ in samples.get("gpufaas_loop_runs_total", [])
        }
        return (
            count(
                samples, "gpufaas_endpoint_requests_total", service="scheduler", endpoint="invoke"
            )
            >= 1
            and count(samples, "gpufaas_endpoint_requests_total", service="worker", endpoint="run")
            >= 1
            and {"memory", "tensorstore", "transfer", "worker"} <= set(loops)
        )

    await eventually(complete, 15, "every service's statistics in /metrics", interval=0.05)
    text, samples = last["text"], last["samples"]
    # Each family is declared once, whatever number of services answered.
    for family in ("gpufaas_endpoint_requests_total", "gpufaas_loop_runs_total"):
        assert text.count(f"# TYPE {family} ") == 1
        assert text.count(f"# HELP {family} ") == 1
    invoke = [
        lab
        for lab, _ in samples["gpufaas_endpoint_requests_total"]
        if lab["service"] == "scheduler" and lab["endpoint"] == "invoke"
    ]
    assert invoke[0]["node"] == platform.config.node_id
    assert int(invoke[0]["pid"]) > 0
    assert invoke[0]["subject"] == subjects.SCHED_INVOKE
    quantiles = {
        lab["quantile"]
        for lab, _ in samples["gpufaas_endpoint_latency_seconds"]
        if lab["service"] == "scheduler" and lab["endpoint"] == "invoke"
    }
    assert quantiles == {"0.5", "0.99"}
    assert count(samples, "gpufaas_endpoint_latency_seconds", endpoint="invoke") > 0
    heartbeats = {
        lab["service"]
        for lab, _ in samples["gpufaas_loop_runs_total"]
        if lab["loop"] == "heartbeat"
    }
    assert {"memory", "tensorstore", "transfer", "worker"} <= heartbeats
    assert count(samples, "gpufaas_loop_runs_total", service="tensorstore", loop="reclaimer") >= 0
    assert "gpufaas_loop_failures_total" in samples
    # The gateway's own metrics are still there, first.
    assert text.index("gpufaas_http_requests_total") < text.index("gpufaas_endpoint_requests")


async def test_service_stats_verb_lists_the_endpoints(platform: Platform) -> None:
    node = platform.config.node_id
    nc = platform.services["scheduler"].nc
    subject = subjects.node(node, "tensorstore", subjects.SERVICE_STATS)
    stats = await request(nc, subject, ServiceStatsRequest(), ServiceStatsReply, timeout=5)
    assert (stats.service, stats.node) == ("tensorstore", node)
    names = {e.name for e in stats.endpoints}
    assert {"register", "stats", "renew", "release", "locality", "residency"} <= names
    assert {"evict", "prefetch", "ping", "service_stats"} <= names
    by_subject = {e.subject: e for e in stats.endpoints}
    assert by_subject[subject].requests >= 0
    assert {lp.name for lp in stats.loops} >= {"heartbeat", "reclaimer"}

    # Asking counts: the verb's own statistics show the first request once answered.
    again = await request(nc, subject, ServiceStatsRequest(), ServiceStatsReply, timeout=5)
    assert {e.subject: e for e in again.endpoints}[subject].requests >= 1


async def test_gather_keeps_valid_replies_within_its_bound(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    good = ServiceStatsReply(service="fake", node="n", pid=1, uptime_s=0.0, endpoints=[], loops=[])
    answers = [encode(good), b"\xc1 not msgpack", encode(good)]
    subs = []
    try:
        for i, data in enumerate(answers):

            async def answer(msg: NatsMsg, data: bytes = data, i: int = i) -> None:
                headers = {c.HDR_ERROR_CODE: "internal"} if i == 2 else None
                await nc.publish(msg.reply, data, headers=headers)

            subs.append(await nc.subscribe(subjects.STATS_ALL, cb=answer))
        await nc.flush()
        # A malformed reply and an error reply are left out; the good one is kept.
        assert await gather(nc) == [good]
        for sub in subs:
            await sub.unsubscribe()

        async def twice(msg: NatsMsg) -> None:
            await nc.publish(msg.reply, encode(good))
            await nc.publish(msg.reply, encode(good))

        await nc.subscribe(subjects.STATS_ALL, cb=twice)
        await nc.flush()
        assert len(await gather(nc)) == 2
        assert len(await gather(nc, limit=1)) == 1  # bounded
    finally:
        await nc.close()
    assert await gather(nc) == []  # no connection: nothing, and no error
