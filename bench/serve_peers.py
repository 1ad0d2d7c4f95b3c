"""Serving throughput: the platform beside a hand-written aiohttp + torch server (issue 18).

Starts ``gpufaas up --demo --devices cpu`` (the all-MiniLM-L6-v2 demo as ``minilm``), reads
the OpenMP and thread environment and the CPU affinity of the worker process that serves it,
and starts with exactly those ``_peer_server.py``: one aiohttp process, the same model on the
same route (``POST /v2/models/minilm/infer``, Open Inference Protocol JSON), each request
embedded in a one-thread executor, no batching. Then, for each client count C, a closed loop
of C clients (one sentence per request, back to back, one aiohttp session in this process)
runs against the peer and against the platform in turn (never both at once; the order
alternates each round), and every reply is checked against the model computed here (max
abs diff 1e-5): a wrong answer or a failed request stops the run with exit status 1.
Each round ends with the in-process batch ceiling: the model in a child with the same
environment, batches of C back to back, embeddings per second.

It prints req/s, p50 and p99 of each server per C, the ratio platform / peer, the ratio of
the platform to the in-process ceiling at batch C, and p99/p50 at one client.

Run:  .venv/bin/python bench/serve_peers.py [--clients 1,16,64] [--seconds 10] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
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
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import _platform as harness
import aiohttp
import numpy as np
import orjson
from invoke_overhead import SENTENCES, infer_body, load_embedder

from gpufaas.shared.config import Config
from gpufaas.shared.constants import DEFAULT_TENANT

FUNCTION = "minilm"
MAX_ABS_DIFF = 1e-5
DIM = 384
PEER_SCRIPT = Path(__file__).resolve().parent / "_peer_server.py"
# What decides how torch computes on the CPU; copied from the worker to the peer and the ceiling.
THREAD_ENV_PREFIXES = ("OMP_", "KMP_", "GOMP_", "MKL_", "OPENBLAS_", "TORCH_", "PYTORCH_")
TARGETS = (
    "issue 18: platform/peer >= 2.6x at 16 and 64 clients, >= 0.9 of the ceiling, "
    "p99/p50 <= 1.3 at 1"
)


class ServerFailed(RuntimeError):
    """A server exited, or answered a request with an error or not at all."""


class WrongAnswer(RuntimeError):
    """A reply's embedding is not the one the model computes in-process."""


# --- the worker's settings and the peer -------------------------------------------------


def is_thread_key(key: str) -> bool:
    return key.startswith(THREAD_ENV_PREFIXES) or (key.startswith("GPUFAAS_") and "THREAD" in key)


@dataclass
class Settings:
    """How the platform's worker process computes: its thread environment and affinity."""

    worker_pid: int
    env: dict[str, str]
    affinity: list[int]
    torch_threads: int = 0  # --torch-threads for the peer and the ceiling; 0: by the env
    peer_torch_threads: int = 0
    ceiling_torch_threads: int = 0

    def child_argv(self, *args: str) -> list[str]:
        """The command line of a ``_peer_server.py`` child."""
        threads = ["--torch-threads", str(self.torch_threads)] if self.torch_threads else []
        return [sys.executable, str(PEER_SCRIPT), *threads, *args]

    def child_env(self) -> dict[str, str]:
        """This process's environment with the worker's thread settings instead of its own."""
        return {k: v for k, v in os.environ.items() if not is_thread_key(k)} | self.env

    def describe(self) -> str:
        env = " ".join(f"{k}={v}" for k, v in sorted(self.env.items())) or "(none set)"
        return f"{env}; CPU affinity {self.affinity}"


def worker_settings(plat: harness.Platform) -> Settings:
    """The thread environment and affinity of the worker process serving the demo."""
    pids = plat.pids(f"worker:{DEFAULT_TENANT}") or plat.pids("worker")
    if not pids:
        raise ServerFailed("no worker process of the platform found")
    raw = Path(f"/proc/{pids[0]}/environ").read_bytes().decode(errors="replace")
    env = dict(e.split("=", 1) for e in raw.split("\0") if "=" in e)
    thread_env = {k: v for k, v in env.items() if is_thread_key(k)}
    return Settings(pids[0], thread_env, sorted(os.sched_getaffinity(pids[0])))


def get_json(port: int, path: str) -> Any:
    """``GET path`` on this machine's ``port``: the JSON of a 200, else None."""
    conn = http.client.HTTPConnection(harness.HOST, port, timeout=2)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
    except OSError:
        return None
    finally:
        conn.close()
    return json.loads(body) if resp.status == 200 else None


class Peer:
    """The hand-written server, a child process under the worker's settings."""

    def __init__(self, settings: Settings, log_path: Path) -> None:
        (self.port,) = harness.free_ports(1)
        self.log_path = log_path
        argv = settings.child_argv("serve", "--port", str(self.port))
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=settings.child_env(),
            )
        os.sched_setaffinity(self.proc.pid, settings.affinity)  # before torch starts threads

    @property
    def url(self) -> str:
        return f"http://{harness.HOST}:{self.port}/v2/models/{FUNCTION}/infer"

    def wait_ready(self, timeout_s: float) -> int:
        """Poll until it serves; its torch thread count."""
        deadline = time.monotonic() + timeout_s
        while (doc := get_json(self.port, "/v2/health/ready")) is None:
            self.check_alive()
            if time.monotonic() > deadline:
                raise ServerFailed(f"peer not ready after {timeout_s:g} s")
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=0.1)  # the poll interval, cut short if it exits
        return int(doc["torch_threads"])

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise ServerFailed(
                f"peer exited with status {self.proc.returncode}:\n"
                f"{harness.log_tail(self.log_path)}"
            )

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                return self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


def measure_ceiling(settings: Settings, batches: list[int], seconds: float) -> dict[str, Any]:
    """The in-process batch ceiling, in a child under the worker's settings."""
    argv = settings.child_argv("ceiling", "--batch", ",".join(map(str, batches)))
    proc = subprocess.Popen(
        [*argv, "--seconds", str(seconds)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=settings.child_env(),
    )
    os.sched_setaffinity(proc.pid, settings.affinity)
    try:
        out, err = proc.communicate(timeout=120 + seconds * len(batches))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise ServerFailed(f"ceiling child exited with {proc.returncode}:\n{err.decode()[-2000:]}")
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


# --- the load ---------------------------------------------------------------------------


@dataclass
class Target:
    """A server under load: where to send, what to send, what must come back."""

    name: str
    url: str
    headers: dict[str, str]
    bodies: list[bytes]  # one pre-encoded request per sentence
    expected: list[np.ndarray[Any, np.dtype[np.float32]]]  # its embedding, in-process


@dataclass
class Point:
    """One server at one client count for one round."""

    server: str
    clients: int
    seconds: float
    latencies_ms: list[float] = field(default_factory=list)
    batches: list[int] = field(default_factory=list)  # the platform's batch per reply
    max_abs_diff: float = 0.0
    replies_checked: int = 0  # warm-up included
    client_cpu_s: float = 0.0  # this process's CPU time over the point, warm-up included

    @property
    def rps(self) -> float:
        return len(self.latencies_ms) / self.seconds


def check(target: Target, raw: bytes, i: int, out: Point) -> int | None:
    """Raise WrongAnswer unless the reply holds sentence ``i``'s embedding; the batch the
    platform says it ran the request in (None from the peer)."""
    doc = orjson.loads(raw)
    emb = next((o for o in doc.get("outputs", ()) if o.get("name") == "embedding"), None)
    if emb is None or emb.get("shape") != [1, DIM]:
        raise WrongAnswer(f"{target.name}: no embedding of shape [1, {DIM}] in {raw[:300]!r}")
    diff = float(np.abs(np.asarray(emb["data"], dtype=np.float32) - target.expected[i]).max())
    if not diff <= MAX_ABS_DIFF:
        raise WrongAnswer(
            f"{target.name}: embedding of {SENTENCES[i]!r} differs from in-process by "
            f"{diff:.3g} (allowed {MAX_ABS_DIFF:g})"
        )
    out.max_abs_diff = max(out.max_abs_diff, diff)
    out.replies_checked += 1
    batch = doc.get("parameters", {}).get("batch")
    return batch if isinstance(batch, int) else None


async def client(
    session: aiohttp.ClientSession,
    target: Target,
    seed: int,
    window: tuple[float, float],
    out: Point,
) -> None:
    """Send one sentence per request, back to back, until the window ends; record the
    latency of each reply that completes inside it."""
    start, end = window
    i = seed
    while (t0 := time.perf_counter()) < end:
        k = i % len(target.bodies)
        i += 1
        try:
            async with session.post(target.url, data=target.bodies[k]) as resp:
                raw = await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ServerFailed(f"{target.name}: request failed: {exc!r}") from exc
        t1 = time.perf_counter()
        if resp.status != 200:
            raise ServerFailed(f"{target.name}: HTTP {resp.status}: {raw[:300]!r}")
        batch = check(target, raw, k, out)
        if start <= t1 <= end:
            out.latencies_ms.append((t1 - t0) * 1e3)
            if batch is not None:
                out.batches.append(batch)


async def run_point(target: Target, clients: int, seconds: float, warmup: float) -> Point:
    """C closed-loop clients for ``warmup`` + ``seconds``; the second part is timed."""
    out = Point(target.name, clients, seconds)
    conn = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=60)
    headers = {"Content-Type": "application/json", **target.headers}
    cpu0 = time.process_time()
    async with aiohttp.ClientSession(connector=conn, timeout=timeout, headers=headers) as s:
        start = time.perf_counter() + warmup
        window = (start, start + seconds)
        await asyncio.gather(*(client(s, target, c, window, out) for c in range(clients)))
    out.client_cpu_s = time.process_time() - cpu0
    return out


# --- the run ----------------------------------------------------------------------------


def wait_profiled(port: int, headers: Mapping[str, str], timeout_s: float) -> dict[str, Any]:
    """The demo's profile once its background sweep is done (or ``timeout_s`` has passed)."""
    deadline = time.monotonic() + timeout_s
    while True:
        conn = http.client.HTTPConnection(harness.HOST, port, timeout=5)
        try:
            conn.request("GET", f"/v1/functions/{FUNCTION}", headers=dict(headers))
            resp = conn.getresponse()
            doc = json.loads(resp.read()) if resp.status == 200 else {}
        finally:
            conn.close()
        profile: dict[str, Any] = doc.get("profile") or {}
        if profile.get("complete") or time.monotonic() > deadline:
            return profile
        time.sleep(0.5)  # the sweep takes seconds; no event to wait on over HTTP


def targets(
    plat: harness.Platform, peer: Peer, expected: list[np.ndarray[Any, np.dtype[np.float32]]]
) -> list[Target]:
    bodies = [infer_body([s]) for s in SENTENCES]
    platform_url = f"{plat.url}/v2/models/{FUNCTION}/infer"
    return [
        Target("peer", peer.url, {}, bodies, expected),
        Target("platform", platform_url, plat.headers, bodies, expected),
    ]


def run_rounds(
    args: argparse.Namespace,
    plat: harness.Platform,
    peer: Peer,
    settings: Settings,
    tg: list[Target],
) -> tuple[list[Point], list[dict[str, Any]]]:
    """Every round: for each C the peer and the platform in turn (the order alternating),
    then the ceiling."""
    points: list[Point] = []
    ceilings: list[dict[str, Any]] = []
    for r in range(args.rounds):
        for c in args.client_counts:
            for t in tg if r % 2 == 0 else tg[::-1]:
                peer.check_alive()
                if plat.proc.poll() is not None:
                    raise ServerFailed(f"gpufaas up exited:\n{harness.log_tail(plat.log_path)}")
                p = asyncio.run(run_point(t, c, args.seconds, args.warmup))
                points.append(p)
                print(
                    f"  round {r + 1}  C={c:<3} {p.server:<9}{p.rps:8.1f} req/s  p50 "
                    f"{harness.percentile(p.latencies_ms, 50):7.1f}  p99 "
                    f"{harness.percentile(p.latencies_ms, 99):7.1f} ms  (client CPU "
                    f"{p.client_cpu_s / max(p.replies_checked, 1) * 1e3:.2f} ms per request)",
                    flush=True,
                )
        ceil = measure_ceiling(settings, args.client_counts, args.seconds)
        settings.ceiling_torch_threads = int(ceil["torch_threads"])
        ceilings.append(ceil)
        per = ", ".join(f"batch {b} {v['emb_per_s']:.1f}" for b, v in ceil["batches"].items())
        print(f"  round {r + 1}  in-process ceiling (emb/s): {per}", flush=True)
    return points, ceilings


def summarize(
    points: list[Point], ceilings: list[dict[str, Any]], counts: list[int]
) -> list[dict[str, Any]]:
    """Per C: each server over all rounds, the ratios."""
    rows = []
    for c in counts:
        row: dict[str, Any] = {"clients": c}
        for server in ("peer", "platform"):
            ps = [p for p in points if p.server == server and p.clients == c]
            lat = [x for p in ps for x in p.latencies_ms]
            batches = [b for p in ps for b in p.batches]
            row[server] = {
                "requests": len(lat),
                "rps": len(lat) / sum(p.seconds for p in ps),
                "p50_ms": harness.percentile(lat, 50),
                "p99_ms": harness.percentile(lat, 99),
                "mean_batch": sum(batches) / len(batches) if batches else None,
                "max_abs_diff": max(p.max_abs_diff for p in ps),
                "replies_checked": sum(p.replies_checked for p in ps),
                "client_cpu_ms_per_request": 1e3
                * sum(p.client_cpu_s for p in ps)
                / max(sum(p.replies_checked for p in ps), 1),
            }
            row[server]["p99_over_p50"] = ratio(row[server]["p99_ms"], row[server]["p50_ms"])
        done = sum(x["batches"][str(c)]["calls"] * c for x in ceilings)
        row["ceiling_emb_per_s"] = done / sum(x["batches"][str(c)]["seconds"] for x in ceilings)
        row["platform_over_peer"] = ratio(row["platform"]["rps"], row["peer"]["rps"])
        row["platform_over_ceiling"] = ratio(row["platform"]["rps"], row["ceiling_emb_per_s"])
        rows.append(row)
    best = max(rows, key=lambda r: float(r["ceiling_emb_per_s"]))
    for row in rows:  # the ceiling at its best batch, whatever C
        row["best_ceiling_batch"] = best["clients"]
        row["platform_over_best_ceiling"] = ratio(row["platform"]["rps"], best["ceiling_emb_per_s"])
    return rows


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def print_table(rows: list[dict[str, Any]]) -> None:
    print(
        f"\n{'C':>3} | {'peer req/s':>10} {'p50':>7} {'p99':>7} | {'platform req/s':>14} "
        f"{'p50':>7} {'p99':>7} {'batch':>5} | {'plat/peer':>9} | {'ceiling emb/s':>13} "
        f"{'plat/ceil':>9} {'plat/best':>9}"
    )
    for row in rows:
        a, b = row["peer"], row["platform"]
        batch = f"{b['mean_batch']:.1f}" if b["mean_batch"] is not None else "-"
        print(
            f"{row['clients']:>3} | {a['rps']:>10.1f} {a['p50_ms']:>7.1f} {a['p99_ms']:>7.1f} | "
            f"{b['rps']:>14.1f} {b['p50_ms']:>7.1f} {b['p99_ms']:>7.1f} {batch:>5} | "
            f"{row['platform_over_peer']:>8.2f}x | {row['ceiling_emb_per_s']:>13.1f} "
            f"{row['platform_over_ceiling']:>8.2f}x {row['platform_over_best_ceiling']:>8.2f}x"
        )
    print(
        "(latencies in ms; batch: the platform's mean batch per reply; ceiling: in-process at\n"
        f" batch C, best: at batch {rows[0]['best_ceiling_batch']}, the highest measured)"
    )
    for row in rows:
        if row["clients"] == 1:
            print(
                f"p99/p50 at one client: platform {row['platform']['p99_over_p50']:.2f}, "
                f"peer {row['peer']['p99_over_p50']:.2f}"
            )
    print(f"targets: {TARGETS} (reported, not enforced)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--clients", default="1,16,64", help="comma-separated client counts")
    ap.add_argument("--seconds", type=float, default=10.0, help="timed seconds per point")
    ap.add_argument("--warmup", type=float, default=2.0, help="untimed seconds before each point")
    ap.add_argument("--rounds", type=int, default=2, help="rounds (the order alternates)")
    ap.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="torch.set_num_threads in the peer and the ceiling (0: as the worker's env makes it)",
    )
    ap.add_argument("--keep-data-dir", action="store_true", help="keep the temporary data dir")
    ap.add_argument("--json", type=Path, default=None, metavar="PATH", help="write results here")
    ap.add_argument("--ready-timeout", type=float, default=180.0, help="seconds to wait for up")
    args = ap.parse_args(argv)
    try:
        args.client_counts = sorted({int(c) for c in args.clients.split(",") if c.strip()})
    except ValueError:
        ap.error(f"--clients: not a list of integers: {args.clients!r}")
    if not args.client_counts or args.client_counts[0] < 1:
        ap.error("--clients: counts must be positive")
    if args.seconds <= 0 or args.warmup < 0 or args.rounds < 1 or args.torch_threads < 0:
        ap.error("--seconds and --rounds must be positive, --warmup and --torch-threads >= 0")
    return args


def print_note() -> None:
    print(
        "note    : the load generator (this process, one aiohttp session, pre-encoded bodies)\n"
        "          shares the cores with the server under test; both servers pay for it alike.\n"
        "          The peer and the platform are idle while the other is measured."
    )


def start_all(args: argparse.Namespace, data_dir: Path) -> tuple[harness.Platform, Settings, Peer]:
    """The platform (ready and profiled), its worker's settings, the peer under them."""
    plat = harness.Platform.start(data_dir, "--demo", "--devices", "cpu")
    try:
        up = plat
        took = plat.wait_ready(
            args.ready_timeout,
            lambda port: (
                harness.http_status(port, f"/v2/models/{FUNCTION}/ready", up.headers) == 200
            ),
        )
        print(
            f"platform: gpufaas up --demo --devices cpu on port {plat.http_port}, "
            f"ready in {took:.1f} s"
        )
        # Measure steady state, after the background profile (GPUFAAS_PROFILE_S=0: none).
        profile: dict[str, Any] = {"reason": "profiling off"}
        if Config.from_env().profile_s > 0:
            profile = wait_profiled(plat.http_port, plat.headers, args.ready_timeout)
        print(
            f"profile : batch {profile.get('batch')} x {profile.get('concurrency')} "
            f"({profile.get('reason', 'no profile')})"
        )
        settings = worker_settings(plat)
        settings.torch_threads = args.torch_threads
        peer = Peer(settings, data_dir / "peer.log")
    except BaseException:
        plat.stop()
        raise
    return plat, settings, peer


def run(args: argparse.Namespace, m: dict[str, Any], data_dir: Path) -> dict[str, Any]:
    """Start everything, measure, stop everything; the results."""
    emb = load_embedder()
    expected = [emb.embed([s])[0].numpy() for s in SENTENCES]
    del emb  # idle here; the reference is all this process needs
    plat, settings, peer = start_all(args, data_dir)
    try:
        settings.peer_torch_threads = peer.wait_ready(args.ready_timeout)
        print(f"threads : worker (pid {settings.worker_pid}): {settings.describe()}")
        forced = f", --torch-threads {settings.torch_threads}" if settings.torch_threads else ""
        print(
            f"          peer and ceiling: the same{forced}; peer torch.get_num_threads() = "
            f"{settings.peer_torch_threads}"
        )
        points, ceilings = run_rounds(args, plat, peer, settings, targets(plat, peer, expected))
    finally:
        peer_status = peer.stop()
        status = plat.stop()
        print(f"peer stopped (exit status {peer_status}); platform stopped (exit status {status})")
    rows = summarize(points, ceilings, args.client_counts)
    print_table(rows)
    m["loadavg_1m_after"] = round(os.getloadavg()[0], 2)
    print(f"load average (1 min): {m['loadavg_1m_before']} before, {m['loadavg_1m_after']} after")
    return {
        "settings": {
            "worker": asdict(settings),
            "clients": args.client_counts,
            "seconds": args.seconds,
            "warmup": args.warmup,
            "rounds": args.rounds,
        },
        "summary": rows,
        "ceilings": ceilings,
        "points": [asdict(p) | {"rps": p.rps} for p in points],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, harness.terminate)
    m = harness.machine("CPU (no GPU)")
    harness.print_machine(m)
    print(
        f"load    : C in {args.client_counts} closed-loop clients, one sentence per request; "
        f"{args.rounds} round(s) of {args.warmup:g} s warm-up + {args.seconds:g} s per point"
    )
    print_note()
    data_dir = Path(tempfile.mkdtemp(prefix="gpufaas-bench-"))
    try:
        results = run(args, m, data_dir)
    except (ServerFailed, WrongAnswer) as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep_data_dir:
            print(f"data dir kept: {data_dir}")
        else:
            shutil.rmtree(data_dir, ignore_errors=True)
    harness.write_json(args.json, m, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
