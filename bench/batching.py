"""Dynamic batching: requests per second of the demo model with batching versus without.

Starts ``gpufaas up --demo --devices cpu`` and deploys the same all-MiniLM-L6-v2 model a
second time as ``minilm-b1`` with ``options.max_batch_size = 1`` (one request per batch:
no batching). The demo ``minilm`` keeps the default (batches of up to 32 rows, formed by
the worker from whatever is ready). Then, in alternating rounds so that drift hits both
alike, the same ``--clients`` concurrent HTTP clients send one-sentence requests to one
function for ``--seconds`` each, and the script prints requests per second, latency
percentiles and the mean batch the worker formed, and the ratio batched / unbatched.

Run:  .venv/bin/python bench/batching.py [--clients 32] [--seconds 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _platform as harness
import aiohttp
import torch

BATCHED = "minilm"
UNBATCHED = "minilm-b1"
SENTENCES = [
    "A man is eating food.",
    "The girl is carrying a baby.",
    "A woman is playing violin.",
    "Serverless inference keeps the model warm between requests.",
    "The scheduler places functions near their weights.",
    "It is raining in the city tonight.",
    "A cheetah is running behind its prey.",
    "Embeddings map sentences to points in a vector space.",
]


@dataclass
class Round:
    """One function's run: completed requests, their latencies and batch sizes."""

    function: str
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    batches: list[int] = field(default_factory=list)
    errors: int = 0

    @property
    def rps(self) -> float:
        return len(self.latencies_ms) / self.seconds if self.seconds else 0.0


def body(i: int) -> bytes:
    text = SENTENCES[i % len(SENTENCES)]
    inputs = [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [text]}]
    return json.dumps({"inputs": inputs}).encode()


async def client(
    session: aiohttp.ClientSession, url: str, until: float, seed: int, out: Round
) -> None:
    i = seed
    while time.perf_counter() < until:
        t0 = time.perf_counter()
        async with session.post(url, data=body(i)) as resp:
            raw = await resp.read()
        i += 1
        if resp.status != 200:
            out.errors += 1
            continue
        out.latencies_ms.append((time.perf_counter() - t0) * 1e3)
        out.batches.append(int(json.loads(raw)["parameters"]["batch"]))


# The platform's admin key (``Authorization: Bearer ...``), sent with every request.
AUTH: dict[str, str] = {}


async def run_round(port: int, function: str, clients: int, seconds: float) -> Round:
    url = f"http://{harness.HOST}:{port}/v2/models/{function}/infer"
    out = Round(function)
    conn = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=60)
    headers = {"Content-Type": "application/json", **AUTH}
    async with aiohttp.ClientSession(connector=conn, timeout=timeout, headers=headers) as s:
        for i in range(clients):  # warm every connection and the instance
            async with s.post(url, data=body(i)) as resp:
                await resp.read()
        t0 = time.perf_counter()
        until = t0 + seconds
        await asyncio.gather(*(client(s, url, until, i, out) for i in range(clients)))
        out.seconds = time.perf_counter() - t0
    return out


async def deploy_unbatched(port: int) -> None:
    spec = {
        "name": UNBATCHED,
        "model": {"builtin": "all-minilm-l6-v2"},
        "options": {"max_batch_size": 1},
    }
    async with (
        aiohttp.ClientSession(headers=AUTH) as s,
        s.post(f"http://{harness.HOST}:{port}/v1/functions", json=spec) as resp,
    ):
        if resp.status not in (200, 201):
            raise RuntimeError(f"deploy {UNBATCHED}: HTTP {resp.status} {await resp.text()}")


def summary(rounds: list[Round]) -> dict[str, Any]:
    lat = [x for r in rounds for x in r.latencies_ms]
    batches = [b for r in rounds for b in r.batches]
    total_s = sum(r.seconds for r in rounds)
    return {
        "requests": len(lat),
        "rps": len(lat) / total_s,
        "p50_ms": harness.percentile(lat, 50),
        "p99_ms": harness.percentile(lat, 99),
        "mean_batch": sum(batches) / len(batches),
        "errors": sum(r.errors for r in rounds),
        "rps_per_round": [round(r.rps, 1) for r in rounds],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--clients", type=int, default=32, help="concurrent HTTP clients")
    ap.add_argument("--seconds", type=float, default=8.0, help="length of one round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per function, alternating")
    ap.add_argument("--devices", default="cpu", help="gpufaas up --devices (auto: real GPUs)")
    ap.add_argument("--ready-timeout", type=float, default=180.0, help="seconds to wait for up")
    ap.add_argument("--json", type=Path, default=None, metavar="PATH", help="write results here")
    args = ap.parse_args(argv)
    if args.clients < 1 or args.seconds <= 0 or args.rounds < 1:
        ap.error("--clients, --seconds and --rounds must be positive")
    return args


async def wait_profiled(port: int, function: str, timeout_s: float = 120.0) -> dict[str, Any]:
    """The function's profile once its background sweep is done (the batch size it chose)."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession(headers=AUTH) as s:
        while True:
            async with s.get(f"http://{harness.HOST}:{port}/v1/functions/{function}") as resp:
                profile: dict[str, Any] = (await resp.json()).get("profile") or {}
            if profile.get("complete") or time.monotonic() > deadline:
                return profile
            await asyncio.sleep(0.5)


async def measure(port: int, args: argparse.Namespace) -> dict[str, list[Round]]:
    await deploy_unbatched(port)
    for fn in (BATCHED, UNBATCHED):  # measure steady state, not the profiling
        p = await wait_profiled(port, fn)
        print(
            f"profile : {fn:<10} batch {p.get('batch')} x {p.get('concurrency')} "
            f"({p.get('reason', 'no profile')})"
        )
    rounds: dict[str, list[Round]] = {BATCHED: [], UNBATCHED: []}
    for i in range(args.rounds):
        order = (BATCHED, UNBATCHED) if i % 2 == 0 else (UNBATCHED, BATCHED)
        for fn in order:
            r = await run_round(port, fn, args.clients, args.seconds)
            rounds[fn].append(r)
            print(f"  round {i + 1} {fn:<10} {r.rps:8.1f} req/s  ({r.errors} errors)", flush=True)
    return rounds


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, harness.terminate)
    gpu = args.devices != "cpu" and torch.cuda.is_available()
    label = torch.cuda.get_device_name(0) if gpu else "CPU (no GPU)"
    m = harness.machine(label, extra={"torch_threads": torch.get_num_threads()})
    harness.print_machine(m)
    print(
        f"clients : {args.clients} concurrent, one sentence per request, {args.rounds} "
        f"rounds of {args.seconds:g} s per function, alternating"
    )
    data_dir = Path(tempfile.mkdtemp(prefix="gpufaas-bench-"))
    plat: harness.Platform | None = None
    try:
        plat = harness.Platform.start(data_dir, "--demo", "--devices", args.devices)
        up = plat
        took = plat.wait_ready(
            args.ready_timeout,
            lambda port: (
                harness.http_status(port, f"/v2/models/{BATCHED}/ready", up.headers) == 200
            ),
        )
        AUTH.update(plat.headers)
        print(f"platform: gpufaas up --demo --devices {args.devices}, ready in {took:.1f} s")
        rounds = asyncio.run(measure(plat.http_port, args))
    finally:
        if plat is not None:
            harness.stop(plat)
        shutil.rmtree(data_dir, ignore_errors=True)
    results = {fn: summary(rs) for fn, rs in rounds.items()}
    print(f"\n{'':<34}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'batch':>7}{'errors':>8}")
    for fn, label in ((BATCHED, "(a) dynamic batching (max 32)"), (UNBATCHED, "(b) no batching")):
        r = results[fn]
        print(
            f"{label:<34}{r['rps']:>9.1f}{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}"
            f"{r['mean_batch']:>7.1f}{r['errors']:>8}"
        )
    ratio = results[BATCHED]["rps"] / results[UNBATCHED]["rps"]
    print(f"\nthroughput ratio (a)/(b): {ratio:.2f}x  (target >= 3x)")
    m["loadavg_1m_after"] = round(os.getloadavg()[0], 2)
    print(f"load average (1 min): {m['loadavg_1m_before']} before, {m['loadavg_1m_after']} after")
    if args.json is not None:
        doc = {
            "machine": m,
            "settings": vars(args) | {"json": str(args.json)},
            "results": results,
            "ratio": ratio,
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
