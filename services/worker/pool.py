"""The node's worker pool: a worker process per tenant, drawn from warm spares.

A cold start is won in the runtime, not the loader: starting Python and importing torch
take over a second, building an instance over resident tensors a few milliseconds. So
the node keeps ``GPUFAAS_WORKER_SPARES`` spare worker processes ready (torch and the
platform imported, NATS connected, the device set up), and the first request of a tenant
on the node binds one of them to that tenant (``WorkerBindRequest``, sent by the
scheduler when no process of the tenant answers). A bound process serves that tenant
only, for its whole life: processes are never handed from one tenant to another. The
pool refills in the background; when no spare is ready it starts a process for the
tenant and says so (``new_process``). A tenant's process with no instance for
``GPUFAAS_WORKER_IDLE_S`` exits, so an idle node holds only its spares.

The pool manager heartbeats as the node's ``worker`` (membership, ``node.joined`` and
``node.left`` come from it); its processes have no heartbeat of their own.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from nats.aio.msg import Msg as NatsMsg

from gpufaas.shared import subjects
from gpufaas.shared.config import Config
from gpufaas.shared.devices import NodeDevices, parse_devices
from gpufaas.shared.errors import Unavailable
from gpufaas.shared.messages import DeviceInfo, WorkerBindReply, WorkerBindRequest
from gpufaas.shared.process import die_with_parent
from gpufaas.shared.rpc import request
from gpufaas.shared.service import Service

log = structlog.get_logger()

START_TIMEOUT_S = 120.0  # a new worker process must be serving within this
DEMAND_WINDOW_S = 60.0  # binds of new tenants counted for sizing the pool
MAX_EXTRA_SPARES = 3  # spares kept beyond the configured ones under a burst of tenants
PROCESS_BYTES = 512 * 2**20  # what a spare costs (torch imported): kept free besides it


def spares_wanted(base: int, recent_binds: int, free_bytes: int | None) -> int:
    """How many spares to keep ready: the configured ones (``base``, 1 by default), more
    while new tenants keep arriving (one per recent bind, at most ``MAX_EXTRA_SPARES``
    more), and only as many as the free memory holds twice over."""
    want = max(base, min(recent_binds, base + MAX_EXTRA_SPARES)) if base > 0 else 0
    if free_bytes is not None:
        want = min(want, max(free_bytes // (2 * PROCESS_BYTES), 0))
    return want


def free_memory_bytes() -> int | None:
    """``MemAvailable`` from /proc/meminfo (None where there is none)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass(eq=False)
class WorkerProcess:
    """One worker process of the pool: a spare (``tenant`` None) or a tenant's."""

    id: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    tenant: str | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None


class WorkerPoolService(Service):
    """Keeps warm spare worker processes and binds one to each tenant on first use."""

    name = "worker"

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.node_devices: NodeDevices = parse_devices(config.devices, config.topology)
        self.spares: list[WorkerProcess] = []
        self.bound: dict[str, WorkerProcess] = {}
        self._binding: dict[str, asyncio.Task[tuple[WorkerProcess, bool]]] = {}
        self._by_id: dict[str, WorkerProcess] = {}
        self._ids = itertools.count(1)
        self.started = 0  # processes started, spares and fall-backs
        self._binds: deque[float] = deque()  # when new tenants were bound (demand)

    def devices(self) -> list[DeviceInfo]:
        return self.node_devices.devices

    @property
    def want_spares(self) -> int:
        """Spares kept ready for the device the node's workers compute on (see
        :func:`spares_wanted`: configured, recent demand, free memory)."""
        cutoff = time.monotonic() - DEMAND_WINDOW_S
        while self._binds and self._binds[0] < cutoff:
            self._binds.popleft()
        return spares_wanted(self.config.worker_spares, len(self._binds), free_memory_bytes())

    async def on_start(self) -> None:
        node = self.config.node_id
        ready = subjects.node(node, "worker", subjects.WORKER_SPARE_READY)
        self._subs.append(await self.nc.subscribe(ready, cb=self._on_ready))
        await self.serve(subjects.node(node, "worker", subjects.WORKER_BIND),
                         WorkerBindRequest, self.bind)  # fmt: skip
        self._refill()
        self.spawn(self._watch_loop(), "watch")
        await self.publish_event(
            "node.joined",
            {"node": node, "devices": [d.name for d in self.node_devices.devices]},
            dedupe_id=f"node.joined.{node}.{self.started_at}",
        )

    async def on_stop(self) -> None:
        procs = [*self.spares, *self.bound.values()]
        for p in procs:
            if p.alive:
                p.popen.terminate()
        deadline = time.monotonic() + self.config.shutdown_deadline_s
        for p in procs:  # each drains its requests and releases its leases, then exits
            left = max(deadline - time.monotonic(), 0.0)
            try:
                await asyncio.to_thread(p.popen.wait, left)
            except subprocess.TimeoutExpired:
                p.popen.kill()
                await asyncio.to_thread(p.popen.wait)
        await self.publish_event(
            "node.left",
            {"node": self.config.node_id, "reason": "stopped"},
            dedupe_id=f"node.left.{self.config.node_id}.{self.started_at}",
        )

    # --- processes -------------------------------------------------------------------------

    def _log_dir(self) -> Path:
        """Beside the pool's own log when ``gpufaas up`` started it, else the data dir."""
        if self.config.ready_file:
            return Path(self.config.ready_file).parent / "logs"
        return self.config.data_dir / "logs"

    def _start(self, tenant: str | None) -> WorkerProcess:
        """Start a worker process: a spare, or one bound to ``tenant`` from the start."""
        wid = f"{os.getpid()}-{next(self._ids)}"
        env = {**os.environ, **self.config.to_env(), "GPUFAAS_READY_FILE": "",
               "GPUFAAS_WORKER_ROLE": "spare" if tenant is None else "tenant",
               "GPUFAAS_WORKER_TENANT": tenant or "", "GPUFAAS_WORKER_SPARE_ID": wid}  # fmt: skip
        logs = self._log_dir()
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"{self.config.node_id}.worker-{wid}.log"
        with log_path.open("ab") as out:
            popen = subprocess.Popen(
                [sys.executable, "-m", "gpufaas.worker"], env=env, stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,  # noqa: PLW1509 - only calls prctl, no locks
            )  # fmt: skip
        proc = WorkerProcess(wid, popen, log_path, tenant)
        self._by_id[wid] = proc
        self.started += 1
        log.info("worker.process_started", worker=wid, tenant=tenant, pid=popen.pid)
        return proc

    async def _on_ready(self, msg: NatsMsg) -> None:
        proc = self._by_id.get(msg.data.decode(errors="replace"))
        if proc is not None:
            proc.ready.set()

    def _refill(self) -> None:
        """Start spares until ``want_spares`` are ready or starting; stop the ones beyond it
        (a burst of new tenants is over, or memory got short)."""
        self.spares = [p for p in self.spares if p.alive]
        want = self.want_spares
        for _ in range(want - len(self.spares)):
            self.spares.append(self._start(None))
        while len(self.spares) > want:
            extra = self.spares.pop()
            self._by_id.pop(extra.id, None)
            extra.popen.terminate()
            log.info("worker.spare_stopped", worker=extra.id, spares=want)

    async def _watch_loop(self) -> None:
        """Each heartbeat: forget processes that exited (a tenant's idle one, or a crash);
        keep the spares topped up."""
        while self.looping:
            await asyncio.sleep(self.config.heartbeat_s)
            for tenant, p in list(self.bound.items()):
                if not p.alive:
                    log.info("worker.process_exited", worker=p.id, tenant=tenant,
                             status=p.popen.returncode)  # fmt: skip
                    del self.bound[tenant]
                    self._by_id.pop(p.id, None)
            self._refill()

    async def _wait_ready(self, proc: WorkerProcess) -> None:
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                while not proc.ready.is_set():
                    if not proc.alive:
                        raise Unavailable(f"worker process {proc.id} exited while starting "
                                          f"(status {proc.popen.returncode}; log {proc.log_path})")  # fmt: skip
                    try:
                        async with asyncio.timeout(0.1):
                            await proc.ready.wait()
                    except TimeoutError:
                        continue
        except TimeoutError:
            raise Unavailable(f"worker process {proc.id} did not start in {START_TIMEOUT_S:g} s "
                              f"(log {proc.log_path})") from None  # fmt: skip

    # --- binding ---------------------------------------------------------------------------

    async def bind(self, req: WorkerBindRequest) -> WorkerBindReply:
        """A process for ``req.tenant``: its own if it has one, else a ready spare bound to
        it, else a new one (the slow fall-back). Concurrent binds of a tenant share one."""
        t0 = time.perf_counter()
        task = self._binding.get(req.tenant)
        if task is None:
            task = asyncio.create_task(self._bind(req.tenant))
            self._binding[req.tenant] = task
            task.add_done_callback(lambda _: self._binding.pop(req.tenant, None))
        proc, new = await asyncio.shield(task)
        waited = int((time.perf_counter() - t0) * 1e6)
        return WorkerBindReply(worker=proc.id, waited_us=waited, new_process=new)

    async def _bind(self, tenant: str) -> tuple[WorkerProcess, bool]:
        own = self.bound.get(tenant)
        if own is not None and own.alive:
            await self._wait_ready(own)
            return own, False
        self._binds.append(time.monotonic())
        spare = next((p for p in self.spares if p.alive and p.ready.is_set()), None)
        if spare is not None:
            self.spares.remove(spare)
            self._refill()  # in the background: the next tenant finds one ready too
            await request(
                self.nc, subjects.node(self.config.node_id, "worker", f"spare-{spare.id}"),
                WorkerBindRequest(tenant=tenant), WorkerBindReply, timeout=10,
                what=f"spare worker {spare.id}",
            )  # fmt: skip
            spare.tenant = tenant
            self.bound[tenant] = spare
            log.info("worker.spare_bound", worker=spare.id, tenant=tenant)
            return spare, False
        proc = self._start(tenant)  # nothing ready: the slow way, said in the reply
        self.bound[tenant] = proc
        try:
            await self._wait_ready(proc)
        except BaseException:
            self.bound.pop(tenant, None)
            if proc.alive:
                proc.popen.terminate()
            raise
        self._refill()
        return proc, True
