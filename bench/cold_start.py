"""Cold start: request to first result for a function with no instance (issue 8).

Three kinds of cold request, ``--runs`` timed rounds each (after one untimed round), in
one run:

(a) gpufaas, tensors resident. ``gpufaas up --demo --devices cpu`` with instances kept
    only 1 s after their last request (``GPUFAAS_INSTANCE_KEEP_ALIVE_S=1``, autoscaling
    tick 0.2 s). Each round deploys a new function of the demo model
    (``{"builtin": "all-minilm-l6-v2"}``, whose tensors the demo ``minilm`` put in the
    node's tensor store), waits until it has scaled to zero (``GET /v1/functions/<name>``
    lists no node and the tensor store holds no lease: the worker has dropped every
    instance), then times ``POST /v2/models/<name>/infer`` from sending it to having the
    decoded reply, which must say ``Gpufaas-Cold: 1``. The store must hold the same bytes
    before and after (nothing was read from the model file).
(b) gpufaas, tensors not resident. A second ``gpufaas up --devices cpu`` whose tensor
    store frees unreferenced tensors after 0.5 s. Each round writes a new fine-tuned
    variant (``scripts/make_variants.py``, new seed: new bytes in its top layer), deploys
    it by path, waits until it has scaled to zero *and* the store holds no tensor at all,
    then times the first request the same way: the store reads, hashes and stores the
    whole file (from the page cache: it was just written) before the worker builds.
(c) the typical path, interleaved round by round with (a): a new Python process
    (``bench/_cold_start_child.py``) imports torch and transformers, loads tokenizer and
    model with ``from_pretrained`` from the demo model's directory, and embeds the same
    sentence; timed by this process from spawn to reading its result, with the child's
    own timestamps for interpreter start, imports, loading and the first inference.

Deploys build an instance, hence the scale-to-zero before each timed request; background
profiling is off (``GPUFAAS_PROFILE_S=0``) so that no sweep runs on the cores meanwhile.
After each timed request one warm request to the same instance is timed for reference,
and the function is deleted. Prints median and p95 of each kind, the ratio (c)/(a), the
target (a <= 100 ms and >= 30x faster than c), the platform's breakdown, the worker's
build and tensor-store times from its log, and the idle platform's memory after the runs.

Run:  .venv/bin/python bench/cold_start.py [--runs 20 | --quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
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
TEXT = "A function with no instance answers its first request."
CHILD = Path(__file__).with_name("_cold_start_child.py")
TARGET_MS = 100.0
TARGET_RATIO = 30.0
MAX_ABS_DIFF = 1e-4  # platform vs transformers embedding of the same sentence

# Settings of both platforms: scale to zero 1 s after the last request, no background
# profile sweep. The second platform also frees unreferenced tensors after 0.5 s.
SCALE_ENV = {
    "GPUFAAS_INSTANCE_KEEP_ALIVE_S": "1",
    "GPUFAAS_AUTOSCALE_INTERVAL_S": "0.2",
    "GPUFAAS_PROFILE_S": "0",
}
FREE_ENV = {**SCALE_ENV, "GPUFAAS_TENSOR_KEEP_ALIVE_S": "0.5", "GPUFAAS_RECLAIM_INTERVAL_S": "0.2"}
# The typical path reads a local directory; never let it look for the hub.
CHILD_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- the platform -------------------------------------------------------------------


def start_platform(data_dir: Path, *, demo: bool, env: dict[str, str]) -> harness.Platform:
    """``gpufaas up --devices cpu`` (``--demo`` if asked) on free ports with ``env`` added
    (harness.start_platform, plus the environment: GPUFAAS_* settings pass through up)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    http_port, nats_port = harness.free_ports(2)
    argv = [
        str(Path(sys.executable).parent / "gpufaas"),
        "up",
        "--http-port",
        str(http_port),
        "--nats-port",
        str(nats_port),
        "--data-dir",
        str(data_dir),
        "--devices",
        "cpu",
    ]
    if demo:
        argv.append("--demo")
    log_path = data_dir / "up.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
        )
    return harness.Platform(proc, http_port, log_path, data_dir)


def demo_ready(port: int) -> bool:
    return harness.http_status(port, f"/v2/models/{DEMO_FUNCTION}/ready") == 200


def store_stats(port: int) -> dict[str, Any]:
    """The host tier of the (only) node's tensor store: tensors, bytes_stored, leases, ..."""
    status, body = ts.http_json(port, "GET", "/v1/nodes", timeout=10)
    if status != 200 or not isinstance(body, dict) or not body.get("nodes"):
        raise RuntimeError(f"GET /v1/nodes: HTTP {status}: {body}")
    store = body["nodes"][0].get("tensor_store") or {}
    host: dict[str, Any] = store.get("host") or {}
    if not host:
        raise RuntimeError(f"the tensor store did not answer: {body}")
    return host


def function_nodes(port: int, name: str) -> list[str]:
    status, body = ts.http_json(port, "GET", f"/v1/functions/{name}", timeout=10)
    if status != 200 or not isinstance(body, dict):
        raise RuntimeError(f"GET /v1/functions/{name}: HTTP {status}: {body}")
    return list(body["nodes"])


def wait_idle(
    plat: harness.Platform, name: str, *, store_empty: bool, timeout_s: float = 60.0
) -> float:
    """Poll until ``name`` has scaled to zero and the worker holds no instance (no lease
    on the store); with ``store_empty``, also until the store has freed every tensor.
    Returns the seconds waited."""
    t0 = time.monotonic()
    while True:
        if plat.proc.poll() is not None:
            raise RuntimeError(f"gpufaas up exited:\n{harness.log_tail(plat.log_path)}")
        nodes = function_nodes(plat.http_port, name) if name else []
        host = store_stats(plat.http_port)
        if not nodes and host["leases"] == 0 and (not store_empty or host["tensors"] == 0):
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout_s:
            raise RuntimeError(
                f"{name or 'the platform'} not idle after {timeout_s:.0f} s: nodes {nodes}, "
                f"store {host}"
            )
        with contextlib.suppress(subprocess.TimeoutExpired):
            plat.proc.wait(timeout=0.05)  # the poll interval, cut short if up exits


def deploy(port: int, name: str, model: dict[str, str]) -> float:
    """``POST /v1/functions``; seconds end to end."""
    t0 = time.perf_counter()
    status, reply = ts.http_json(port, "POST", "/v1/functions", {"name": name, "model": model})
    took = time.perf_counter() - t0
    if status != 201:
        raise RuntimeError(f"deploy {name}: HTTP {status}: {reply}")
    return took


def delete(port: int, name: str) -> None:
    status, reply = ts.http_json(port, "DELETE", f"/v1/functions/{name}")
    if status != 200:
        raise RuntimeError(f"delete {name}: HTTP {status}: {reply}")


@dataclass
class Reply:
    ms: float  # sending the request to having the decoded reply, new connection
    cold: bool  # Gpufaas-Cold
    load_header_us: int  # Gpufaas-Load-Us
    breakdown: dict[str, int]  # parameters.breakdown_us
    embedding: list[float]


def infer(port: int, name: str) -> Reply:
    """One request with ``TEXT`` over a new connection, timed end to end."""
    body = json.dumps(
        {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [TEXT]}]}
    ).encode()
    conn = http.client.HTTPConnection(harness.HOST, port, timeout=120)
    try:
        t0 = time.perf_counter()
        conn.request("POST", f"/v2/models/{name}/infer", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
        reply = json.loads(raw)
        ms = (time.perf_counter() - t0) * 1e3
    finally:
        conn.close()
    if resp.status != 200 or not isinstance(reply, dict):
        raise RuntimeError(f"infer {name}: HTTP {resp.status}: {raw[:500]!r}")
    out = next(o for o in reply["outputs"] if o["name"] == "embedding")
    return Reply(
        ms=ms,
        cold=resp.getheader("Gpufaas-Cold") == "1",
        load_header_us=int(resp.getheader("Gpufaas-Load-Us") or 0),
        breakdown={k: int(v) for k, v in reply["parameters"]["breakdown_us"].items()},
        embedding=[float(x) for x in out["data"]],
    )


def log_events(plat: harness.Platform, service: str, event: str) -> list[dict[str, Any]]:
    """Every ``event`` line of a node service's JSON log (``node-0.<service>.log``)."""
    out = []
    for log in plat.data_dir.glob(f"run/up-{plat.http_port}/logs/*.{service}.log"):
        for line in log.read_text(errors="replace").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                rec = json.loads(line)
                if isinstance(rec, dict) and rec.get("event") == event:
                    out.append(rec)
    return out


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
    warmup: bool
    deploy_s: float
    idle_wait_s: float
    store_bytes_before: int
    store_bytes_after: int
    client_ms: float
    cold: bool
    load_header_us: int
    breakdown: dict[str, int]
    warm_client_ms: float
    warm_breakdown: dict[str, int]
    # From the worker's log (its instance.built line of this cold start).
    build_us: int | None = None
    register_us: int | None = None
    store_us: int | None = None
    overlapped: bool | None = None


def cold_round(
    plat: harness.Platform,
    kind: str,
    name: str,
    model: dict[str, str],
    *,
    store_empty: bool,
    warmup: bool,
) -> tuple[ColdRun, list[float]]:
    """Deploy ``name``, wait until it has no instance, time its first request; delete it."""
    port = plat.http_port
    took = deploy(port, name, model)
    waited = wait_idle(plat, name, store_empty=store_empty)
    before = store_stats(port)["bytes_stored"]
    first = infer(port, name)
    after = store_stats(port)["bytes_stored"]
    warm = infer(port, name)
    delete(port, name)
    if not first.cold or warm.cold:
        raise RuntimeError(
            f"{name}: first request cold={first.cold}, second cold={warm.cold}: the "
            "function was not at zero, or the platform did not say so"
        )
    run = ColdRun(
        kind, name, warmup, took, waited, before, after, first.ms, first.cold,
        first.load_header_us, first.breakdown, warm.ms, warm.breakdown,
    )  # fmt: skip
    return run, first.embedding


def add_build_times(plat: harness.Platform, runs: list[ColdRun]) -> None:
    """The worker's build of each cold start: the second ``instance.built`` of its function
    (the first is the deploy's)."""
    built: dict[str, list[dict[str, Any]]] = {}
    for rec in log_events(plat, "worker", "instance.built"):
        built.setdefault(str(rec.get("function")), []).append(rec)
    for r in runs:
        recs = built.get(r.function, [])
        if len(recs) == 2:
            rec = recs[1]
            r.build_us, r.register_us = int(rec["us"]), int(rec["register_us"])
            r.store_us, r.overlapped = int(rec["store_us"]), bool(rec["overlapped"])


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
    segment_pss: int  # of its mappings of the tensor store's segments


def platform_memory(plat: harness.Platform) -> list[ProcMem]:
    """PSS and RSS of every platform process (up, its descendants, any naming its data dir)."""
    prefix = f"{plat.shm_dir}/tensors/"
    out = []
    for pid in sorted(ts.platform_pids(plat)):
        try:
            maps = ts.smaps(pid)
        except OSError:
            continue  # exited meanwhile
        seg = sum(m.pss for m in maps if m.path.startswith(prefix))
        out.append(
            ProcMem(
                pid, ts.process_label(pid), sum(m.pss for m in maps), sum(m.rss for m in maps), seg
            )
        )
    return out


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
    return Dist.of([(r.warm_breakdown if warm else r.breakdown)[key] / 1e3 for r in rows])


def fmt(d: Dist) -> str:
    return f"{d.median:9.1f} / {d.p95:8.1f}"


def print_results(a: list[ColdRun], b: list[ColdRun], c: list[TypicalRun]) -> dict[str, Any]:
    da, db, dc = dist_of(a, "client_ms"), dist_of(b, "client_ms"), dist_of(c, "wall_ms")
    n = len(a)
    print(f"\nrequest -> first result of a function with no instance, {n} runs each (ms)")
    print(f"  {'':<66}{'median':>9} / {'p95':>8}")
    print(f"  {'(a) gpufaas, tensors resident in the store':<66}{fmt(da)}")
    print(f"  {'(b) gpufaas, tensors not resident (new variant, store empty)':<66}{fmt(db)}")
    print(f"  {'(c) typical: new process, import + from_pretrained + 1st inference':<66}{fmt(dc)}")
    ratio_med, ratio_p95 = dc.median / da.median, dc.p95 / da.p95
    print(f"  ratio (c)/(a): {ratio_med:.1f}x at the median, {ratio_p95:.1f}x at p95; "
          f"(c)/(b): {dc.median / db.median:.1f}x; (b)/(a): {db.median / da.median:.2f}x")  # fmt: skip
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
    for label, rows in (("(a) tensors resident", a), ("(b) tensors not resident", b)):
        outside = Dist.of([r.client_ms - r.breakdown["total"] / 1e3 for r in rows])
        sched = Dist.of(
            [(r.breakdown["load"] - r.build_us) / 1e3 for r in rows if r.build_us is not None]
        )
        print(f"  {label}")
        for name, d in (
            ("client, end to end", dist_of(rows, "client_ms")),
            ("platform total (breakdown total)", bd(rows, "total")),
            ("  queue (waiting for the instance: includes the cold start)", bd(rows, "queue")),
            ("  load = the cold start, scheduler's clock (Gpufaas-Load-Us)", bd(rows, "load")),
            ("    worker build of the instance (its log)", dist_of(rows, "build_us", 1e-3)),
            ("      round trip to the tensor store", dist_of(rows, "register_us", 1e-3)),
            ("        the store's own time (read + hash + store, or look-up)",
             dist_of(rows, "store_us", 1e-3)),
            ("    rest: placement, registry update, NATS hops", sched),
            ("  transfer", bd(rows, "transfer")),
            ("  compute (first inference on the new instance)", bd(rows, "compute")),
            ("outside total: HTTP, JSON, gateway, NATS", outside),
            ("warm request right after: client, end to end", dist_of(rows, "warm_client_ms")),
            ("warm request right after: compute", bd(rows, "compute", warm=True)),
        ):  # fmt: skip
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
        "b_ms": asdict(db),
        "c_ms": asdict(dc),
        "ratio_c_over_a_median": ratio_med,
        "ratio_c_over_a_p95": ratio_p95,
        "target_a_ms_met_median": met_ms,
        "target_ratio_met_median": met_ratio,
    }


def print_memory(mems: list[ProcMem], segments: tuple[int, int, int]) -> None:
    total_pss, total_rss = sum(m.pss for m in mems), sum(m.rss for m in mems)
    print(f"\nidle platform (a) after the runs: every function at zero, {len(mems)} processes")
    for m in sorted(mems, key=lambda m: -m.pss):
        print(f"    {m.label:<34} pid {m.pid:>7}  PSS {harness.mib(m.pss):>12}  "
              f"RSS {harness.mib(m.rss):>12}")  # fmt: skip
    print(f"  total PSS {harness.mib(total_pss)} (RSS sum {harness.mib(total_rss)}: shared pages "
          "counted in every process that maps them)")  # fmt: skip
    files, _, alloc = segments
    mapped = sum(m.segment_pss for m in mems)
    print(f"  tensor store's segments in /dev/shm: {harness.mib(alloc)} in {files} file(s), kept "
          f"for the next cold start; PSS of their mappings in the processes above: "
          f"{harness.mib(mapped)} (tmpfs pages no process maps count in no PSS)")  # fmt: skip
    print("  a figure only: the pool-vs-no-pool comparison will come when the pool exists")


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


@dataclass
class ResidentPhase:
    """What the platform with the demo gave: (a), (c), its idle memory, one embedding each."""

    a: list[ColdRun]
    c: list[TypicalRun]
    memory: list[ProcMem]
    segments: tuple[int, int, int]  # tensor segment files in /dev/shm: files, bytes, allocated
    emb_a: list[float]
    emb_c: list[float]


def run_resident(args: argparse.Namespace, data_dir: Path, model_dir: Path) -> ResidentPhase:
    """(a) interleaved with (c) on the platform with the demo; then its idle memory."""
    plat = start_platform(data_dir / "resident", demo=True, env=SCALE_ENV)
    a: list[ColdRun] = []
    c: list[TypicalRun] = []
    emb_a: list[float] = []
    emb_c: list[float] = []
    try:
        took = harness.wait_ready(plat, args.ready_timeout, demo_ready)
        print(f"\nplatform (a): gpufaas up --demo --devices cpu on port {plat.http_port}, "
              f"ready in {took:.1f} s; {' '.join(f'{k}={v}' for k, v in SCALE_ENV.items())}")  # fmt: skip
        pids = ts.platform_pids(plat)
        for i in range(args.warmup + args.runs):
            warmup = i < args.warmup
            run, emb = cold_round(plat, "a", f"cold-a-{i}", {"builtin": BUILTIN},
                                  store_empty=False, warmup=warmup)  # fmt: skip
            a.append(run)
            emb_a = emb_a or emb
            typical = typical_round(model_dir, pids, warmup=warmup)
            c.append(typical)
            emb_c = emb_c or typical.embedding
            tag = "warm-up" if warmup else f"run {i - args.warmup + 1:>2}"
            print(f"  {tag}: (a) {run.client_ms:7.1f} ms (load {run.breakdown['load'] / 1e3:5.1f}, "
                  f"compute {run.breakdown['compute'] / 1e3:5.1f}; warm after {run.warm_client_ms:5.1f})"
                  f"   (c) {typical.wall_ms:7.0f} ms", flush=True)  # fmt: skip
        add_build_times(plat, a)
        wait_idle(plat, "", store_empty=False)
        mems = platform_memory(plat)
        segments = ts.segment_files(plat)
    finally:
        status = harness.stop_platform(plat)
        print(f"platform (a) stopped (exit status {status})")
    return ResidentPhase(a, c, mems, segments, emb_a, emb_c)


def run_not_resident(args: argparse.Namespace, data_dir: Path, base_dir: Path) -> list[ColdRun]:
    """(b) on a platform whose store frees unreferenced tensors at once."""
    make_variants = ts.load_make_variants()
    plat = start_platform(data_dir / "not-resident", demo=False, env=FREE_ENV)
    b: list[ColdRun] = []
    try:
        took = harness.wait_ready(plat, args.ready_timeout, ts.worker_listed)
        print(f"\nplatform (b): gpufaas up --devices cpu on port {plat.http_port}, ready in "
              f"{took:.1f} s; {' '.join(f'{k}={v}' for k, v in FREE_ENV.items())}")  # fmt: skip
        for i in range(args.warmup + args.runs):
            out = data_dir / "variants" / f"v{i}"
            (vdir,) = make_variants(base_dir, out, 1, 1, 1000 + i)  # a new seed: new bytes
            run, _ = cold_round(plat, "b", f"cold-b-{i}", {"path": str(vdir)},
                                store_empty=True, warmup=i < args.warmup)  # fmt: skip
            b.append(run)
            tag = "warm-up" if i < args.warmup else f"run {i - args.warmup + 1:>2}"
            print(f"  {tag}: (b) {run.client_ms:7.1f} ms (load {run.breakdown['load'] / 1e3:5.1f}, "
                  f"compute {run.breakdown['compute'] / 1e3:5.1f}; store read "
                  f"{harness.mib(run.store_bytes_after - run.store_bytes_before)})", flush=True)  # fmt: skip
            shutil.rmtree(out, ignore_errors=True)
        add_build_times(plat, b)
    finally:
        status = harness.stop_platform(plat)
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
    print(f"typical path: transformers {versions['transformers']}, torch {versions['torch']}, "
          f"{versions['torch_threads']} threads, {versions['dtype']}; "
          f"{' '.join(f'{k}={v}' for k, v in CHILD_ENV.items())}")  # fmt: skip
    print(f"model   : {BUILTIN} ({base_dir}); one sentence, batch 1")
    print(f"runs    : {args.runs} timed of each kind after {args.warmup} untimed; "
          "(a) and (c) interleaved round by round, then (b)")  # fmt: skip
    data_dir = Path(tempfile.mkdtemp(prefix="gpufaas-bench-cold-"))
    try:
        res = run_resident(args, data_dir, base_dir)
        diff = max(abs(x - y) for x, y in zip(res.emb_a, res.emb_c, strict=True))
        if diff > MAX_ABS_DIFF:
            raise RuntimeError(
                f"platform and typical-path embeddings differ: max |diff| {diff:.2e}"
            )
        load_mid = round(os.getloadavg()[0], 2)
        b = run_not_resident(args, data_dir, base_dir)
    finally:
        if args.keep_data_dir:
            print(f"data dir kept: {data_dir}")
        else:
            shutil.rmtree(data_dir, ignore_errors=True)
    print(f"\ncheck: the platform's embedding equals the typical path's (max |diff| {diff:.1e})")
    timed_a = [r for r in res.a if not r.warmup]
    timed_b = [r for r in b if not r.warmup]
    timed_c = [r for r in res.c if not r.warmup]
    summary = print_results(timed_a, timed_b, timed_c)
    print_memory(res.memory, res.segments)
    m["loadavg_1m_between"] = load_mid
    m["loadavg_1m_after"] = round(os.getloadavg()[0], 2)
    m["bench_s"] = round(time.monotonic() - t_start, 1)
    print(
        f"\nload average (1 min): {m['loadavg_1m_before']} before, {load_mid} after (a)+(c), "
        f"{m['loadavg_1m_after']} after (b); bench took {m['bench_s']} s"
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
                "platform_a_env": SCALE_ENV,
                "platform_b_env": FREE_ENV,
                "typical_path": {**versions, "env": CHILD_ENV},
            },
            "summary": summary,
            "embedding_max_abs_diff": diff,
            "idle_memory": {
                "pss": sum(p.pss for p in res.memory),
                "rss_sum": sum(p.rss for p in res.memory),
                "shm_segment_files": res.segments[0],
                "shm_segment_bytes_allocated": res.segments[2],
                "processes": [asdict(p) for p in res.memory],
            },
            "runs": {
                "a": [asdict(r) for r in res.a],
                "b": [asdict(r) for r in b],
                "c": [{k: v for k, v in asdict(r).items() if k != "embedding"} for r in res.c],
            },
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
