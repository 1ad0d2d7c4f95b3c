"""One worker process driving every GPU (lanes) or a process per GPU: what an instance on a
new GPU costs each way, and what a worker process holds (issue 21).

Starts ``gpufaas up --devices sim:8`` (the DGX-1 topology; the node's worker pool with
its default ``GPUFAAS_WORKER_SPARES``, background profiling off) and speaks to the node's
worker verbs over NATS as the scheduler does. One tenant's process is bound and holds the
demo model's instance (``all-minilm-l6-v2``) on gpu:0. Then for k = 1.. (one new GPU per
round), with the model's copies prefetched onto gpu:k first (untimed: both paths build
over resident copies) and the order of (a) and (b) alternating round by round:

  (a) lanes: ``WorkerLoadRequest(device="gpu:k")`` to the tenant's live process: a new
      lane (threads, batcher, tensor I/O) and the instance built on it (moved there);
  (b) a process per GPU: a tenant with no process on the node yet, as each new GPU would
      need: the pool binds a ready spare (``WorkerBindRequest``), which loads the instance
      on gpu:k. The bench waits for a ready spare before each round (the best case of
      that design; a bind that had to start a process is reported).

Prints the median and max of each and their ratio, and the resident memory (``VmRSS``
and its private part ``RssAnon``, from ``/proc/<pid>/status``) of the lanes process at
the end (every lane made, one instance), of a ready spare and of a (b) process with its
one instance: what each extra process per GPU costs the host. The GPUs are SIMULATED:
instances compute on the CPU and no CUDA context is made (on a real GPU each process
also makes one context per device it uses: a lane pays that once per GPU per process).

Run:  .venv/bin/python bench/worker_lanes.py [--gpus 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TypeVar

import _platform as harness
import cold_start
import nats
from nats.aio.client import Client as NATS

from gpufaas.shared import subjects
from gpufaas.shared.config import Config
from gpufaas.shared.messages import (
    FunctionSpec,
    ModelSource,
    Msg,
    PrefetchReply,
    PrefetchRequest,
    WorkerBindReply,
    WorkerBindRequest,
    WorkerLoadReply,
    WorkerLoadRequest,
    WorkerUnloadReply,
    WorkerUnloadRequest,
)
from gpufaas.shared.nats_auth import connect_options
from gpufaas.shared.rpc import request

NODE = "node-0"
LIVE = "lanes"  # the tenant whose one process drives every GPU
MODEL = ModelSource(builtin="all-minilm-l6-v2")
ENV = {
    "GPUFAAS_PROFILE_S": "0",  # no background sweep on the cores
    "GPUFAAS_WORKER_IDLE_S": "2",  # each (b) tenant's process leaves soon after its unload
}
TIMEOUT_S = 120.0
M = TypeVar("M", bound=Msg)


def spec(tenant: str) -> FunctionSpec:
    return FunctionSpec(tenant=tenant, name="minilm", model=MODEL)


async def connect(plat: harness.Platform) -> NATS:
    """The platform's NATS as its admin (the password ``up`` made for this run)."""
    secret = plat.run_dir / "secrets" / "admin.password"
    options = connect_options(Config(nats_user="admin", nats_password_file=str(secret)))
    return await nats.connect(f"nats://{harness.HOST}:{plat.nats_port}", **options)


async def ask(nc: NATS, subject: str, msg: Msg, reply: type[M]) -> M:
    return await request(nc, subject, msg, reply, timeout=TIMEOUT_S)


async def load(nc: NATS, tenant: str, device: str | None) -> WorkerLoadReply:
    subject = subjects.worker(NODE, tenant, subjects.WORKER_LOAD)
    return await ask(
        nc, subject, WorkerLoadRequest(spec=spec(tenant), device=device), WorkerLoadReply
    )


async def bind(nc: NATS, tenant: str) -> WorkerBindReply:
    subject = subjects.node(NODE, "worker", subjects.WORKER_BIND)
    return await ask(nc, subject, WorkerBindRequest(tenant=tenant), WorkerBindReply)


async def unload(nc: NATS, tenant: str) -> None:
    subject = subjects.worker(NODE, tenant, subjects.WORKER_UNLOAD)
    await ask(nc, subject, WorkerUnloadRequest(function="minilm", tenant=tenant), WorkerUnloadReply)


async def prefetch(nc: NATS, device: str) -> None:
    subject = subjects.node(NODE, "tensorstore", subjects.TENSORSTORE_PREFETCH)
    await ask(nc, subject, PrefetchRequest(device=device, source=MODEL), PrefetchReply)


def rss(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``RssAnon`` of ``pid`` in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon"):
            out[key] = int(value.split()[0]) * 1024
    return out


def pid_of(plat: harness.Platform, tenant: str | None) -> int:
    """The live worker process of ``tenant`` (None: a ready spare)."""
    for p in cold_start.worker_processes(plat):
        if p.role in ("spare", "tenant") and p.tenant == tenant and p.ready and not p.stopping:
            return p.pid
    raise RuntimeError(f"no worker process of {tenant or 'a spare'} found")


async def wait_spare(plat: harness.Platform) -> None:
    """Until a spare is ready and no process is starting or exiting (quiet cores)."""
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        st = cold_start.pool_state(plat)
        if st.spares_ready >= 1 and not st.spares_starting and not st.stopping:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"no ready spare after {TIMEOUT_S:g} s: {st}")
        await asyncio.sleep(0.05)


async def lanes_round(nc: NATS, gpu: str) -> float:
    t0 = time.perf_counter()
    got = await load(nc, LIVE, gpu)
    ms = (time.perf_counter() - t0) * 1e3
    assert (got.device, got.cached) == (gpu, False), got
    return ms


async def process_round(
    nc: NATS, plat: harness.Platform, gpu: str, tenant: str
) -> tuple[float, bool, dict[str, int]]:
    await wait_spare(plat)
    t0 = time.perf_counter()
    bound = await bind(nc, tenant)
    got = await load(nc, tenant, gpu)
    ms = (time.perf_counter() - t0) * 1e3
    assert got.device == gpu, got
    mem = rss(pid_of(plat, tenant))
    await unload(nc, tenant)  # its process exits when idle
    return ms, bound.new_process, mem


async def burst(nc: NATS, plat: harness.Platform) -> tuple[float, bool]:
    """(b) when a tenant needs two new GPUs at once: the second right after the first, the
    pool's spare taken (GPUFAAS_WORKER_SPARES as set; run before the rounds, whose binds
    make the pool keep more spares for a while). The second's time, and whether its bind
    started a process."""
    await wait_spare(plat)
    await bind(nc, "burst1")
    await load(nc, "burst1", "gpu:1")
    t0 = time.perf_counter()
    bound = await bind(nc, "burst2")
    await load(nc, "burst2", "gpu:2")
    ms = (time.perf_counter() - t0) * 1e3
    for tenant in ("burst1", "burst2"):
        await unload(nc, tenant)
    return ms, bound.new_process


async def measure(plat: harness.Platform, gpus: int) -> dict[str, Any]:
    nc = await connect(plat)
    try:
        await bind(nc, LIVE)
        await load(nc, LIVE, None)  # untimed: the model's tensors into the store, gpu:0
        burst_ms, burst_new = await burst(nc, plat)  # first: no demand-driven spares yet
        lanes_ms: list[float] = []
        proc_ms: list[float] = []
        started = 0
        proc_rss: dict[str, int] = {}
        for k in range(1, gpus):
            gpu = f"gpu:{k}"
            await prefetch(nc, gpu)
            tenants: list[str | None] = [None, f"new{k}"]  # (a), then (b): odd rounds
            for tenant in tenants if k % 2 else reversed(tenants):
                if tenant is None:
                    lanes_ms.append(await lanes_round(nc, gpu))
                    continue
                ms, new_process, proc_rss = await process_round(nc, plat, gpu, tenant)
                proc_ms.append(ms)
                started += new_process
            print(f"  {gpu}: (a) {lanes_ms[-1]:7.1f} ms   (b) {proc_ms[-1]:7.1f} ms")
        await wait_spare(plat)
        return {
            "lanes_ms": lanes_ms,
            "process_ms": proc_ms,
            "binds_that_started_a_process": started,
            "burst_second_ms": burst_ms,
            "burst_second_new_process": burst_new,
            "rss": {
                "lanes_process": rss(pid_of(plat, LIVE)),
                "spare": rss(pid_of(plat, None)),
                "process_per_gpu": proc_rss,
            },
        }
    finally:
        await nc.close()


def report(r: dict[str, Any], gpus: int) -> None:
    a, b = r["lanes_ms"], r["process_ms"]
    med_a, med_b = harness.percentile(a, 50), harness.percentile(b, 50)
    print(f"\nan instance on a new GPU, {len(a)} rounds each (SIMULATED GPUs), ms:")
    print(f"  {'':<44}{'median':>9}{'max':>9}")
    print(f"  {'(a) lanes: a load in the live process':<44}{med_a:>9.1f}{max(a):>9.1f}")
    print(f"  {'(b) a process per GPU: bind a spare + load':<44}{med_b:>9.1f}{max(b):>9.1f}")
    print(f"  ratio (b)/(a): median {med_b / med_a:.2f}x, max {max(b) / max(a):.2f}x")
    print(f"  binds that had to start a process: {r['binds_that_started_a_process']}")
    ms, new = r["burst_second_ms"], r["burst_second_new_process"]
    print(
        f"  (b) the 2nd of two new GPUs at once (the spare taken): {ms:.1f} ms, "
        f"{ms / med_a:.0f}x (a)'s median ({'a new process' if new else 'a spare'})"
    )
    m = r["rss"]
    print("\nresident memory per worker process (VmRSS, of it private RssAnon):")
    for label, key in (
        (f"lanes process ({gpus} lanes, 1 instance)", "lanes_process"),
        ("a ready spare (no tenant)", "spare"),
        ("a process per GPU (1 lane, 1 instance)", "process_per_gpu"),
    ):
        print(
            f"  {label:<44}{harness.mib(m[key]['VmRSS']):>14}{harness.mib(m[key]['RssAnon']):>14}"
        )
    extra = m["process_per_gpu"]["RssAnon"]
    lanes_extra = m["lanes_process"]["RssAnon"] - m["process_per_gpu"]["RssAnon"]
    print(
        f"  a process per GPU on a node of {gpus} GPUs: {gpus - 1} more per tenant, "
        f"about {harness.mib((gpus - 1) * extra)} private; the {gpus - 1} extra lanes of one "
        f"process: {harness.mib(lanes_extra)}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--gpus", type=int, default=8, help="simulated GPUs of the node (2..8)")
    ap.add_argument("--json", type=Path, default=None, metavar="PATH", help="write results here")
    args = ap.parse_args(argv)
    if not 2 <= args.gpus <= 8:
        ap.error("--gpus: 2..8 (the DGX-1 topology's)")
    signal.signal(signal.SIGTERM, harness.terminate)
    m = harness.machine(f"SIMULATED sim:{args.gpus} (dgx1-v100), compute on the CPU", memory=True)
    harness.print_machine(m)
    data_dir = Path(tempfile.mkdtemp(prefix="gpufaas-bench-"))
    plat: harness.Platform | None = None
    try:
        plat = harness.Platform.start(data_dir, "--devices", f"sim:{args.gpus}", env=ENV)
        took = plat.wait_ready(180.0)
        spares = os.environ.get("GPUFAAS_WORKER_SPARES", "default (1)")
        print(
            f"platform: gpufaas up --devices sim:{args.gpus}, ready in {took:.1f} s; spares {spares}"
        )
        results = asyncio.run(measure(plat, args.gpus))
        report(results, args.gpus)
    finally:
        if plat is not None:
            print(f"platform stopped (exit status {harness.stop(plat)})")
        shutil.rmtree(data_dir, ignore_errors=True)
    harness.write_json(args.json, m, {"gpus": args.gpus, **results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
