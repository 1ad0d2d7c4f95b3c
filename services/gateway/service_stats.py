"""Every service's endpoint and loop statistics, gathered for the gateway's ``/metrics``.

Each service answers a ``ServiceStatsRequest`` on the ``stats`` broadcast (no queue
group: all of them answer). A scrape publishes one request with a fresh inbox as its
reply subject and collects what comes back within a short window; a service that is
slow to answer, or a NATS failure, just leaves its figures out of that scrape.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import nats.errors
import structlog
from nats.aio.client import Client as NATS
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gpufaas.shared import subjects
from gpufaas.shared.errors import PlatformError
from gpufaas.shared.messages import ServiceStatsReply, ServiceStatsRequest, encode
from gpufaas.shared.rpc import decode_reply

log = structlog.get_logger()

WINDOW_S = 0.25  # the longest a scrape waits for replies
QUIET_S = 0.05  # once replies come, the scrape ends when none has come for this long
MAX_REPLIES = 1024  # bounds a scrape however many services answer

SERVICE = ("service", "node", "pid")


async def gather(
    nc: NATS, *, window_s: float = WINDOW_S, quiet_s: float = QUIET_S, limit: int = MAX_REPLIES
) -> list[ServiceStatsReply]:
    """The replies of every service to one stats broadcast (see the module docstring)."""
    replies: list[ServiceStatsReply] = []
    if not nc.is_connected:
        return replies
    loop = asyncio.get_running_loop()
    deadline = loop.time() + window_s
    try:
        sub = await nc.subscribe(nc.new_inbox(), max_msgs=limit)
    except nats.errors.Error as exc:
        log.info("metrics.stats_unavailable", error=repr(exc))
        return replies
    try:
        await nc.publish(subjects.STATS_ALL, encode(ServiceStatsRequest()), reply=sub.subject)
        while len(replies) < limit:
            left = deadline - loop.time()
            if left <= 0:
                break
            try:  # the first reply may take the whole window; then each the quiet time
                msg = await sub.next_msg(timeout=min(left, quiet_s) if replies else left)
            except nats.errors.TimeoutError:
                break
            try:
                replies.append(decode_reply(msg, ServiceStatsReply))
            except PlatformError as exc:  # an error reply, or a reply from another version
                log.info("metrics.stats_reply_skipped", error=exc.message)
    except nats.errors.Error as exc:
        log.info("metrics.stats_unavailable", error=repr(exc))
    finally:
        try:
            await sub.unsubscribe()
        except nats.errors.Error as exc:
            log.info("metrics.unsubscribe_failed", error=repr(exc))
    return replies


class _Family:
    """One metric family, with each label set once (a duplicate reply is dropped)."""

    def __init__(self, family: CounterMetricFamily | GaugeMetricFamily) -> None:
        self.family = family
        self.seen: set[tuple[str, ...]] = set()

    def add(self, labels: tuple[str, ...], value: float) -> None:
        if labels not in self.seen:
            self.seen.add(labels)
            self.family.add_metric(list(labels), value)


def _counter(name: str, doc: str, *labels: str) -> _Family:
    return _Family(CounterMetricFamily(name, doc, labels=[*SERVICE, *labels]))


def _gauge(name: str, doc: str, *labels: str) -> _Family:
    return _Family(GaugeMetricFamily(name, doc, labels=[*SERVICE, *labels]))


class ServiceStatsCollector(Collector):
    """Prometheus families of a set of stats replies (per endpoint, loop and bucket)."""

    def __init__(self, replies: list[ServiceStatsReply]) -> None:
        self.replies = replies

    def collect(self) -> Iterator[Metric]:
        ep = ("endpoint", "subject")
        requests = _counter("gpufaas_endpoint_requests_total", "Requests served", *ep)
        errors = _counter("gpufaas_endpoint_errors_total", "Requests answered by an error", *ep)
        latency = _gauge(
            "gpufaas_endpoint_latency_seconds",
            "Handler latency over the recent requests of an endpoint",
            *ep,
            "quantile",
        )
        runs = _counter("gpufaas_loop_runs_total", "Steps of a supervised loop or watch", "loop")
        failures = _counter(
            "gpufaas_loop_failures_total", "Transient failures of a supervised loop", "loop"
        )
        skipped = _counter(
            "gpufaas_loop_skipped_records_total", "Malformed records a watch skipped", "loop"
        )
        malformed = _counter(
            "gpufaas_kv_malformed_records_total", "KV records skipped as malformed", "bucket"
        )
        uptime = _gauge("gpufaas_service_uptime_seconds", "Seconds since the service started")
        for r in self.replies:
            who = (r.service, r.node, str(r.pid))
            uptime.add(who, r.uptime_s)
            for e in r.endpoints:
                at = (*who, e.name, e.subject)
                requests.add(at, e.requests)
                errors.add(at, e.errors)
                latency.add((*at, "0.5"), e.p50_us / 1e6)
                latency.add((*at, "0.99"), e.p99_us / 1e6)
            for lp in r.loops:
                runs.add((*who, lp.name), lp.runs)
                failures.add((*who, lp.name), lp.failures)
                skipped.add((*who, lp.name), lp.skipped)
            for bucket, count in sorted(r.malformed_records.items()):
                malformed.add((*who, bucket), count)
        for f in (requests, errors, latency, runs, failures, skipped, malformed, uptime):
            yield f.family


def exposition(replies: list[ServiceStatsReply]) -> bytes:
    """The replies as Prometheus text exposition."""
    registry = CollectorRegistry()
    registry.register(ServiceStatsCollector(replies))
    return generate_latest(registry)
