"""Object tier throughput on loopback: gpufaas.shared.objects versus nats-py's ObjectStore.

Starts the embedded nats-server with the platform's generated config (JetStream on disk
under a temporary directory), then for each size puts and gets one object of random bytes
``--reps`` times with each client, interleaved: (a) ``put_object`` / ``get_object`` (a
window of chunks in flight each way; gets into a ``bytearray``), and (b) nats-py 2.16's
``ObjectStore.put`` / ``get(writeinto=BytesIO)`` (one chunk per round trip; an ordered
push consumer). Every get is compared byte for byte, and both check the SHA-256 digest.
It prints median MiB/s of each, the ratio, and whether anything reported a slow consumer
or a disconnect (the clients' error callbacks, the server's log).

Run:  .venv/bin/python bench/objects_throughput.py [--sizes 1,16,64,256] [--reps 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

import _platform as harness
import nats
import numpy as np
from nats.js import JetStreamContext

from gpufaas.shared.config import Config
from gpufaas.shared.nats_auth import connect_options
from gpufaas.shared.objects import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_WINDOW_BYTES,
    ensure_object_bucket,
    get_object,
    put_object,
)

BUCKET: Final = "throughput"
START_TIMEOUT_S: Final = 30.0
MIB: Final = 2**20


@dataclass
class Row:
    size_mib: int
    ours_put_mib_s: float
    ours_get_mib_s: float
    stock_put_mib_s: float
    stock_get_mib_s: float


def start_nats(data_dir: Path) -> tuple[subprocess.Popen[bytes], str, Path]:
    """The embedded nats-server with the platform's generated config, on a free port."""
    return harness.start_nats(data_dir, START_TIMEOUT_S)


async def ours(js: JetStreamContext, data: bytes) -> tuple[float, float]:
    t0 = time.perf_counter()
    await put_object(js, BUCKET, "ours", data)
    t1 = time.perf_counter()
    into = bytearray()
    await get_object(js, BUCKET, "ours", into)
    t2 = time.perf_counter()
    if into != data:
        raise RuntimeError("get_object returned different bytes")
    return t1 - t0, t2 - t1


async def stock(js: JetStreamContext, data: bytes) -> tuple[float, float]:
    store = await js.object_store(BUCKET)
    t0 = time.perf_counter()
    await store.put("stock", data)
    t1 = time.perf_counter()
    out = io.BytesIO()
    await store.get("stock", writeinto=out)  # without writeinto= it is quadratic
    t2 = time.perf_counter()
    if out.getbuffer() != data:
        raise RuntimeError("ObjectStore.get returned different bytes")
    return t1 - t0, t2 - t1


async def measure(args: argparse.Namespace, url: str) -> tuple[list[Row], list[str]]:
    problems: list[str] = []

    async def on_error(exc: Exception) -> None:
        problems.append(repr(exc))

    async def on_disconnect() -> None:
        problems.append("disconnected")

    nc = await nats.connect(
        url,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        **connect_options(Config.from_env()),  # GPUFAAS_NATS_USER, if any
    )
    js = nc.jetstream()
    await ensure_object_bucket(js, BUCKET)
    rows = []
    rng = np.random.default_rng(0)
    for size in args.sizes:
        data = rng.bytes(size * MIB)
        times: dict[str, list[float]] = {k: [] for k in ("op", "og", "sp", "sg")}
        for i in range(args.reps):
            runs = ((ours, "o"), (stock, "s"))
            for fn, key in runs if i % 2 == 0 else runs[::-1]:
                put_s, get_s = await fn(js, data)
                times[key + "p"].append(put_s)
                times[key + "g"].append(get_s)

        mib_s = {k: size / harness.percentile(v, 50) for k, v in times.items()}
        row = Row(size, mib_s["op"], mib_s["og"], mib_s["sp"], mib_s["sg"])
        print(
            f"{size:>5} MiB  ours put {row.ours_put_mib_s:7.0f}  get {row.ours_get_mib_s:7.0f}   "
            f"nats-py put {row.stock_put_mib_s:7.0f}  get {row.stock_get_mib_s:7.0f}   "
            f"ratio put {row.ours_put_mib_s / row.stock_put_mib_s:4.1f}x  "
            f"get {row.ours_get_mib_s / row.stock_get_mib_s:4.1f}x",
            flush=True,
        )
        rows.append(row)
    problems_before_close = list(problems)
    await nc.close()
    return rows, problems_before_close


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="1,16,64,256", help="comma-separated sizes in MiB")
    ap.add_argument("--reps", type=int, default=5, help="put+get rounds per client and size")
    ap.add_argument("--json", type=Path, default=None, metavar="PATH", help="write results here")
    args = ap.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    signal.signal(signal.SIGTERM, harness.terminate)
    m = harness.machine("CPU (no GPU); loopback NATS, JetStream file storage", memory=True)
    harness.print_machine(m)
    print(
        f"ours: {DEFAULT_CHUNK_BYTES // 1024} KiB chunks, {DEFAULT_WINDOW_BYTES // MIB} MiB in "
        "flight; nats-py: 128 KiB chunks, one at a time; median MiB/s over "
        f"{args.reps} rounds, interleaved"
    )
    work_dir = Path(tempfile.mkdtemp(prefix="gpufaas-objects-"))
    server: subprocess.Popen[bytes] | None = None
    try:
        server, url, log_path = start_nats(work_dir)
        rows, problems = asyncio.run(measure(args, url))
        server.terminate()
        server.wait(timeout=30)
        slow = "Slow Consumer" in log_path.read_text(errors="replace")
    finally:
        if server is not None and server.poll() is None:
            server.terminate()
            server.wait(timeout=30)
        shutil.rmtree(work_dir, ignore_errors=True)
    print(f"client errors or disconnects: {problems or 'none'}")
    print(f"nats-server: slow consumers logged: {'YES' if slow else 'none'}")
    m["loadavg_1m_after"] = round(os.getloadavg()[0], 2)
    print(f"load average (1 min): {m['loadavg_1m_before']} before, {m['loadavg_1m_after']} after")
    if args.json is not None:
        doc = {
            "machine": m,
            "command": [sys.executable, *sys.argv],
            "rows": [asdict(r) for r in rows],
            "problems": problems,
            "server_slow_consumer": slow,
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 1 if problems or slow else 0


if __name__ == "__main__":
    sys.exit(main())
