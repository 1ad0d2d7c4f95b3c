"""The scheduler replicas' latest load reports, as this gateway heard them.

Each replica publishes a ``SchedulerLoad`` on ``scheduler.load`` every autoscaling tick
(its functions' queued and running requests; a function with neither is left out). The
gateway keeps the last report of each replica, timed by its own clock when it arrived,
so ``GET /v1/functions`` shows a function's queue without asking anyone: the sum over
the replicas heard from within ``horizon_s`` (a replica gone silent stops counting).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import structlog
from nats.aio.msg import Msg as NatsMsg
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gpufaas.shared.errors import InvalidArgument
from gpufaas.shared.messages import FunctionLoadReport, SchedulerLoad, decode

log = structlog.get_logger()


@dataclass(frozen=True, slots=True)
class Load:
    """One function's requests summed over the live replicas' latest reports."""

    queued: int = 0
    in_flight: int = 0
    replicas: int = 0  # replicas heard from within the horizon (0: no figure at all)

    def to_json(self) -> dict[str, int]:
        return {"queued": self.queued, "in_flight": self.in_flight, "replicas": self.replicas}


class Loads:
    """The latest report per scheduler replica and when it came."""

    def __init__(self, horizon_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.horizon_s = horizon_s
        self._clock = clock
        self._latest: dict[str, tuple[float, dict[str, FunctionLoadReport]]] = {}

    def report(self, load: SchedulerLoad) -> None:
        """Keep ``load`` as its replica's latest."""
        self._latest[load.replica] = (self._clock(), {f.function: f for f in load.functions})
        self._live()  # bounded: a replica restarted under a new id is forgotten

    async def on_msg(self, msg: NatsMsg) -> None:
        """A ``scheduler.load`` message; a malformed one is logged and dropped."""
        try:
            self.report(decode(msg.data, SchedulerLoad))
        except InvalidArgument as exc:
            log.warning("gateway.bad_scheduler_load", error=exc.message)

    def all(self) -> dict[str, Load]:
        """Every function a live replica reported, by key (``tenant.name``)."""
        keys = {k for by_key in self._live() for k in by_key}
        return {k: self.of(k) for k in sorted(keys)}

    def of(self, key: str) -> Load:
        """Function ``key`` (``tenant.name``) over the replicas heard from lately."""
        live = self._live()
        reports = [f for by_key in live if (f := by_key.get(key)) is not None]
        return Load(sum(f.queued for f in reports), sum(f.in_flight for f in reports), len(live))

    def _live(self) -> list[dict[str, FunctionLoadReport]]:
        """The latest reports of the replicas heard from within the horizon; the others
        (gone, or never to report again) are dropped."""
        since = self._clock() - self.horizon_s
        for replica in [r for r, (at, _) in self._latest.items() if at < since]:
            del self._latest[replica]
        return [by_key for _, by_key in self._latest.values()]


class LoadsCollector(Collector):
    """The replicas' queues as Prometheus gauges, per function: what a HorizontalPodAutoscaler
    of the schedulers (or an alert) reads through an adapter (``docs/deploy.md``)."""

    def __init__(self, loads: Loads) -> None:
        self.loads = loads

    def collect(self) -> Iterator[Metric]:
        labels = ["tenant", "function"]
        queued = GaugeMetricFamily(
            "gpufaas_function_queued", "Requests waiting in the schedulers' queues", labels=labels
        )
        running = GaugeMetricFamily(
            "gpufaas_function_in_flight",
            "Requests the schedulers have sent to instances and not yet had answered",
            labels=labels,
        )
        for key, load in self.loads.all().items():
            tenant, _, name = key.partition(".")
            queued.add_metric([tenant, name], load.queued)
            running.add_metric([tenant, name], load.in_flight)
        yield queued
        yield running
