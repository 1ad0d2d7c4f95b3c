"""Functions' profiles: measured by their worker, chosen by DTS, kept in KV and cached."""

from __future__ import annotations

import time

import structlog

from gpufaas.scheduler.host import Host
from gpufaas.scheduler.profiles import Choice, ProfilePoint, batch_sizes, choose_config
from gpufaas.scheduler.workers import WorkerClient
from gpufaas.shared import constants as c
from gpufaas.shared import subjects
from gpufaas.shared.errors import PlatformError
from gpufaas.shared.identity import FunctionRef
from gpufaas.shared.messages import (
    FunctionSpec,
    ProfilePointMsg,
    ProfileRecord,
    WorkerProfileReply,
    WorkerProfileRequest,
)

log = structlog.get_logger()
CACHE_S = 5.0  # a profile changes once or twice in a function's life


def points_of(points: list[ProfilePointMsg]) -> list[ProfilePoint]:
    return [ProfilePoint(p.batch, p.concurrency, p.latency_s, p.memory_bytes) for p in points]


def slo_s(spec: FunctionSpec) -> float | None:
    return spec.options.slo_ms / 1e3 if spec.options.slo_ms else None


def check_slo(spec: FunctionSpec, points: list[ProfilePointMsg]) -> str:
    """Refuse a deploy whose SLO not even batch 1 meets (raises naming options.slo_ms)."""
    choice = choose_config(points_of(points), slo_s(spec), max_batch=1)
    return f"batch 1 measured ({choice.latency_s * 1e3:.1f} ms); the full profile follows"


class Profiles:
    """Profiles in KV (``profiles`` bucket), read through a short cache."""

    def __init__(self, host: Host, workers: WorkerClient) -> None:
        self.host = host
        self.workers = workers
        self._cache: dict[str, tuple[float, ProfileRecord | None]] = {}  # key -> (read at, …)

    async def of(self, ref: FunctionRef) -> ProfileRecord | None:
        """A function's profile record, cached for a few seconds."""
        cached = self._cache.get(ref.key)
        if cached is not None and time.monotonic() - cached[0] < CACHE_S:
            return cached[1]
        record = await self.host.kv.profiles.value(ref.key)
        self._cache[ref.key] = (time.monotonic(), record)
        return record

    async def measure(
        self, node: str, spec: FunctionSpec, batches: list[int], *, repeats: int, deadline_s: float
    ) -> WorkerProfileReply:
        """Ask ``node``'s worker to profile ``spec`` at ``batches``."""
        reply, _ = await self.workers.call(
            node,
            spec.tenant,
            subjects.WORKER_PROFILE,
            WorkerProfileRequest(
                spec=spec,
                batches=batches,
                repeats=repeats,
                concurrencies=self.concurrencies(),
                deadline_s=deadline_s,
            ),
            WorkerProfileReply,
            timeout=deadline_s + self.host.config.deploy_timeout_s,
        )
        return reply

    def concurrencies(self) -> list[int]:
        """Concurrencies to profile; each worker measures those its device can run."""
        return list(range(1, max(self.host.config.device_streams, c.CUDA_DEVICE_STREAMS) + 1))

    async def put(
        self,
        spec: FunctionSpec,
        reply: WorkerProfileReply,
        *,
        complete: bool,
        reason: str,
        batch: int | None = None,
        concurrency: int = 1,
    ) -> ProfileRecord:
        record = ProfileRecord(
            spec=spec,
            device=reply.device,
            points=reply.points,
            batch=batch or spec.options.max_batch_size,
            concurrency=concurrency,
            reason=reason,
            complete=complete,
            measured_at=time.time(),
        )
        key = FunctionRef(spec.tenant, spec.name).key
        await self.host.kv.profiles.put(key, record)
        self._cache[key] = (time.monotonic(), record)
        return record

    async def _still_there(self, spec: FunctionSpec, node: str | None = None) -> bool:
        """Whether ``spec`` is still deployed (on ``node`` when given)."""
        current = await self.host.kv.functions.value(FunctionRef(spec.tenant, spec.name).key)
        if current is None or current.spec != spec:
            return False
        return node is None or node in current.nodes

    async def _measure_all(self, node: str, spec: FunctionSpec) -> WorkerProfileReply:
        """One batch size per request so that requests interleave, within the budget."""
        start = time.monotonic()
        points: list[ProfilePointMsg] = []
        device = ""
        for b in batch_sizes(spec.options.max_batch_size):
            left = self.host.config.profile_s - (time.monotonic() - start)
            if left <= 0 or not await self._still_there(spec, node):
                break  # out of time, or the function is gone or moved
            reply = await self.measure(node, spec, [b], repeats=3, deadline_s=left)
            device = reply.device
            points += [p for p in reply.points if p.batch == b]
        return WorkerProfileReply(device=device, points=points)

    async def sweep(self, node: str, spec: FunctionSpec) -> None:
        """The full profile, then the DTS choice into KV (``profile.completed``). Failures
        are logged, not raised: the function keeps its default configuration."""
        try:
            measured = await self._measure_all(node, spec)
            if not measured.points:
                return
            record = await self.host.kv.functions.value(FunctionRef(spec.tenant, spec.name).key)
            choice = choose_config(
                points_of(measured.points),
                slo_s(spec),
                max_batch=spec.options.max_batch_size,
                weights_bytes=record.model_bytes if record else 0,
            )
        except PlatformError as exc:
            log.warning("profile.failed", function=spec.name, error=exc.message)
            return
        if not await self._still_there(spec):
            return  # deleted or redeployed meanwhile
        await self.put(
            spec,
            measured,
            complete=True,
            reason=choice.reason,
            batch=choice.batch,
            concurrency=choice.concurrency,
        )
        await self._announce(spec, measured, choice)

    async def _announce(
        self, spec: FunctionSpec, measured: WorkerProfileReply, choice: Choice
    ) -> None:
        await self.host.publish_event(
            "profile.completed",
            {
                "function": spec.name,
                "tenant": spec.tenant,
                "device": measured.device,
                "batch": choice.batch,
                "concurrency": choice.concurrency,
                "latency_ms": round(choice.latency_s * 1e3, 3),
                "throughput_rps": round(choice.throughput_rps, 1),
                "reason": choice.reason,
                "points": len(measured.points),
            },
        )
