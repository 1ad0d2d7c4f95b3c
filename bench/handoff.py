"""Same-node hand-off of a float32 tensor between two processes, a producer and a consumer.

Starts a real nats-server (the embedded binary, with the config ``gpufaas up`` writes, so
its max_payload is the platform's), a consumer process, and acts as the producer. For each
size and repetition, in an order that rotates every round, it hands the tensor over by:

  tubes           ``write_tube`` into a host shared-memory tube (a temporary dir under
                  /dev/shm), send only the ``Tube`` reference over NATS; the consumer maps
                  the segment (``MAP_SHARED``, read-write) and wraps it with
                  ``torch.frombuffer``: zero copies on its side.
  tubes in place  the same, but the tensor already lives in a tube (a function that wrote
                  its output there): only the reference travels. Not part of the targets.
  NATS bytes      the bytes in NATS messages of the server's ``max_payload`` (read from its
                  INFO), at most 4 awaiting the consumer's ack; it copies them into one
                  buffer and wraps it.
  object store    ``put_object`` (gpufaas.shared.objects), the name over NATS,
                  ``get_object`` into a buffer on the consumer's side.
  Ray             ``ray.put`` in one actor, the reference to a second actor that gets it
                  (zero-copy) and wraps it (bench/_handoff_ray.py, in an interpreter with
                  Ray: ``--ray-python``, or this one if it has Ray).

In every mode the consumer then sums the tensor (the same work everywhere, and proof that
it is usable) and the producer checks the sum against its own. The consumer sums with one
torch thread, as Ray's workers do by default: on a busy 2-core machine waking a second
intra-op thread cost 6-8 ms at any size, which would swamp the hand-off being measured.

Clock: each timestamp is CLOCK_MONOTONIC (``time.clock_gettime_ns``), one system-wide clock
on Linux, so the producer's start and the consumer's end compare directly across
processes on one machine. ``time.time_ns`` could step (NTP) mid-run, and halving a round
trip would assume the way back (a few timestamps) costs what the way there (the tensor)
did. Reported: "to tensor" (from the producer having the tensor to the consumer holding a
usable tensor) and "to summed" (after the sum as well), median and p95.

Run:  .venv/bin/python bench/handoff.py [--reps 20] [--sizes 1,16,64]
          [--ray-python /tmp/rayenv/bin/python] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final, cast

import _platform as harness
import nats
import torch
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg as NatsMsg
from nats.js import JetStreamContext

from gpufaas.shared.config import Config, default_shm_dir
from gpufaas.shared.messages import Tube, decode, encode
from gpufaas.shared.nats_auth import connect_options
from gpufaas.shared.objects import delete_object, ensure_object_bucket, get_object, put_object
from gpufaas.shared.shm import SegmentCache, delete_tube, write_tube

MODES: Final = ("tubes", "tubes_in_place", "nats_bytes", "object_store")
LABELS: Final = {
    "tubes": "tubes (write_tube)",
    "tubes_in_place": "tubes (in place)",
    "nats_bytes": "bytes through NATS",
    "object_store": "object store",
    "ray": "Ray (put/get)",
}
BUCKET: Final = "handoff"
NODE: Final = "bench"
TENANT: Final = "bench"
NATS_WINDOW: Final = 4  # chunks awaiting their ack (the pitfalls: ~4 avoids slow consumers)
REQUEST_TIMEOUT_S: Final = 60.0
START_TIMEOUT_S: Final = 60.0


def now_ns() -> int:
    """CLOCK_MONOTONIC: one clock for every process on this machine."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def byte_view(t: torch.Tensor) -> memoryview:
    """The tensor's bytes, without a copy."""
    return t.numpy().data.cast("B")


def result(ready_ns: int, done_ns: int, total: float) -> bytes:
    return json.dumps({"ready_ns": ready_ns, "done_ns": done_ns, "sum": total}).encode()


def touch(t: torch.Tensor) -> tuple[int, int, float]:
    """(usable, summed) timestamps and the sum: the same work in every mode."""
    ready = now_ns()
    total = float(t.sum())
    return ready, now_ns(), total


# --- the consumer (its own process) ---------------------------------------------------------


class Consumer:
    """Receives each hand-off, builds the tensor, sums it, and replies with timestamps.

    Work runs inline on the event loop: a function's runner would add the same executor
    hop to every mode, and here nothing else waits on the loop.
    """

    def __init__(self, nc: NATS, js: JetStreamContext, shm_root: Path, bucket: str) -> None:
        self.nc = nc
        self.js = js
        self.cache = SegmentCache(shm_root)
        self.bucket = bucket
        self.buf = bytearray()
        self.filled = 0
        self.shape: list[int] = []

    async def on_tube(self, msg: NatsMsg) -> None:
        tube = decode(msg.data, Tube)
        place = tube.placements[0]
        mm = self.cache.map(place.segment)
        t = torch.frombuffer(
            mm, dtype=torch.float32, count=tube.nbytes // 4, offset=place.offset
        ).view(tube.shape)
        ready, done, total = touch(t)
        del t
        self.cache.forget(place.segment)
        mm.close()
        await msg.respond(result(ready, done, total))

    async def on_bytes(self, msg: NatsMsg) -> None:
        if msg.subject.endswith(".begin"):
            meta = json.loads(msg.data)
            self.buf = bytearray(meta["nbytes"])
            self.shape = meta["shape"]
            self.filled = 0
            return
        end = self.filled + len(msg.data)
        self.buf[self.filled : end] = msg.data
        self.filled = end
        if end < len(self.buf):
            await msg.respond(b"")  # the ack that opens the producer's window
            return
        t = torch.frombuffer(self.buf, dtype=torch.float32).view(self.shape)
        ready, done, total = touch(t)
        del t
        await msg.respond(result(ready, done, total))

    async def on_object(self, msg: NatsMsg) -> None:
        req = json.loads(msg.data)
        buf = bytearray()
        await get_object(self.js, self.bucket, req["name"], buf)
        t = torch.frombuffer(buf, dtype=torch.float32).view(req["shape"])
        ready, done, total = touch(t)
        del t
        await msg.respond(result(ready, done, total))


async def consumer_main(args: argparse.Namespace) -> int:
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(repr(exc))
        print(f"consumer: NATS error {exc!r}", file=sys.stderr, flush=True)

    torch.set_num_threads(1)  # see the module docstring
    nc = await nats.connect(args.nats_url, error_cb=on_error, **connect_options(Config.from_env()))
    consumer = Consumer(nc, nc.jetstream(), Path(args.shm_dir), args.bucket)
    stop = asyncio.Event()

    async def on_stop(msg: NatsMsg) -> None:
        await msg.respond(json.dumps({"errors": errors}).encode())
        stop.set()

    p = args.prefix
    await nc.subscribe(f"{p}.tube", cb=consumer.on_tube)
    await nc.subscribe(f"{p}.bytes.>", cb=consumer.on_bytes)
    await nc.subscribe(f"{p}.object", cb=consumer.on_object)
    await nc.subscribe(f"{p}.stop", cb=on_stop)
    await nc.flush()
    await nc.publish(f"{p}.ready", b"")
    await stop.wait()
    await nc.drain()
    return 0


# --- the producer (this process) -------------------------------------------------------------


@dataclass
class Sample:
    """One hand-off: milliseconds from the producer having the tensor to each point."""

    ready_ms: float
    done_ms: float


class Producer:
    """Hands a tensor to the consumer process in each mode and times it."""

    def __init__(self, nc: NATS, js: JetStreamContext, prefix: str, shm_root: Path) -> None:
        self.nc = nc
        self.js = js
        self.prefix = prefix
        self.shm_root = shm_root
        self.inbox = nc.new_inbox()
        self.waiting: dict[str, asyncio.Future[bytes]] = {}
        self.seq = 0

    async def start(self) -> None:
        async def on_reply(msg: NatsMsg) -> None:
            fut = self.waiting.pop(msg.subject, None)
            if fut is not None and not fut.done():
                fut.set_result(msg.data)

        await self.nc.subscribe(f"{self.inbox}.*", cb=on_reply)

    async def request(self, what: str, payload: bytes) -> bytes:
        reply = await self.nc.request(f"{self.prefix}.{what}", payload, timeout=REQUEST_TIMEOUT_S)
        return reply.data

    async def tubes(self, t: torch.Tensor, expected: float) -> Sample:
        t0 = now_ns()
        tube = write_tube(
            self.shm_root, NODE, TENANT, datatype="FP32", shape=list(t.shape), data=byte_view(t)
        )
        reply = await self.request("tube", encode(tube))
        delete_tube(self.shm_root, tube)
        return sample(t0, reply, expected)

    async def tubes_in_place(self, t: torch.Tensor, expected: float) -> Sample:
        # Untimed: the producing function wrote its output into this segment.
        tube = write_tube(
            self.shm_root, NODE, TENANT, datatype="FP32", shape=list(t.shape), data=byte_view(t)
        )
        t0 = now_ns()
        reply = await self.request("tube", encode(tube))
        delete_tube(self.shm_root, tube)
        return sample(t0, reply, expected)

    async def nats_bytes(self, t: torch.Tensor, expected: float) -> Sample:
        view = byte_view(t)
        chunk = self.nc.max_payload  # from the server's INFO
        t0 = now_ns()
        meta = json.dumps({"nbytes": len(view), "shape": list(t.shape)}).encode()
        await self.nc.publish(f"{self.prefix}.bytes.begin", meta)
        in_flight: deque[asyncio.Future[bytes]] = deque()
        last = b""
        for off in range(0, len(view), chunk):
            if len(in_flight) >= NATS_WINDOW:
                last = await asyncio.wait_for(in_flight.popleft(), REQUEST_TIMEOUT_S)
            reply = f"{self.inbox}.{self.seq}"
            self.seq += 1
            fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
            self.waiting[reply] = fut
            in_flight.append(fut)
            # nats-py concatenates the payload into its PUB command, so a slice of the
            # tensor's memory goes out with one copy, as bytes would.
            payload = cast(bytes, view[off : off + chunk])
            await self.nc.publish(f"{self.prefix}.bytes.chunk", payload, reply=reply)
        while in_flight:
            last = await asyncio.wait_for(in_flight.popleft(), REQUEST_TIMEOUT_S)
        return sample(t0, last, expected)

    async def object_store(self, t: torch.Tensor, expected: float) -> Sample:
        name = f"t{self.seq}"
        self.seq += 1
        t0 = now_ns()
        await put_object(self.js, BUCKET, name, byte_view(t))
        req = json.dumps({"name": name, "shape": list(t.shape)}).encode()
        reply = await self.request("object", req)
        await delete_object(self.js, BUCKET, name)
        return sample(t0, reply, expected)


def sample(t0_ns: int, reply: bytes, expected: float) -> Sample:
    """Check the consumer's sum and turn its timestamps into milliseconds since ``t0_ns``."""
    r = json.loads(reply)
    if not math.isclose(r["sum"], expected, rel_tol=1e-6, abs_tol=1e-3):
        raise RuntimeError(f"consumer summed {r['sum']}, producer {expected}: bytes differ")
    return Sample((r["ready_ns"] - t0_ns) / 1e6, (r["done_ns"] - t0_ns) / 1e6)


# --- statistics and report --------------------------------------------------------------------


@dataclass
class Stats:
    ready_p50_ms: float
    ready_p95_ms: float
    done_p50_ms: float
    done_p95_ms: float

    @classmethod
    def of(cls, samples: list[Sample]) -> Stats:
        ready = [s.ready_ms for s in samples]
        done = [s.done_ms for s in samples]
        return cls(
            harness.percentile(ready, 50),
            harness.percentile(ready, 95),
            harness.percentile(done, 50),
            harness.percentile(done, 95),
        )


def print_table(size_mib: int, stats: dict[str, Stats], ray_note: str | None) -> None:
    print(f"\n{size_mib} MiB float32 tensor ({size_mib * 2**18:,} elements)")
    print(f"  {'mode':<22}{'to tensor p50':>14}{'p95':>9}{'to summed p50':>15}{'p95':>9}  (ms)")
    for mode, s in stats.items():
        print(
            f"  {LABELS[mode]:<22}{s.ready_p50_ms:>14.2f}{s.ready_p95_ms:>9.2f}"
            f"{s.done_p50_ms:>15.2f}{s.done_p95_ms:>9.2f}"
        )
    if ray_note:
        print(f"  {LABELS['ray']:<22}  {ray_note}")
    print("  ratios are the other mode's time / the tubes' time (above 1: tubes are faster)")
    base = stats["tubes"]
    for other in ("nats_bytes", "object_store", "ray"):
        if other in stats:
            o = stats[other]
            print(
                f"  {LABELS[other]} / tubes (write_tube), p50: to tensor "
                f"{o.ready_p50_ms / base.ready_p50_ms:.1f}x, to summed "
                f"{o.done_p50_ms / base.done_p50_ms:.1f}x"
            )
    if "nats_bytes" in stats:
        o, ip = stats["nats_bytes"], stats["tubes_in_place"]
        print(
            f"  {LABELS['nats_bytes']} / tubes (in place), p50: to tensor "
            f"{o.ready_p50_ms / ip.ready_p50_ms:.1f}x, to summed "
            f"{o.done_p50_ms / ip.done_p50_ms:.1f}x"
        )


def print_targets(s: dict[str, Stats]) -> None:
    """The targets at 64 MiB: tubes >= 50x faster than bytes through NATS, no slower than Ray."""

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    nats_bytes = s["nats_bytes"]
    print("\ntargets at 64 MiB, p50 (to tensor; to summed):")
    for mode in ("tubes", "tubes_in_place"):
        t = s[mode]
        r_ready = nats_bytes.ready_p50_ms / t.ready_p50_ms
        r_done = nats_bytes.done_p50_ms / t.done_p50_ms
        print(
            f"  {LABELS[mode]}: >= 50x faster than bytes through NATS: "
            f"{r_ready:.1f}x {verdict(r_ready >= 50)}; {r_done:.1f}x {verdict(r_done >= 50)}"
        )
        if "ray" in s:
            q_ready = s["ray"].ready_p50_ms / t.ready_p50_ms
            q_done = s["ray"].done_p50_ms / t.done_p50_ms
            print(
                f"  {LABELS[mode]}: no slower than Ray: "
                f"{q_ready:.2f}x {verdict(q_ready >= 1)}; {q_done:.2f}x {verdict(q_done >= 1)}"
            )


# --- orchestration ---------------------------------------------------------------------------


def start_nats(data_dir: Path) -> tuple[subprocess.Popen[bytes], str, Path]:
    """The embedded nats-server with the platform's generated config, on a free port."""
    return harness.start_nats(data_dir, START_TIMEOUT_S)


def run_ray(args: argparse.Namespace, work_dir: Path) -> tuple[dict[int, list[Sample]] | None, str]:
    """The Ray column from bench/_handoff_ray.py, or None and why there is none."""
    python = args.ray_python
    if python is None:
        if importlib.util.find_spec("ray") is None:
            return None, "ray: not installed (pass --ray-python PATH to use another interpreter)"
        python = sys.executable
    out = work_dir / "ray.json"
    argv = [
        str(python),
        str(Path(__file__).with_name("_handoff_ray.py")),
        "--sizes",
        ",".join(str(s) for s in args.sizes),
        "--reps",
        str(args.reps),
        "--warmup",
        str(args.warmup),
        "--out",
        str(out),
    ]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    log_path = work_dir / "ray.log"
    with log_path.open("wb") as log:
        proc = subprocess.run(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            timeout=args.ray_timeout,
            check=False,  # a failure is reported in the table's place, not raised
        )
    if proc.returncode != 0 or not out.exists():
        return None, f"ray: failed (exit {proc.returncode}):\n{harness.log_tail(log_path)}"
    doc = json.loads(out.read_text())
    samples = {
        int(size): [Sample(r, d) for r, d in pairs] for size, pairs in doc["samples"].items()
    }
    return samples, f"ray {doc['ray']} in {python} (torch {doc['torch']})"


async def measure(
    args: argparse.Namespace, url: str, shm_root: Path, work_dir: Path
) -> dict[int, dict[str, list[Sample]]]:
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(repr(exc))

    nc = await nats.connect(url, error_cb=on_error, **connect_options(Config.from_env()))
    js = nc.jetstream()
    await ensure_object_bucket(js, BUCKET)
    prefix = nc.new_inbox()  # private subjects for this run's two processes
    ready = await nc.subscribe(f"{prefix}.ready", max_msgs=1)
    log_path = work_dir / "consumer.log"
    with log_path.open("wb") as log:
        consumer = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--role",
            "consumer",
            "--nats-url",
            url,
            "--prefix",
            prefix,
            "--shm-dir",
            str(shm_root),
            "--bucket",
            BUCKET,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        await ready.next_msg(timeout=START_TIMEOUT_S)
        print(f"consumer: pid {consumer.pid}, producer: pid {os.getpid()}")
        producer = Producer(nc, js, prefix, shm_root)
        await producer.start()
        runs: dict[str, Callable[[torch.Tensor, float], Awaitable[Sample]]] = {
            "tubes": producer.tubes,
            "tubes_in_place": producer.tubes_in_place,
            "nats_bytes": producer.nats_bytes,
            "object_store": producer.object_store,
        }
        results: dict[int, dict[str, list[Sample]]] = {}
        gen = torch.Generator().manual_seed(0)
        for size in args.sizes:
            t = torch.randn(size * 2**18, generator=gen, dtype=torch.float32)
            expected = float(t.sum())
            per_mode: dict[str, list[Sample]] = {m: [] for m in MODES}
            for i in range(args.warmup + args.reps):
                order = MODES[i % len(MODES) :] + MODES[: i % len(MODES)]
                for mode in order:
                    s = await runs[mode](t, expected)
                    if i >= args.warmup:
                        per_mode[mode].append(s)
            results[size] = per_mode
        reply = await producer.request("stop", b"")
        consumer_errors = json.loads(reply)["errors"]
        await asyncio.wait_for(consumer.wait(), 30)
    finally:
        if consumer.returncode is None:
            consumer.terminate()
            await asyncio.wait_for(consumer.wait(), 30)
        await nc.drain()
    if consumer.returncode != 0:
        raise RuntimeError(f"consumer exited {consumer.returncode}:\n{harness.log_tail(log_path)}")
    print(
        f"NATS errors reported to the clients: producer {errors or 'none'}, "
        f"consumer {consumer_errors or 'none'}"
    )
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="1,16,64", help="comma-separated tensor sizes in MiB")
    ap.add_argument("--reps", type=int, default=20, help="timed hand-offs per mode and size")
    ap.add_argument("--warmup", type=int, default=3, help="untimed hand-offs per mode and size")
    ap.add_argument(
        "--ray-python", type=Path, default=None, help="interpreter with Ray (and torch)"
    )
    ap.add_argument("--ray-timeout", type=float, default=600.0, help="seconds for the Ray part")
    ap.add_argument("--json", type=Path, default=None, metavar="PATH", help="write results here")
    # Internal: how this script starts its consumer process.
    ap.add_argument("--role", choices=("producer", "consumer"), default="producer", help="internal")
    ap.add_argument("--nats-url", help=argparse.SUPPRESS)
    ap.add_argument("--prefix", help=argparse.SUPPRESS)
    ap.add_argument("--shm-dir", help=argparse.SUPPRESS)
    ap.add_argument("--bucket", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    try:
        args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        ap.error(f"--sizes: not a list of integers: {args.sizes!r}")
    if not args.sizes or min(args.sizes) < 1:
        ap.error("--sizes: sizes must be positive")
    if args.reps < 1 or args.warmup < 0:
        ap.error("--reps must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role == "consumer":
        return asyncio.run(consumer_main(args))
    signal.signal(signal.SIGTERM, harness.terminate)
    m = harness.machine(
        "CPU (no GPU)", memory=True, extra={"torch_threads": torch.get_num_threads()}
    )
    harness.print_machine(m)
    work_dir = Path(tempfile.mkdtemp(prefix="gpufaas-handoff-"))
    shm_root = Path(tempfile.mkdtemp(prefix="gpufaas-handoff-", dir=default_shm_dir().parent))
    server: subprocess.Popen[bytes] | None = None
    try:
        server, url, server_log = start_nats(work_dir)
        results = asyncio.run(measure(args, url, shm_root, work_dir))
        server.terminate()
        server.wait(timeout=30)
        slow = "Slow Consumer" in server_log.read_text(errors="replace")
        print(f"nats-server: slow consumers logged: {'YES' if slow else 'none'}")
        ray_samples, ray_note = run_ray(args, work_dir)
        print(ray_note)
        m["loadavg_1m_after"] = round(os.getloadavg()[0], 2)
        print(
            f"sizes {args.sizes} MiB; {args.reps} timed rounds ({args.warmup} warm-up) per mode, "
            f"modes rotated each round; Ray run after the others"
        )
        summary: dict[int, dict[str, Stats]] = {}
        for size, per_mode in results.items():
            stats = {mode: Stats.of(s) for mode, s in per_mode.items()}
            if ray_samples is not None:
                stats["ray"] = Stats.of(ray_samples[size])
            summary[size] = stats
            print_table(size, stats, None if ray_samples is not None else "not run")
        if 64 in summary:
            print_targets(summary[64])
        print(
            f"\nload average (1 min): {m['loadavg_1m_before']} before, "
            f"{m['loadavg_1m_after']} after, on {m['cores']} cores"
        )
    finally:
        if server is not None and server.poll() is None:
            server.terminate()
            server.wait(timeout=30)
        shutil.rmtree(shm_root, ignore_errors=True)
        shutil.rmtree(work_dir, ignore_errors=True)
    if args.json is not None:
        doc = {
            "machine": m,
            "command": [sys.executable, *sys.argv],
            "settings": {"sizes_mib": args.sizes, "reps": args.reps, "warmup": args.warmup},
            "ray": ray_note,
            "stats": {
                str(size): {mode: asdict(s) for mode, s in stats.items()}
                for size, stats in summary.items()
            },
            "samples": {
                str(size): {mode: [asdict(s) for s in ss] for mode, ss in per_mode.items()}
                | ({"ray": [asdict(s) for s in ray_samples[size]]} if ray_samples else {})
                for size, per_mode in results.items()
            },
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
