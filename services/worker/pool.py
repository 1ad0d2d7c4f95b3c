"""The node's worker pool: a worker process per tenant, drawn from warm spares.

A cold start is won in the runtime, not the loader: starting Python and importing torch
take over a second, building an instance over resident tensors a few milliseconds. So
the node keeps ``GPUFAAS_WORKER_SPARES`` spare worker processes ready (torch and the
platform imported, NATS connected, the device set up, the model code and the builtin
models' tokenizers warmed up), and the first request of a tenant on the node binds one
of them to that tenant (``WorkerBindRequest``, sent by the scheduler when no process of
the tenant answers). A bound process serves that tenant only, for its whole life:
processes are never handed from one tenant to another. When no spare is ready a process
is started for the tenant and the reply says so (``new_process``).

The bind answers first; the replacement spare starts ``REFILL_DELAY_S`` later, from the
pool's own timer, so that neither its start nor its torch import (seconds of CPU) runs
during the bound tenant's first request. Processes are started without a ``preexec_fn``
(so with vfork: ~0.3 ms, not a fork of the pool); each arranges to die with the pool
itself (``python -m gpufaas.worker --parent-pid``). The pool manager computes nothing
and never imports torch.

Idle exit is a handshake, so that no request can meet a dying process: a tenant's process
with no instance for ``GPUFAAS_WORKER_IDLE_S`` asks the pool (``WorkerRetireRequest``),
still serving. The pool refuses while a bind of that tenant is under way or within
``RETIRE_GRACE_S`` of one returning the process (its caller's request is on its way);
otherwise it stops counting the process as the tenant's *before* it answers yes (one
event loop: no bind can interleave), and only then does the process drain its
subscriptions and exit. A request that reached it before is answered by it; one after
finds no responder, and the scheduler's bind then gets a spare, never the dying process
(the scheduler also binds once more if a process it was given does not answer, for a
crash). Exited processes, idle, stopped or crashed, are reaped by the watch loop, and
at once when they exit (a pidfd on the event loop). A tenant's process that exits without
being let go (a crash, a SIGKILL) is announced as ``worker.exited`` (node, tenant, worker
id): the scheduler then sends that process's unanswered requests again, under their
dispatch ids, and they bind a spare (see ``gpufaas.scheduler.workers``).

The pool never runs more processes than the node holds: ``GPUFAAS_MAX_WORKER_PROCESSES``
(0: the node's memory over ``PROCESS_BYTES``), spares included, one per tenant. A bind
that would need one more, or a new process with too little memory available, is answered
``Overloaded`` (429, ``Retry-After``) with the reason, never an OOM; spares make room for
tenants.

The pool manager heartbeats as the node's ``worker`` (membership, ``node.joined`` and
``node.left`` come from it); its processes have no heartbeat of their own.
"""

from __future__ import annotations

import asyncio
import dataclasses
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

from gpufaas.shared import nats_auth, subjects
from gpufaas.shared.config import Config
from gpufaas.shared.devices import NodeDevices, links_between_gpus, parse_devices
from gpufaas.shared.errors import Overloaded, PlatformError, Unavailable
from gpufaas.shared.messages import (
    DeviceInfo,
    LinkInfo,
    WorkerBindReply,
    WorkerBindRequest,
    WorkerRetireReply,
    WorkerRetireRequest,
)
from gpufaas.shared.rpc import request
from gpufaas.shared.service import Endpoint, Service, endpoint
from gpufaas.transfer.discovery import discover_topology

log = structlog.get_logger()

START_TIMEOUT_S = 120.0  # a new worker process must be serving within this
DEMAND_WINDOW_S = 60.0  # binds of new tenants counted for sizing the pool
MAX_EXTRA_SPARES = 3  # spares kept beyond the configured ones under a burst of tenants
PROCESS_BYTES = 512 * 2**20  # what a spare costs (torch imported): kept free besides it
# After a bind, the replacement spare starts this much later: the bound process's first
# request (a build and an inference, tens of ms) then has the cores to itself.
REFILL_DELAY_S = 0.5
# A process a bind returned may not retire this soon after: its caller's request is on
# its way to it (an idle exit takes GPUFAAS_WORKER_IDLE_S anyway).
RETIRE_GRACE_S = 1.0
SPARE_BIND_TIMEOUT_S = 10.0  # a ready spare answers its bind in milliseconds
FULL_RETRY_AFTER_S = 5.0  # a bind refused at the cap: when to try again (Retry-After)


def spares_wanted(base: int, recent_binds: int, free_bytes: int | None) -> int:
    """How many spares to keep ready: the configured ones (``base``, 1 by default), more
    while new tenants keep arriving (one per recent bind, at most ``MAX_EXTRA_SPARES``
    more), and only as many as the free memory holds twice over."""
    want = max(base, min(recent_binds, base + MAX_EXTRA_SPARES)) if base > 0 else 0
    if free_bytes is not None:
        want = min(want, max(free_bytes // (2 * PROCESS_BYTES), 0))
    return want


def process_cap(configured: int, total_bytes: int | None) -> int:
    """The most worker processes a node runs, spares included: ``configured`` when set
    (above 0), else as many as its memory holds (at least one); unknown memory: no cap."""
    if configured > 0:
        return configured
    if total_bytes is None:
        return 2**31
    return max(total_bytes // PROCESS_BYTES, 1)


def _meminfo(key: str) -> int | None:
    """A field of /proc/meminfo in bytes (None where there is none)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith(f"{key}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def free_memory_bytes() -> int | None:
    """``MemAvailable`` from /proc/meminfo (None where there is none)."""
    return _meminfo("MemAvailable")


def total_memory_bytes() -> int | None:
    """``MemTotal`` from /proc/meminfo (None where there is none)."""
    return _meminfo("MemTotal")


@dataclass(eq=False)
class WorkerProcess:
    """One worker process of the pool: a spare (``tenant`` None) or a tenant's."""

    id: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    tenant: str | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    returned_at: float = -1e9  # when a bind last returned it (monotonic)
    retired: bool = False  # stopped or allowed to exit: no longer counted, not yet reaped
    exit_fd: int | None = None  # its pidfd, readable once it exits (see _watch_exit)

    @property
    def alive(self) -> bool:
        """Not exited (``poll`` also reaps it once it has)."""
        return self.popen.poll() is None


class WorkerPoolService(Service):
    """Keeps warm spare worker processes and binds one to each tenant on first use."""

    name = "worker"

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.node_devices: NodeDevices = parse_devices(config.devices, config.topology)
        if self.node_devices.backend == "cuda" and self.node_devices.topology is None:
            # Real GPUs: which reach which by NVLink, from NVML (placement uses it).
            topology = discover_topology()
            self.node_devices = dataclasses.replace(self.node_devices, topology=topology)
        self.spares: list[WorkerProcess] = []
        self.bound: dict[str, WorkerProcess] = {}
        self.exiting: list[WorkerProcess] = []  # retired or stopped, not reaped yet
        self._binding: dict[str, asyncio.Task[tuple[WorkerProcess, bool]]] = {}
        self._by_id: dict[str, WorkerProcess] = {}
        self._ids = itertools.count(1)
        self.started = 0  # processes started, spares and fall-backs
        self._binds: deque[float] = deque()  # when new tenants were bound (demand)
        self._refill_at: float | None = None  # when the spares are topped up after a bind
        self.cap = process_cap(config.max_worker_processes, total_memory_bytes())
        self._lost: list[WorkerProcess] = []  # tenants' processes that died, not announced

    def devices(self) -> list[DeviceInfo]:
        return self.node_devices.devices

    def gpu_links(self) -> list[LinkInfo]:
        """The links between this node's GPUs (its topology's), for placement."""
        return links_between_gpus(self.node_devices)

    @property
    def want_spares(self) -> int:
        """Spares kept ready for the device the node's workers compute on (see
        :func:`spares_wanted`: configured, recent demand, free memory)."""
        cutoff = time.monotonic() - DEMAND_WINDOW_S
        while self._binds and self._binds[0] < cutoff:
            self._binds.popleft()
        want = spares_wanted(self.config.worker_spares, len(self._binds), free_memory_bytes())
        return min(want, max(self.cap - len(self.bound), 0))  # tenants first under the cap

    async def on_start(self) -> None:
        node = self.config.node_id
        # A plain publish of a spare's id (no reply: not an endpoint), heard before the
        # first spare starts.
        ready = subjects.node(node, "worker", subjects.WORKER_SPARE_READY)
        self._subs.append(await self.nc.subscribe(ready, cb=self._on_ready))
        self._refill()
        self.every(self.config.heartbeat_s, self._tend, "watch")
        await self.publish_event(
            "node.joined",
            {"node": node, "devices": [d.name for d in self.node_devices.devices]},
            dedupe_id=f"node.joined.{node}.{self.started_at}",
        )

    def endpoints(self) -> list[Endpoint]:
        """The node's bind (a process for a tenant) and retire (an idle process asks)."""

        def at(verb: str) -> str:
            return subjects.node(self.config.node_id, "worker", verb)

        return [
            endpoint(at(subjects.WORKER_BIND), WorkerBindRequest, self.bind),
            endpoint(at(subjects.WORKER_RETIRE), WorkerRetireRequest, self.retire),
        ]

    async def on_stop(self) -> None:
        procs = [*self.spares, *self.bound.values(), *self.exiting]
        for p in procs:
            self._unwatch_exit(p)
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
        """Start a worker process: a spare, or one bound to ``tenant`` from the start.

        No ``preexec_fn``, so Python spawns it with vfork (~0.3 ms) instead of forking this
        process; the child makes itself die with us (``--parent-pid``, see the worker's
        ``__main__``), so a killed ``gpufaas up`` still leaves no worker behind. Called on
        the event loop's thread, which lives as long as the pool: PR_SET_PDEATHSIG fires
        when the thread that started the child ends.
        """
        wid = f"{os.getpid()}-{next(self._ids)}"
        env = {
            **os.environ,
            **self.config.to_env(),
            **nats_auth.worker_identity(self.config),  # the worker role's, not the pool's
            "GPUFAAS_READY_FILE": "",
            "GPUFAAS_WORKER_ROLE": "spare" if tenant is None else "tenant",
            "GPUFAAS_WORKER_TENANT": tenant or "",
            "GPUFAAS_WORKER_SPARE_ID": wid,
        }
        logs = self._log_dir()
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"{self.config.node_id}.worker-{wid}.log"
        with log_path.open("ab") as out:
            popen = subprocess.Popen(
                [sys.executable, "-m", "gpufaas.worker", "--parent-pid", str(os.getpid())],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        proc = WorkerProcess(wid, popen, log_path, tenant)
        self._by_id[wid] = proc
        self.started += 1
        self._watch_exit(proc)
        log.info("worker.process_started", worker=wid, tenant=tenant, pid=popen.pid)
        return proc

    def _watch_exit(self, proc: WorkerProcess) -> None:
        """Be told the moment ``proc`` exits (its pidfd on the event loop), not a beat later:
        a crashed tenant's process is announced within milliseconds. Without pidfds the
        watch loop finds it at its next beat."""
        try:
            fd = os.pidfd_open(proc.popen.pid)
        except (AttributeError, OSError):
            return
        proc.exit_fd = fd
        asyncio.get_running_loop().add_reader(fd, self._exited, proc)

    def _unwatch_exit(self, proc: WorkerProcess) -> None:
        fd, proc.exit_fd = proc.exit_fd, None
        if fd is not None:
            asyncio.get_running_loop().remove_reader(fd)
            os.close(fd)

    def _exited(self, proc: WorkerProcess) -> None:
        """(Its pidfd became readable.) Reap and announce now."""
        self._unwatch_exit(proc)
        if self.looping:
            self.spawn(self._reap_now(), f"exited-{proc.id}")

    async def _reap_now(self) -> None:
        await self.bounded("reap", self._tend, None)  # a failure waits for the next beat

    def _let_go(self, proc: WorkerProcess, *, terminate: bool) -> None:
        """Count ``proc`` out (no bind returns it again); the watch loop reaps it."""
        proc.retired = True
        self.exiting.append(proc)
        if terminate and proc.alive:
            proc.popen.terminate()

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
            self._let_go(extra, terminate=True)
            log.info("worker.spare_stopped", worker=extra.id, spares=want)

    def _refill_later(self) -> None:
        """Top the spares up ``REFILL_DELAY_S`` from now (not later: a stream of binds does
        not keep postponing it)."""
        if self._refill_at is None:
            self._refill_at = time.monotonic() + REFILL_DELAY_S
            self.spawn(self._refill_after(REFILL_DELAY_S), "refill")

    async def _refill_after(self, delay: float) -> None:
        """(Once, after a bind.) Reap and top the spares up ``delay`` seconds from now."""
        await asyncio.sleep(delay)
        if not self.looping:
            return
        self._refill_at = None
        await self.bounded("refill", self._tend, None)  # a failure waits for the next beat

    def _reap(self) -> None:
        """Forget (and wait for) the processes that exited: a tenant's after its idle exit,
        a stopped spare, a crash. Nothing is left a zombie."""
        lost: list[tuple[str | None, WorkerProcess]] = [
            (t, p) for t, p in self.bound.items() if not p.alive
        ]
        lost += [(None, p) for p in self.spares if not p.alive]
        for tenant, p in lost:  # exited without being let go: a crash, or killed
            log.warning(
                "worker.process_lost",
                worker=p.id,
                tenant=tenant,
                status=p.popen.returncode,
                log=str(p.log_path),
            )
            if tenant is None:
                self.spares.remove(p)
            else:
                del self.bound[tenant]
                self._lost.append(p)  # its requests are sent again (see _announce_lost)
            self._let_go(p, terminate=False)
        for p in [p for p in self.exiting if not p.alive]:
            log.info(
                "worker.process_exited", worker=p.id, tenant=p.tenant, status=p.popen.returncode
            )
            self.exiting.remove(p)
            self._by_id.pop(p.id, None)
            self._unwatch_exit(p)

    async def _announce_lost(self) -> None:
        """``worker.exited`` for each tenant's process that died unasked: the scheduler
        sends the requests it had not answered again at once, instead of waiting for their
        deadlines. A plain publish (no round trip); the EVENTS stream keeps it too."""
        lost, self._lost = self._lost, []
        for p in lost:
            await self.publish_event(
                "worker.exited",
                {
                    "node": self.config.node_id,
                    "tenant": p.tenant,
                    "worker": p.id,
                    "pid": p.popen.pid,
                    "status": p.popen.returncode,
                },
                ack=False,
            )

    async def _tend(self) -> None:
        """Each heartbeat (and once after a bind): reap the processes that exited and keep
        the spares topped up, unless a refill is due shortly (see ``_refill_later``)."""
        self._reap()
        await self._announce_lost()
        if self._refill_at is None:
            self._refill()

    async def _wait_ready(self, proc: WorkerProcess) -> None:
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                while not proc.ready.is_set():
                    if not proc.alive:
                        raise Unavailable(
                            f"worker process {proc.id} exited while starting "
                            f"(status {proc.popen.returncode}; log {proc.log_path})"
                        )
                    try:
                        async with asyncio.timeout(0.1):
                            await proc.ready.wait()
                    except TimeoutError:
                        continue
        except TimeoutError:
            raise Unavailable(
                f"worker process {proc.id} did not start in {START_TIMEOUT_S:g} s "
                f"(log {proc.log_path})"
            ) from None

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
        proc, new = await self._find(tenant)
        proc.returned_at = time.monotonic()  # see retire: its caller's request is on its way
        return proc, new

    async def _find(self, tenant: str) -> tuple[WorkerProcess, bool]:
        own = self.bound.get(tenant)
        if own is not None and own.alive:  # never a retired one: retire removed it first
            await self._wait_ready(own)
            return own, False
        if own is not None:  # died (a crash) since the last reap: reaped with the others
            del self.bound[tenant]
            log.warning(
                "worker.process_lost",
                worker=own.id,
                tenant=tenant,
                status=own.popen.returncode,
                log=str(own.log_path),
            )
            self._let_go(own, terminate=False)
            self._lost.append(own)
            await self._announce_lost()
        self._check_room()
        self._binds.append(time.monotonic())
        while (spare := await self._ready_spare()) is not None:
            if await self._bind_spare(spare, tenant):
                self._refill_later()  # after the reply: the next tenant finds one ready too
                return spare, False
        self._check_memory()
        proc = self._start(tenant)  # nothing ready: the slow way, said in the reply
        self.bound[tenant] = proc
        try:
            await self._wait_ready(proc)
        except BaseException:
            if self.bound.get(tenant) is proc:
                del self.bound[tenant]
            self._let_go(proc, terminate=True)
            raise
        self._refill_later()
        return proc, True

    async def _bind_spare(self, spare: WorkerProcess, tenant: str) -> bool:
        """Give a ready spare to ``tenant``; False: it is broken (stopped; take another)."""
        self.spares.remove(spare)
        spare.tenant = tenant
        self.bound[tenant] = spare
        try:
            await request(
                self.nc,
                subjects.node(self.config.node_id, "worker", f"spare-{spare.id}"),
                WorkerBindRequest(tenant=tenant),
                WorkerBindReply,
                timeout=SPARE_BIND_TIMEOUT_S,
                what=f"spare worker {spare.id}",
            )
        except PlatformError as exc:
            log.warning("worker.spare_bind_failed", worker=spare.id, error=exc.message)
            if self.bound.get(tenant) is spare:
                del self.bound[tenant]
            spare.tenant = None
            self._let_go(spare, terminate=True)
            return False
        log.info("worker.spare_bound", worker=spare.id, tenant=tenant)
        return True

    # --- the cap -----------------------------------------------------------------------------

    def _cap_reason(self) -> str:
        return (
            f"node {self.config.node_id} runs {len(self.bound)} tenants' worker processes and "
            f"{len(self.spares)} spares, its cap (GPUFAAS_MAX_WORKER_PROCESSES, "
            f"else its memory) is {self.cap}; retry once a tenant's process goes idle"
        )

    def _check_room(self) -> None:
        """Refuse one more tenant's process beyond the node's cap (spares make room)."""
        if len(self.bound) >= self.cap:
            raise Overloaded(self._cap_reason(), retry_after_s=FULL_RETRY_AFTER_S)

    def _can_start(self) -> bool:
        """One more process (for the tenant being bound) stays within the cap."""
        return len(self.bound) + sum(1 for p in self.spares if p.alive) < self.cap

    async def _ready_spare(self) -> WorkerProcess | None:
        """A ready spare; at the cap, one still starting, once ready; None: start one."""
        ready = next((p for p in self.spares if p.alive and p.ready.is_set()), None)
        if ready is not None or self._can_start():
            return ready
        starting = next((p for p in self.spares if p.alive), None)
        if starting is None:
            raise Overloaded(self._cap_reason(), retry_after_s=FULL_RETRY_AFTER_S)
        await self._wait_ready(starting)
        return starting if starting in self.spares else await self._ready_spare()

    def _check_memory(self) -> None:
        """Refuse to start a process the node's available memory does not hold."""
        free = free_memory_bytes()
        if free is not None and free < PROCESS_BYTES:
            raise Overloaded(
                f"node {self.config.node_id} has {free >> 20} MiB of memory available; "
                f"a worker process needs about {PROCESS_BYTES >> 20} MiB",
                retry_after_s=FULL_RETRY_AFTER_S,
            )

    async def retire(self, req: WorkerRetireRequest) -> WorkerRetireReply:
        """(Asked by a tenant's idle process.) Yes once the process no longer counts as the
        tenant's (a later bind gets a spare); no while a bind of the tenant is under way or
        has just returned it. The check and the removal run with no await between them, so
        no bind interleaves."""
        proc = self._by_id.get(req.worker)
        if proc is None or proc.retired:  # unknown (not ours), or asked again: go
            return WorkerRetireReply(retire=True)
        if proc.tenant is not None and self.bound.get(proc.tenant) is proc:
            if proc.tenant in self._binding or time.monotonic() - proc.returned_at < RETIRE_GRACE_S:
                log.info("worker.retire_refused", worker=proc.id, tenant=proc.tenant)
                return WorkerRetireReply(retire=False)
            del self.bound[proc.tenant]
        elif proc in self.spares:
            self.spares.remove(proc)
        self._let_go(proc, terminate=False)
        log.info("worker.process_retired", worker=proc.id, tenant=proc.tenant)
        return WorkerRetireReply(retire=True)
