"""Cold start: request to first result for a function with no instance (issue 8).

Three kinds of cold request, ``--runs`` timed rounds each (after one untimed round), in
one run, plus (a) again without the worker pool for reference:

(a) gpufaas, tensors resident, through a ready worker from the pool. ``gpufaas up --demo
    --devices cpu`` (the node's worker is a pool: one process per tenant, bound from warm
    spares) with instances kept only 1 s after their last request
    (``GPUFAAS_INSTANCE_KEEP_ALIVE_S=1``, autoscaling tick 0.2 s), one spare
    (``GPUFAAS_WORKER_SPARES=1``) and a tenant's process leaving 1 s after its last
    instance (``GPUFAAS_WORKER_IDLE_S=1``). Each round deploys a new function of the demo
    model (``{"builtin": "all-minilm-l6-v2"}``, whose tensors the demo ``minilm`` put in
    the node's tensor store; the model is not tenant-private, so they are shared across
    tenants) under a NEW tenant (``X-Gpufaas-Tenant: r<N>``), waits until it has scaled to
    zero (``GET /v1/functions/<name>`` lists no node and the store holds no lease), the
    tenant's process has exited, and every spare of the pool is ready (the pool's
    processes are read from ``/proc`` and their logs, see :func:`pool_state`), then
    times ``POST /v2/models/<name>/infer`` from sending it to having the decoded reply,
    which must say ``Gpufaas-Cold: 1``: the pool binds a ready spare to the tenant
    (``Gpufaas-Worker-Us``, ``Gpufaas-New-Process: 0``) and the spare builds the
    instance. The store must hold the same bytes before and after.
(a') the same rounds on a second ``gpufaas up --demo`` with ``GPUFAAS_WORKER_ROLE=shared``
    (the old single worker process of every tenant, no pool); not interleaved with (c).
(b) gpufaas, tensors not resident. A third ``gpufaas up --devices cpu`` (with the pool)
    whose tensor store frees unreferenced tensors after 0.5 s. Each round writes a new
    fine-tuned variant (``scripts/make_variants.py``, new seed: new bytes in its top
    layer), deploys it by path (default tenant, whose process stays: the default
    ``GPUFAAS_WORKER_IDLE_S``), waits until it has scaled to zero, the store holds no
    tensor at all and no spare is starting, then times the first request the same way:
    the store reads, hashes and stores the whole file (from the page cache: it was just
    written) before the worker builds.
(c) the typical path, interleaved round by round with (a): a new Python process
    (``bench/_cold_start_child.py``) imports torch and transformers, loads tokenizer and
    model with ``from_pretrained`` from the demo model's directory, and embeds the same
    sentence; timed by this process from spawn to reading its result, with the child's
    own timestamps for interpreter start, imports, loading and the first inference.

Deploys build an instance, hence the scale-to-zero before each timed request; background
profiling is off (``GPUFAAS_PROFILE_S=0``) so that no sweep runs on the cores meanwhile.
After each timed request one warm request to the same instance is timed for reference,
and the function is deleted. Prints median and p95 of each kind, the ratio (c)/(a), the
target (a <= 100 ms and >= 30x faster than c), the platform's breakdown (the wait for a
worker process included), the worker's build and tensor-store times from its log, and the
memory held by the idle node (every function at zero) with the pool and without it.

Run:  .venv/bin/python bench/cold_start.py [--runs 20 | --quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import _platform as harness
import tensor_sharing as ts

from gpufaas.shared.catalog import resolve_model_dir
from gpufaas.shared.messages import ModelSource

BUILTIN = "all-minilm-l6-v2"
DEMO_FUNCTION = "minilm"
DEFAULT_TENANT = "default"
TEXT = "A function with no instance answers its first request."
CHILD = Path(__file__).with_name("_cold_start_child.py")
TARGET_MS = 100.0
TARGET_RATIO = 30.0
MAX_ABS_DIFF = 1e-4  # platform vs transformers embedding of the same sentence
SPARES = 1  # GPUFAAS_WORKER_SPARES of the pool platforms (the default)

# Settings of every platform: scale to zero 1 s after the last request, no background
# profile sweep. (a): the pool, one spare, a tenant's process leaves 1 s after its last
# instance (so that each round's tenant finds no process of its own and binds a spare).
# (a'): no pool. (b): the pool (its tenant's process stays), and the store frees
# unreferenced tensors after 0.5 s.
SCALE_ENV = {
    "GPUFAAS_INSTANCE_KEEP_ALIVE_S": "1",
    "GPUFAAS_AUTOSCALE_INTERVAL_S": "0.2",
    "GPUFAAS_PROFILE_S": "0",
}
POOL_ENV = {
    **SCALE_ENV,
    "GPUFAAS_WORKER_ROLE": "pool",
    "GPUFAAS_WORKER_SPARES": str(SPARES),
    "GPUFAAS_WORKER_IDLE_S": "1",
}
SHARED_ENV = {**SCALE_ENV, "GPUFAAS_WORKER_ROLE": "shared"}
FREE_ENV = {
    **SCALE_ENV,
    "GPUFAAS_WORKER_ROLE": "pool",
    "GPUFAAS_WORKER_SPARES": str(SPARES),
    "GPUFAAS_TENSOR_KEEP_ALIVE_S": "0.5",
    "GPUFAAS_RECLAIM_INTERVAL_S": "0.2",
}
# The typical path reads a local directory; never let it look for the hub.
CHILD_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
CLK_TCK = os.sysconf("SC_CLK_TCK")
POLL_S = 0.1  # how often the waits look at the platform (each look walks /proc)


# --- the platform -------------------------------------------------------------------


def start_platform(data_dir: Path, *, demo: bool, env: dict[str, str]) -> harness.Platform:
    """``gpufaas up --devices cpu`` (``--demo`` if asked) on free ports with ``env`` added
    (GPUFAAS_* settings pass through up)."""
    plat = harness.Platform.start(
        data_dir, "--devices", "cpu", *(["--demo"] if demo else []), env=env
    )
    PLATFORMS[plat.http_port] = plat
    ts.PLATFORMS[plat.http_port] = plat  # tensor_sharing's helpers (worker_listed) read it
    return plat


# Started platforms by HTTP port, and their admin keys' headers once read.
PLATFORMS: dict[int, harness.Platform] = {}
_AUTH: dict[int, dict[str, str]] = {}


def auth(port: int) -> dict[str, str]:
    """``Authorization`` with the admin key of the platform on ``port`` (it acts as each
    tenant the requests name in ``X-Gpufaas-Tenant``)."""
    if port not in _AUTH:
        headers = PLATFORMS[port].headers
        if not headers:  # not written yet: read again next time
            return headers
        _AUTH[port] = headers
    return _AUTH[port]


def demo_ready(port: int) -> bool:
    return harness.http_status(port, f"/v2/models/{DEMO_FUNCTION}/ready", auth(port)) == 200


def api(
    port: int, method: str, path: str, body: Any = None, *, tenant: str = DEFAULT_TENANT
) -> tuple[int, Any]:
    """One request of ``tenant`` (``X-Gpufaas-Tenant``); (status, decoded JSON or text)."""
    conn = http.client.HTTPConnection(harness.HOST, port, timeout=120)
    try:
        data = None if body is None else json.dumps(body).encode()
        headers = {"X-Gpufaas-Tenant": tenant, **auth(port)}
        if data is not None:
            headers["Content-Type"] = "application/json"
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        try:
            return resp.status, json.loads(raw) if raw else None
        except json.JSONDecodeError:
            return resp.status, raw.decode(errors="replace")
    finally:
        conn.close()


def store_stats(port: int) -> dict[str, Any]:
    """The host tier of the (only) node's tensor store: tensors, bytes_stored, leases, ..."""
    status, body = api(port, "GET", "/v1/nodes")
    if status != 200 or not isinstance(body, dict) or not body.get("nodes"):
        raise RuntimeError(f"GET /v1/nodes: HTTP {status}: {body}")
    store = body["nodes"][0].get("tensor_store") or {}
    host: dict[str, Any] = store.get("host") or {}
    if not host:
        raise RuntimeError(f"the tensor store did not answer: {body}")
    return host


def function_nodes(port: int, name: str, tenant: str) -> list[str]:
    status, body = api(port, "GET", f"/v1/functions/{name}", tenant=tenant)
    if status != 200 or not isinstance(body, dict):
        raise RuntimeError(f"GET /v1/functions/{name} (tenant {tenant}): HTTP {status}: {body}")
    return list(body["nodes"])


# --- the node's worker processes --------------------------------------------------------


def logs_dir(plat: harness.Platform) -> Path:
    return plat.data_dir / "run" / f"up-{plat.http_port}" / "logs"


def log_records(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of one service log (nothing if it is not there yet)."""
    out = []
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                rec = json.loads(line)
                if isinstance(rec, dict):
                    out.append(rec)
    return out


@dataclass
class WorkerProc:
    """A live ``python -m gpufaas.worker`` of the platform, as its environment and log say."""

    pid: int
    role: str  # pool (the manager), spare, tenant (started for one), shared (no pool)
    wid: str  # GPUFAAS_WORKER_SPARE_ID: names its log, node-0.worker-<wid>.log
    tenant: str | None  # the tenant it serves (a spare: once its log says worker.bound)
    ready: bool  # serving: its log says service.started (after it told the pool)
    stopping: bool  # its log says service.stopping (idle exit, or a spare stopped)


def worker_processes(plat: harness.Platform) -> list[WorkerProc]:
    """Every live worker process of the platform. The environment says the role and the
    pool's id; a pool process's own log (``*.worker-<id>.log``) says whether it is serving
    yet and to which tenant it was bound. A process in its last moments of exit (its
    command line already empty, not yet a zombie) is listed as ``exiting``; zombies are
    left out. ``GET /v1/nodes`` does not list the pool's processes: the pool manager alone
    heartbeats as the node's worker."""
    out = []
    for pid in sorted(ts.descendants(plat.proc.pid)):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue  # gone
        if state in ("Z", "X"):
            continue  # a zombie: exited, not reaped yet (the pool reaps each heartbeat)
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
        except OSError:
            argv, raw = [], ""
        if not any(argv):  # exiting (or gone)
            if Path(f"/proc/{pid}").exists():
                out.append(WorkerProc(pid, "exiting", "", None, False, True))
            continue
        if b"gpufaas.worker" not in argv:
            continue
        env = dict(e.split("=", 1) for e in raw.split("\0") if "=" in e)
        role = env.get("GPUFAAS_WORKER_ROLE", "shared")
        wid = env.get("GPUFAAS_WORKER_SPARE_ID", "")
        tenant = env.get("GPUFAAS_WORKER_TENANT") or None
        if role in ("spare", "tenant"):
            recs = []
            for log in logs_dir(plat).glob(f"*.worker-{wid}.log"):
                recs += log_records(log)
            events = {str(r.get("event")) for r in recs}
            bound = [r for r in recs if r.get("event") == "worker.bound"]
            tenant = str(bound[-1]["tenant"]) if bound else tenant
            ready, stopping = "service.started" in events, "service.stopping" in events
        else:
            ready, stopping = True, False
        out.append(WorkerProc(pid, role, wid, tenant, ready, stopping))
    return out


def pool_bound_tenants(plat: harness.Platform) -> set[str]:
    """The tenants the pool manager still counts as having a process (its ``bound``), from
    its log: bound by ``worker.spare_bound`` or started for by ``worker.process_started``,
    until the process's ``worker.process_retired`` (the pool agreed to its idle exit, before
    it stopped serving) or ``worker.process_lost`` / ``worker.process_exited`` (it died).
    From then on a request of the tenant is bound to a spare; the waits also follow /proc
    (the exiting process must be gone, so that its exit does not compete for the cores)."""
    bound: set[str] = set()
    for rec in log_records(next(iter(sorted(logs_dir(plat).glob("*.worker.log"))), Path())):
        tenant, event = rec.get("tenant"), rec.get("event")
        if tenant is None:
            continue
        if event in ("worker.spare_bound", "worker.process_started"):
            bound.add(str(tenant))
        elif event in ("worker.process_retired", "worker.process_lost", "worker.process_exited"):
            bound.discard(str(tenant))
    return bound


@dataclass
class PoolState:
    spares_ready: int  # unbound, serving, not being stopped
    spares_starting: int  # unbound, not serving yet
    tenants: list[str]  # tenants with a live process (exiting ones included), or that the
    # pool manager has not yet seen exit
    stopping: int  # processes exiting (a tenant's idle one, or a spare the pool stopped)
    processes: int  # every live worker process, the manager included

    @staticmethod
    def of(procs: list[WorkerProc], pool_bound: set[str]) -> PoolState:
        pool = [p for p in procs if p.role in ("spare", "tenant")]
        spares = [p for p in pool if p.tenant is None and not p.stopping]
        return PoolState(
            spares_ready=sum(1 for p in spares if p.ready),
            spares_starting=sum(1 for p in spares if not p.ready),
            tenants=sorted({p.tenant for p in pool if p.tenant is not None} | pool_bound),
            stopping=sum(1 for p in procs if p.stopping),
            processes=len(procs),
        )

    def __str__(self) -> str:
        return (
            f"{self.spares_ready} spare(s) ready, {self.spares_starting} starting, "
            f"{self.stopping} exiting, tenant processes {self.tenants or 'none'}"
        )


def pool_state(plat: harness.Platform) -> PoolState:
    return PoolState.of(worker_processes(plat), pool_bound_tenants(plat))


@dataclass
class PoolWant:
    """What a wait needs of the pool before the timed request (or the memory figure)."""

    no_tenants: bool  # no process of any tenant alive (the round's own has exited)
    spares: int | None = None  # exactly this many spares (None: at least one)

    def met(self, st: PoolState) -> bool:
        """As asked, and no process starting or exiting (none busy on the cores)."""
        if st.spares_starting or st.stopping or (self.no_tenants and st.tenants):
            return False
        return st.spares_ready >= 1 if self.spares is None else st.spares_ready == self.spares


def wait_idle(
    plat: harness.Platform,
    name: str,
    *,
    tenant: str = DEFAULT_TENANT,
    store_empty: bool,
    pool: PoolWant | None,
    timeout_s: float = 150.0,
) -> tuple[float, PoolState | None]:
    """Poll until ``name`` (of ``tenant``) has scaled to zero and no worker holds an
    instance (no lease on the store); with ``store_empty``, until the store has freed every
    tensor; with ``pool``, until the pool's processes are as it asks (a spare ready and
    nothing starting, so that no torch import runs on the cores during the timed request).
    Returns the seconds waited and the pool's last state."""
    t0 = time.monotonic()
    while True:
        if plat.proc.poll() is not None:
            raise RuntimeError(f"gpufaas up exited:\n{harness.log_tail(plat.log_path)}")
        nodes = function_nodes(plat.http_port, name, tenant) if name else []
        host = store_stats(plat.http_port)
        state = None
        if not nodes and host["leases"] == 0 and (not store_empty or host["tensors"] == 0):
            if pool is None:
                return time.monotonic() - t0, None
            state = pool_state(plat)
            if pool.met(state):
                return time.monotonic() - t0, state
        if time.monotonic() - t0 > timeout_s:
            raise RuntimeError(
                f"{name or 'the platform'} not idle after {timeout_s:.0f} s: nodes {nodes}, "
                f"store {host}, pool {state or pool_state(plat)}"
            )
        with contextlib.suppress(subprocess.TimeoutExpired):
            plat.proc.wait(timeout=POLL_S)  # the poll interval, cut short if up exits


def deploy(port: int, name: str, model: dict[str, str], tenant: str) -> float:
    """``POST /v1/functions``; seconds end to end."""
    t0 = time.perf_counter()
    status, reply = api(
        port, "POST", "/v1/functions", {"name": name, "model": model}, tenant=tenant
    )
    took = time.perf_counter() - t0
    if status != 201:
        raise RuntimeError(f"deploy {name} (tenant {tenant}): HTTP {status}: {reply}")
    return took


def delete(port: int, name: str, tenant: str) -> None:
    status, reply = api(port, "DELETE", f"/v1/functions/{name}", tenant=tenant)
    if status != 200:
        raise RuntimeError(f"delete {name} (tenant {tenant}): HTTP {status}: {reply}")


@dataclass
class Reply:
    ms: float  # sending the request to having the decoded reply, new connection
    cold: bool  # Gpufaas-Cold
    load_header_us: int  # Gpufaas-Load-Us
    worker_header_us: int  # Gpufaas-Worker-Us
    new_process_header: bool  # Gpufaas-New-Process
    new_process: bool  # parameters.new_process
    breakdown: dict[str, int]  # parameters.breakdown_us
    embedding: list[float]


def infer(port: int, name: str, tenant: str) -> Reply:
    """One request with ``TEXT`` over a new connection, timed end to end."""
    body = json.dumps(
        {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [TEXT]}]}
    ).encode()
    headers = {"Content-Type": "application/json", "X-Gpufaas-Tenant": tenant, **auth(port)}
    conn = http.client.HTTPConnection(harness.HOST, port, timeout=120)
    try:
        t0 = time.perf_counter()
        conn.request("POST", f"/v2/models/{name}/infer", body, headers)
        resp = conn.getresponse()
        raw = resp.read()
        reply = json.loads(raw)
        ms = (time.perf_counter() - t0) * 1e3
    finally:
        conn.close()
    if resp.status != 200 or not isinstance(reply, dict):
        raise RuntimeError(f"infer {name} (tenant {tenant}): HTTP {resp.status}: {raw[:500]!r}")
    out = next(o for o in reply["outputs"] if o["name"] == "embedding")
    params = reply["parameters"]
    return Reply(
        ms=ms,
        cold=resp.getheader("Gpufaas-Cold") == "1",
        load_header_us=int(resp.getheader("Gpufaas-Load-Us") or 0),
        worker_header_us=int(resp.getheader("Gpufaas-Worker-Us") or 0),
        new_process_header=resp.getheader("Gpufaas-New-Process") == "1",
        new_process=bool(params.get("new_process")),
        breakdown={k: int(v) for k, v in params["breakdown_us"].items()},
        embedding=[float(x) for x in out["data"]],
    )


def log_events(plat: harness.Platform, pattern: str, event: str) -> list[dict[str, Any]]:
    """Every ``event`` line of the service logs matching ``pattern`` (``*.worker*.log``:
    the worker, or the pool manager and each of its processes)."""
    out = []
    for log in sorted(logs_dir(plat).glob(pattern)):
        out += [r for r in log_records(log) if r.get("event") == event]
    return out


def log_time(rec: dict[str, Any]) -> float:
    """A log line's timestamp (UTC ISO 8601) as seconds since the epoch."""
    return datetime.datetime.fromisoformat(str(rec["timestamp"])).timestamp()


def cpu_seconds(pids: set[int]) -> float:
    """User + system CPU seconds used so far by ``pids`` (those still alive)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK_TCK


# --- one round of each kind ------------------------------------------------------------


@dataclass
class ColdRun:
    """One cold request through the platform, and the warm request after it."""

    kind: str
    function: str
    tenant: str
    warmup: bool
    deploy_s: float
    idle_wait_s: float
    store_bytes_before: int
    store_bytes_after: int
    client_ms: float
    cold: bool
    load_header_us: int
    worker_header_us: int
    new_process: bool  # Gpufaas-New-Process (the JSON's parameters.new_process agreed)
    breakdown: dict[str, int]
    warm_client_ms: float
    warm_breakdown: dict[str, int]
    spares_ready: int | None  # the pool's ready spares when the request was sent
    # From the worker's log (its instance.built line of this cold start).
    build_us: int | None = None
    register_us: int | None = None
    store_us: int | None = None
    overlapped: bool | None = None
    # From the pool manager's log: replacement spares started (Popen) inside the bind
    # (there should be none: the pool starts the replacement REFILL_DELAY_S after the
    # reply), and the time from the bind's start to the last of them.
    refill_started: int | None = None
    refill_us: int | None = None
    refill_in_request: int | None = None  # ... and started before the request's reply


def spare_warm_ups(plat: harness.Platform) -> list[dict[str, int]]:
    """Each spare's warm-up before it said it was ready (its ``worker.warmed`` line: the
    builtin tokenizer parsed and run, the encoder run over random weights), in µs."""
    keys = ("us", "tokenizer_us", "encode_us", "forward_us")
    return [
        {k: int(r[k]) for k in keys if k in r}
        for r in log_events(plat, "*.worker-*.log", "worker.warmed")
    ]


def cold_round(
    plat: harness.Platform,
    kind: str,
    name: str,
    model: dict[str, str],
    *,
    tenant: str,
    store_empty: bool,
    pool: PoolWant | None,
    warmup: bool,
) -> tuple[ColdRun, list[float]]:
    """Deploy ``name`` for ``tenant``, wait until it has no instance (and the pool is as
    ``pool`` asks), time its first request; delete it."""
    port = plat.http_port
    took = deploy(port, name, model, tenant)
    waited, state = wait_idle(plat, name, tenant=tenant, store_empty=store_empty, pool=pool)
    before = store_stats(port)["bytes_stored"]
    first = infer(port, name, tenant)
    after = store_stats(port)["bytes_stored"]
    warm = infer(port, name, tenant)
    delete(port, name, tenant)
    if not first.cold or warm.cold:
        raise RuntimeError(
            f"{name}: first request cold={first.cold}, second cold={warm.cold}: the "
            "function was not at zero, or the platform did not say so"
        )
    if (
        first.worker_header_us != first.breakdown.get("worker", 0)
        or first.new_process_header != first.new_process
    ):
        raise RuntimeError(
            f"{name}: headers Gpufaas-Worker-Us {first.worker_header_us}, New-Process "
            f"{first.new_process_header} disagree with the JSON's {first.breakdown}, "
            f"new_process {first.new_process}"
        )
    run = ColdRun(
        kind,
        name,
        tenant,
        warmup,
        took,
        waited,
        before,
        after,
        first.ms,
        first.cold,
        first.load_header_us,
        first.worker_header_us,
        first.new_process,
        first.breakdown,
        warm.ms,
        warm.breakdown,
        state.spares_ready if state else None,
    )
    return run, first.embedding


def add_build_times(plat: harness.Platform, runs: list[ColdRun]) -> None:
    """The worker's build of each cold start: the second ``instance.built`` of its function
    (the first is the deploy's; with the pool, the two are in different processes' logs)."""
    built: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for rec in log_events(plat, "*.worker*.log", "instance.built"):
        key = (str(rec.get("tenant")), str(rec.get("function")))
        built.setdefault(key, []).append(rec)
    for r in runs:
        recs = sorted(built.get((r.tenant, r.function), []), key=log_time)
        if len(recs) == 2:
            rec = recs[1]
            r.build_us, r.register_us = int(rec["us"]), int(rec["register_us"])
            r.store_us, r.overlapped = int(rec["store_us"]), bool(rec["overlapped"])


def add_bind_details(plat: harness.Platform, runs: list[ColdRun]) -> None:
    """For each cold request that bound a ready spare: the replacement spares the pool
    started (``worker.process_started``) between the bind's start (``worker.spare_bound``
    less the reply's wait) and the spare being bound, and how long from the start to the
    last of them; and those started before the request had its reply (their start and
    torch import would compete with it for the cores)."""
    pool_log = sorted(logs_dir(plat).glob("*.worker.log"))
    recs = log_records(pool_log[0]) if pool_log else []
    started = [
        log_time(r)
        for r in recs
        if r.get("event") == "worker.process_started" and r.get("tenant") is None
    ]
    for r in runs:
        if r.new_process or not r.worker_header_us:
            continue
        bound = [
            log_time(x)
            for x in recs
            if x.get("event") == "worker.spare_bound" and x.get("tenant") == r.tenant
        ]
        if not bound:
            continue
        t_bound = bound[-1]  # the cold request's (the deploy's came first)
        t_start = t_bound - r.worker_header_us / 1e6
        inside = [t for t in started if t_start - 0.002 <= t <= t_bound]
        r.refill_started = len(inside)
        r.refill_us = int(max((max(inside) - t_start) * 1e6, 0)) if inside else 0
        r.refill_in_request = sum(
            1 for t in started if t_start - 0.002 <= t <= t_start + r.client_ms / 1e3
        )


@dataclass
class TypicalRun:
    """One fresh process: spawn to first result, and its phases (ms)."""

    warmup: bool
    wall_ms: float  # spawn to reading the result line
    interpreter_ms: float  # spawn to the child's first statement
    import_ms: float  # import torch, transformers
    tokenizer_ms: float
    model_ms: float
    infer_ms: float  # tokenize + forward + pooling of the first sentence
    exit_ms: float  # result line to the process having exited (not counted)
    platform_cpu_pct: float  # the idle platform's CPU meanwhile (% of one core)
    embedding: list[float] = field(repr=False)


def typical_round(model_dir: Path, platform_pids: set[int], *, warmup: bool) -> TypicalRun:
    cpu0 = cpu_seconds(platform_pids)
    t0 = time.monotonic_ns()
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), str(model_dir), TEXT],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **CHILD_ENV},
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    t_result = time.monotonic_ns()
    _, err = proc.communicate(timeout=120)
    t_exit = time.monotonic_ns()
    cpu = cpu_seconds(platform_pids) - cpu0
    if not line or proc.returncode != 0:
        raise RuntimeError(f"typical-path child exited with {proc.returncode}:\n{err[-3000:]}")
    r = json.loads(line)

    def ms(a: int, b: int) -> float:
        return (b - a) / 1e6

    return TypicalRun(
        warmup=warmup,
        wall_ms=ms(t0, t_result),
        interpreter_ms=ms(t0, r["started_ns"]),
        import_ms=ms(r["started_ns"], r["imported_ns"]),
        tokenizer_ms=ms(r["imported_ns"], r["tokenizer_ns"]),
        model_ms=ms(r["tokenizer_ns"], r["model_ns"]),
        infer_ms=ms(r["model_ns"], r["result_ns"]),
        exit_ms=ms(t_result, t_exit),
        platform_cpu_pct=100 * cpu / max((t_exit - t0) / 1e9, 1e-9),
        embedding=[float(x) for x in r["embedding"]],
    )


def child_versions(model_dir: Path) -> dict[str, Any]:
    """What the typical path ran on (versions, threads, dtype), from one more child."""
    out = subprocess.run(
        [sys.executable, str(CHILD), str(model_dir), TEXT],
        capture_output=True,
        text=True,
        env={**os.environ, **CHILD_ENV},
        check=True,
        timeout=120,
    )
    r = json.loads(out.stdout.splitlines()[0])
    return {k: r[k] for k in ("torch", "transformers", "torch_threads", "dtype")}


# --- memory ----------------------------------------------------------------------------


@dataclass
class ProcMem:
    pid: int
    label: str
    pss: int
    rss: int
    uss: int  # private pages (Private_Clean + Private_Dirty): no other process shares them
    segment_pss: int  # of its mappings of the tensor store's segments


def process_label(pid: int, workers: dict[int, WorkerProc]) -> str:
    """tensor_sharing's label; a worker process also says its role in the pool."""
    label = ts.process_label(pid)
    w = workers.get(pid)
    if w is None:
        return label
    if w.role == "pool":
        return f"{label} (pool manager)"
    if w.role in ("spare", "tenant"):
        what = f"tenant {w.tenant}" if w.tenant else "spare" + ("" if w.ready else ", starting")
        return f"{label}-{w.wid} ({what}{', exiting' if w.stopping else ''})"
    return f"{label} ({w.role})"


def platform_memory(plat: harness.Platform) -> list[ProcMem]:
    """PSS, RSS and USS of every platform process (up, its descendants, any naming its data
    dir)."""
    prefix = f"{plat.shm_dir}/tensors/"
    workers = {w.pid: w for w in worker_processes(plat)}
    out = []
    for pid in sorted(ts.platform_pids(plat)):
        try:
            maps = ts.smaps(pid)
        except OSError:
            continue  # exited meanwhile
        if not maps:
            continue  # a zombie (an exited process not reaped yet): it holds no memory
        seg = sum(m.pss for m in maps if m.path.startswith(prefix))
        pss, rss = sum(m.pss for m in maps), sum(m.rss for m in maps)
        uss = sum(m.private for m in maps)
        out.append(ProcMem(pid, process_label(pid, workers), pss, rss, uss, seg))
    return out


@dataclass
class IdleMemory:
    """The idle node (every function at zero) of one platform."""

    platform: str  # "pool" or "shared"
    waited_s: float  # from the end of the runs to the figure (the pool settling)
    procs: list[ProcMem]
    segments: tuple[int, int, int]  # tensor segment files in /dev/shm: files, bytes, allocated
    pool_after_runs: PoolState | None = None  # the pool right after the runs
    pss_after_runs: int | None = None  # total PSS then

    @property
    def pss(self) -> int:
        return sum(m.pss for m in self.procs)

    @property
    def uss(self) -> int:
        return sum(m.uss for m in self.procs)

    @property
    def rss(self) -> int:
        return sum(m.rss for m in self.procs)


def idle_memory(plat: harness.Platform, platform: str) -> IdleMemory:
    """Wait until every function is at zero (no lease; with the pool: no tenant's process
    left, exactly the configured spares, all ready: the pool keeps up to 3 more for 60 s
    after a burst of new tenants), then measure every process."""
    t0 = time.monotonic()
    after_runs = pss_after = None
    if platform == "pool":
        after_runs = pool_state(plat)
        pss_after = sum(m.pss for m in platform_memory(plat))
    wait_idle(
        plat,
        "",
        store_empty=False,
        pool=PoolWant(no_tenants=True, spares=SPARES) if platform == "pool" else None,
    )
    return IdleMemory(
        platform,
        time.monotonic() - t0,
        platform_memory(plat),
        ts.segment_files(plat),
        after_runs,
        pss_after,
    )


# --- statistics and the report -----------------------------------------------------------


@dataclass
class Dist:
    median: float
    p95: float
    n: int

    @staticmethod
    def of(values: list[float]) -> Dist:
        return Dist(harness.percentile(values, 50), harness.percentile(values, 95), len(values))


def dist_of(rows: list[Any], attr: str, scale: float = 1.0) -> Dist:
    vals = [getattr(r, attr) for r in rows if getattr(r, attr) is not None]
    return Dist.of([v * scale for v in vals])


def bd(rows: list[ColdRun], key: str, warm: bool = False) -> Dist:
    """A breakdown field (ms) of the cold (or the warm) requests."""
    return Dist.of([(r.warm_breakdown if warm else r.breakdown).get(key, 0) / 1e3 for r in rows])


def fmt(d: Dist) -> str:
    return f"{d.median:9.1f} / {d.p95:8.1f}" if d.n else f"{'-':>9} / {'-':>8}"


def print_breakdown(label: str, rows: list[ColdRun]) -> None:
    outside = Dist.of([r.client_ms - r.breakdown["total"] / 1e3 for r in rows])
    sched = Dist.of(
        [
            (r.breakdown["load"] - r.breakdown.get("worker", 0) - r.build_us) / 1e3
            for r in rows
            if r.build_us is not None
        ]
    )
    in_build = Dist.of(
        [
            (r.build_us - r.register_us) / 1e3
            for r in rows
            if r.build_us is not None and r.register_us is not None
        ]
    )
    print(f"  {label}")
    for name, d in (
        ("client, end to end", dist_of(rows, "client_ms")),
        ("platform total (breakdown total)", bd(rows, "total")),
        ("  queue (waiting for the instance: includes the cold start)", bd(rows, "queue")),
        ("  load = the cold start, scheduler's clock (Gpufaas-Load-Us)", bd(rows, "load")),
        ("    waiting for a process of the tenant (Gpufaas-Worker-Us)", bd(rows, "worker")),
        (
            "      starting replacement spare(s) before the bind (pool log)",
            dist_of(rows, "refill_us", 1e-3),
        ),
        ("    worker build of the instance (its log)", dist_of(rows, "build_us", 1e-3)),
        ("      round trip to the tensor store", dist_of(rows, "register_us", 1e-3)),
        (
            "        the store's own time (read + hash + store, or look-up)",
            dist_of(rows, "store_us", 1e-3),
        ),
        ("      the rest of the build (model from the tensors, tokenizer)", in_build),
        ("    rest: placement, registry update, NATS hops", sched),
        ("  transfer", bd(rows, "transfer")),
        ("  compute (first inference on the new instance)", bd(rows, "compute")),
        ("outside total: HTTP, JSON, gateway, NATS", outside),
        ("warm request right after: client, end to end", dist_of(rows, "warm_client_ms")),
        ("warm request right after: compute", bd(rows, "compute", warm=True)),
    ):
        print(f"    {name:<64}{fmt(d)}")
    stored = {r.store_bytes_after - r.store_bytes_before for r in rows}
    before = {r.store_bytes_before for r in rows}
    overlapped = sum(1 for r in rows if r.overlapped)
    print(
        f"    store held {', '.join(harness.mib(x) for x in sorted(before))} before the "
        f"request and stored {', '.join(harness.mib(x) for x in sorted(stored))} during it; "
        f"worker log overlapped=true in {overlapped}/{len(rows)} (a build over the manifest "
        "remembered from the deploy started while the store answered; kept only if the "
        "store's answer is the same)"
    )
    new = sum(1 for r in rows if r.new_process)
    waited = sum(1 for r in rows if r.worker_header_us > 0)
    spares = sorted({r.spares_ready for r in rows if r.spares_ready is not None})
    started = sorted({r.refill_started for r in rows if r.refill_started is not None})
    during = sorted({r.refill_in_request for r in rows if r.refill_in_request is not None})
    print(
        f"    Gpufaas-New-Process: 1 in {new}/{len(rows)}; Gpufaas-Worker-Us > 0 (a process "
        f"was bound) in {waited}/{len(rows)}"
        + (
            f"; spares ready when the request was sent: {', '.join(map(str, spares))}"
            if spares
            else ""
        )
        + (
            f"; replacement spares started inside the bind: {', '.join(map(str, started))}"
            if started
            else ""
        )
        + (f", before the request's reply: {', '.join(map(str, during))}" if during else "")
    )


def print_warm_ups(warm: list[dict[str, int]]) -> dict[str, Any]:
    """The spares' warm-up (their logs), median / p95 in ms."""
    print(f"  spares' warm-up before they said they were ready, {len(warm)} spares (their logs)")
    out = {}
    for key, name in (
        ("us", "in all"),
        ("tokenizer_us", "builtin tokenizer parsed"),
        ("encode_us", "tokenizer run once"),
        ("forward_us", "encoder run once over random weights"),
    ):
        d = Dist.of([w[key] / 1e3 for w in warm if key in w])
        out[key] = asdict(d)
        print(f"    {name:<64}{fmt(d)}")
    return out


def print_results(
    a: list[ColdRun],
    a_shared: list[ColdRun],
    b: list[ColdRun],
    c: list[TypicalRun],
    warm: list[dict[str, int]],
) -> dict[str, Any]:
    da, db, dc = dist_of(a, "client_ms"), dist_of(b, "client_ms"), dist_of(c, "wall_ms")
    das = dist_of(a_shared, "client_ms")
    n = len(a)
    print(f"\nrequest -> first result of a function with no instance, {n} runs each (ms)")
    print(f"  {'':<66}{'median':>9} / {'p95':>8}")
    print(f"  {'(a) gpufaas, tensors resident, a ready spare from the pool':<66}{fmt(da)}")
    print(f"  {'(a`) the same without the pool (GPUFAAS_WORKER_ROLE=shared)':<66}{fmt(das)}")
    print(f"  {'(b) gpufaas, tensors not resident (new variant, store empty)':<66}{fmt(db)}")
    print(f"  {'(c) typical: new process, import + from_pretrained + 1st inference':<66}{fmt(dc)}")
    ratio_med, ratio_p95 = dc.median / da.median, dc.p95 / da.p95
    print(
        f"  ratio (c)/(a): {ratio_med:.1f}x at the median, {ratio_p95:.1f}x at p95; "
        f"(c)/(b): {dc.median / db.median:.1f}x; (b)/(a): {db.median / da.median:.2f}x; "
        f"(a)/(a`): {da.median / das.median:.2f}x"
    )
    met_ms = da.median <= TARGET_MS
    met_ratio = ratio_med >= TARGET_RATIO
    print(
        f"  target: (a) <= {TARGET_MS:.0f} ms: {'MET' if met_ms else 'NOT MET'} at the median "
        f"({da.median:.1f} ms), {'met' if da.p95 <= TARGET_MS else 'not met'} at p95 "
        f"({da.p95:.1f} ms); >= {TARGET_RATIO:.0f}x faster than (c): "
        f"{'MET' if met_ratio else 'NOT MET'} ({ratio_med:.1f}x at the median, "
        f"{ratio_p95:.1f}x at p95)"
    )

    print("\nwhere a cold request's time goes (ms, median / p95)")
    print_breakdown("(a) tensors resident, a ready spare from the pool", a)
    print_breakdown("(a`) tensors resident, no pool (one shared worker process)", a_shared)
    print_breakdown("(b) tensors not resident (the tenant's own process)", b)
    warm_ups = print_warm_ups(warm)
    print("  (c) typical path, phases inside the child")
    for name, attr in (
        ("spawn to first result (the figure above)", "wall_ms"),
        ("interpreter start (spawn to the child's first line)", "interpreter_ms"),
        ("import torch, transformers", "import_ms"),
        ("AutoTokenizer.from_pretrained", "tokenizer_ms"),
        ("AutoModel.from_pretrained", "model_ms"),
        ("first inference (tokenize, forward, pool)", "infer_ms"),
        ("after the result: process exit (not counted)", "exit_ms"),
        ("idle platform's CPU meanwhile (% of one core)", "platform_cpu_pct"),
    ):
        print(f"    {name:<64}{fmt(dist_of(c, attr))}")
    return {
        "a_ms": asdict(da),
        "a_shared_ms": asdict(das),
        "b_ms": asdict(db),
        "c_ms": asdict(dc),
        "ratio_c_over_a_median": ratio_med,
        "ratio_c_over_a_p95": ratio_p95,
        "target_a_ms_met_median": met_ms,
        "target_ratio_met_median": met_ratio,
        "a_new_process": sum(1 for r in a if r.new_process),
        "a_worker_us": asdict(bd(a, "worker")),
        "spare_warm_up_ms": warm_ups,
    }


def print_memory_table(mem: IdleMemory, title: str) -> None:
    print(f"\n{title}: every function at zero, {len(mem.procs)} processes")
    if mem.pool_after_runs is not None and mem.pss_after_runs is not None:
        print(
            f"  right after the runs: {mem.pool_after_runs}, total PSS "
            f"{harness.mib(mem.pss_after_runs)}; the figure below {mem.waited_s:.0f} s "
            f"later, with the pool at its {SPARES} configured spare(s)"
        )
    for m in sorted(mem.procs, key=lambda m: -m.pss):
        print(
            f"    {m.label:<40} pid {m.pid:>7}  PSS {harness.mib(m.pss):>12}  "
            f"USS {harness.mib(m.uss):>12}  RSS {harness.mib(m.rss):>12}"
        )
    print(
        f"  total PSS {harness.mib(mem.pss)}, USS {harness.mib(mem.uss)} (RSS sum "
        f"{harness.mib(mem.rss)}: shared pages counted in every process that maps them)"
    )
    files, _, alloc = mem.segments
    mapped = sum(m.segment_pss for m in mem.procs)
    print(
        f"  tensor store's segments in /dev/shm: {harness.mib(alloc)} in {files} file(s), kept "
        f"for the next cold start; PSS of their mappings in the processes above: "
        f"{harness.mib(mapped)} (tmpfs pages no process maps count in no PSS)"
    )


def print_memory(pool: IdleMemory, shared: IdleMemory) -> dict[str, Any]:
    print_memory_table(pool, "idle node WITH the pool (platform (a), after its runs)")
    print_memory_table(shared, "idle node WITHOUT a pool (platform (a`), after its runs)")
    workers_pool = sum(m.pss for m in pool.procs if ".worker" in m.label)
    workers_shared = sum(m.pss for m in shared.procs if ".worker" in m.label)
    d_pss, d_uss = pool.pss - shared.pss, pool.uss - shared.uss
    print(
        f"\nmemory held by an idle node with the pool, compared with no pool: total PSS "
        f"{harness.mib(pool.pss)} vs {harness.mib(shared.pss)}: {d_pss / 2**20:+.1f} MiB "
        f"({100 * d_pss / shared.pss:+.0f}%); USS {d_uss / 2**20:+.1f} MiB; the worker "
        f"processes alone: {harness.mib(workers_pool)} vs {harness.mib(workers_shared)} PSS "
        f"({(workers_pool - workers_shared) / 2**20:+.1f} MiB)"
    )
    return {
        "pss_difference": d_pss,
        "uss_difference": d_uss,
        "worker_pss_pool": workers_pool,
        "worker_pss_shared": workers_shared,
    }


def memory_json(mem: IdleMemory) -> dict[str, Any]:
    return {
        "pss": mem.pss,
        "uss": mem.uss,
        "rss_sum": mem.rss,
        "waited_s": round(mem.waited_s, 1),
        "pool_after_runs": asdict(mem.pool_after_runs) if mem.pool_after_runs else None,
        "pss_after_runs": mem.pss_after_runs,
        "shm_segment_files": mem.segments[0],
        "shm_segment_bytes_allocated": mem.segments[2],
        "processes": [asdict(p) for p in mem.procs],
    }


# --- main ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, default=20, help="timed cold requests of each kind")
    ap.add_argument("--quick", action="store_true", help="5 runs of each kind")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds of each kind first")
    ap.add_argument("--keep-data-dir", action="store_true", help="keep the temporary data dir")
    ap.add_argument("--json", type=Path, default=None, metavar="PATH", help="write results here")
    ap.add_argument("--ready-timeout", type=float, default=180.0, help="seconds to wait for up")
    args = ap.parse_args(argv)
    if args.quick:
        args.runs = 5
    if args.runs < 1 or args.warmup < 0:
        ap.error("--runs must be >= 1 and --warmup >= 0")
    return args


def tag_of(i: int, warmup: int) -> str:
    return "warm-up" if i < warmup else f"run {i - warmup + 1:>2}"


def cold_line(run: ColdRun) -> str:
    b = run.breakdown
    return (
        f"{run.client_ms:7.1f} ms (worker {b.get('worker', 0) / 1e3:5.1f}"
        f"{' NEW PROCESS' if run.new_process else ''}, load {b['load'] / 1e3:5.1f}, "
        f"compute {b['compute'] / 1e3:5.1f}; warm after {run.warm_client_ms:5.1f})"
    )


@dataclass
class ResidentPhase:
    """What a platform with the demo gave: (a) (and (c) with the pool), its idle memory."""

    a: list[ColdRun]
    c: list[TypicalRun]
    memory: IdleMemory
    emb_a: list[float]
    emb_c: list[float]
    warm_ups: list[dict[str, int]]


def run_resident(
    args: argparse.Namespace, data_dir: Path, model_dir: Path, *, pool: bool
) -> ResidentPhase:
    """With the pool: (a) interleaved with (c); without it: (a) alone. Then the idle node's
    memory."""
    env = POOL_ENV if pool else SHARED_ENV
    name = "(a)" if pool else "(a`)"
    plat = start_platform(data_dir / ("pool" if pool else "shared"), demo=True, env=env)
    a: list[ColdRun] = []
    c: list[TypicalRun] = []
    emb_a: list[float] = []
    emb_c: list[float] = []
    try:
        took = plat.wait_ready(args.ready_timeout, demo_ready)
        print(
            f"\nplatform {name}: gpufaas up --demo --devices cpu on port {plat.http_port}, "
            f"ready in {took:.1f} s; {' '.join(f'{k}={v}' for k, v in env.items())}"
        )
        pids = ts.platform_pids(plat)
        want = PoolWant(no_tenants=True) if pool else None
        for i in range(args.warmup + args.runs):
            warmup = i < args.warmup
            tenant = f"r{i}"
            run, emb = cold_round(
                plat,
                "a" if pool else "a_shared",
                f"cold-a-{i}",
                {"builtin": BUILTIN},
                tenant=tenant,
                store_empty=False,
                pool=want,
                warmup=warmup,
            )
            a.append(run)
            emb_a = emb_a or emb
            line = f"  {tag_of(i, args.warmup)}: {name} tenant {tenant:<4} {cold_line(run)}"
            if pool:
                typical = typical_round(model_dir, pids, warmup=warmup)
                c.append(typical)
                emb_c = emb_c or typical.embedding
                line += f"   (c) {typical.wall_ms:7.0f} ms"
            print(line, flush=True)
        add_build_times(plat, a)
        add_bind_details(plat, a)
        warm_ups = spare_warm_ups(plat)
        memory = idle_memory(plat, "pool" if pool else "shared")
    finally:
        status = plat.stop()
        print(f"platform {name} stopped (exit status {status})")
    return ResidentPhase(a, c, memory, emb_a, emb_c, warm_ups)


def run_not_resident(args: argparse.Namespace, data_dir: Path, base_dir: Path) -> list[ColdRun]:
    """(b) on a platform whose store frees unreferenced tensors at once."""
    make_variants = ts.load_make_variants()
    # Server paths must lie under the node's model roots: the variants and their base.
    (data_dir / "variants").mkdir(parents=True, exist_ok=True)
    roots = {"GPUFAAS_MODEL_ROOTS": f"{base_dir}:{data_dir / 'variants'}"}
    plat = start_platform(data_dir / "not-resident", demo=False, env={**FREE_ENV, **roots})
    b: list[ColdRun] = []
    try:
        took = plat.wait_ready(args.ready_timeout, ts.worker_listed)
        print(
            f"\nplatform (b): gpufaas up --devices cpu on port {plat.http_port}, ready in "
            f"{took:.1f} s; {' '.join(f'{k}={v}' for k, v in FREE_ENV.items())}"
        )
        for i in range(args.warmup + args.runs):
            out = data_dir / "variants" / f"v{i}"
            (vdir,) = make_variants(base_dir, out, 1, 1, 1000 + i)  # a new seed: new bytes
            run, _ = cold_round(
                plat,
                "b",
                f"cold-b-{i}",
                {"path": str(vdir)},
                tenant=DEFAULT_TENANT,
                store_empty=True,
                pool=PoolWant(no_tenants=False),
                warmup=i < args.warmup,
            )
            b.append(run)
            print(
                f"  {tag_of(i, args.warmup)}: (b) {cold_line(run)}; store read "
                f"{harness.mib(run.store_bytes_after - run.store_bytes_before)}",
                flush=True,
            )
            shutil.rmtree(out, ignore_errors=True)
        add_build_times(plat, b)
    finally:
        status = plat.stop()
        print(f"platform (b) stopped (exit status {status})")
    return b


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, harness.terminate)
    t_start = time.monotonic()
    base_dir = resolve_model_dir(ModelSource(builtin=BUILTIN))
    m = harness.machine("CPU (no GPU): compute and tensors in host memory", memory=True)
    harness.print_machine(m)
    versions = child_versions(base_dir)
    print(
        f"typical path: transformers {versions['transformers']}, torch {versions['torch']}, "
        f"{versions['torch_threads']} threads, {versions['dtype']}; "
        f"{' '.join(f'{k}={v}' for k, v in CHILD_ENV.items())}"
    )
    print(f"model   : {BUILTIN} ({base_dir}); one sentence, batch 1")
    print(
        f"runs    : {args.runs} timed of each kind after {args.warmup} untimed; "
        "(a) and (c) interleaved round by round, then (a`), then (b)"
    )
    data_dir = Path(tempfile.mkdtemp(prefix="gpufaas-bench-cold-"))
    try:
        res = run_resident(args, data_dir, base_dir, pool=True)
        diff = max(abs(x - y) for x, y in zip(res.emb_a, res.emb_c, strict=True))
        if diff > MAX_ABS_DIFF:
            raise RuntimeError(
                f"platform and typical-path embeddings differ: max |diff| {diff:.2e}"
            )
        load_mid = round(os.getloadavg()[0], 2)
        shared = run_resident(args, data_dir, base_dir, pool=False)
        b = run_not_resident(args, data_dir, base_dir)
    finally:
        if args.keep_data_dir:
            print(f"data dir kept: {data_dir}")
        else:
            shutil.rmtree(data_dir, ignore_errors=True)
    print(f"\ncheck: the platform's embedding equals the typical path's (max |diff| {diff:.1e})")
    timed_a = [r for r in res.a if not r.warmup]
    timed_as = [r for r in shared.a if not r.warmup]
    timed_b = [r for r in b if not r.warmup]
    timed_c = [r for r in res.c if not r.warmup]
    summary = print_results(timed_a, timed_as, timed_b, timed_c, res.warm_ups)
    summary["memory"] = print_memory(res.memory, shared.memory)
    m["loadavg_1m_between"] = load_mid
    m["loadavg_1m_after"] = round(os.getloadavg()[0], 2)
    m["bench_s"] = round(time.monotonic() - t_start, 1)
    print(
        f"\nload average (1 min): {m['loadavg_1m_before']} before, {load_mid} after (a)+(c), "
        f"{m['loadavg_1m_after']} after (a`) and (b); bench took {m['bench_s']} s"
    )
    if args.json is not None:
        doc = {
            "machine": m,
            "command": [sys.executable, *sys.argv],
            "settings": {
                "runs": args.runs,
                "warmup": args.warmup,
                "model": BUILTIN,
                "text": TEXT,
                "platform_a_env": POOL_ENV,
                "platform_a_shared_env": SHARED_ENV,
                "platform_b_env": FREE_ENV,
                "typical_path": {**versions, "env": CHILD_ENV},
            },
            "summary": summary,
            "embedding_max_abs_diff": diff,
            "idle_memory": {
                "pool": memory_json(res.memory),
                "shared": memory_json(shared.memory),
            },
            "runs": {
                "a": [asdict(r) for r in res.a],
                "a_shared": [asdict(r) for r in shared.a],
                "b": [asdict(r) for r in b],
                "c": [{k: v for k, v in asdict(r).items() if k != "embedding"} for r in res.c],
            },
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
