"""Invocation overhead: a warm call through the gateway versus the same model in-process.

Starts ``gpufaas up --demo --devices cpu`` (the real all-MiniLM-L6-v2 embedding model as
function ``minilm``) on free ports with a temporary data directory, then for each batch
size alternates, request by request, between

  (a) ``POST /v2/models/minilm/infer`` over one keep-alive HTTP connection (timed from
      sending the request to having the JSON reply decoded), and
  (b) ``BertEmbedder.embed`` on the same weights in this process,

and prints p50/p99/mean of each, the overhead and the ratio, and the median of the
platform's own breakdown (``parameters.breakdown_us``) so one can see where the time goes.

Both sides compute under the OpenMP settings of the platform's workers (the script runs
itself again under them if needed). It prints the ratio of the worker's compute to the
in-process call and exits 1 when it is above ``--max-compute-ratio`` (1.25): a
regression of the warm path.

Run:  .venv/bin/python bench/invoke_overhead.py [--requests 200] [--batch 1,8] [--json out.json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import _platform as harness
import safetensors.torch
import torch

from gpufaas.shared.catalog import resolve_model_dir
from gpufaas.shared.messages import ModelSource
from gpufaas.worker.models.bert import BertConfig, BertEmbedder, load_tokenizer

FUNCTION = "minilm"
MAX_ABS_DIFF = 1e-5

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Serverless inference keeps the model warm between requests.",
    "The quick brown fox jumps over the lazy dog.",
    "Content-addressed tensors are stored once and shared by every function.",
    "It is raining in the city tonight.",
    "Someone is slicing a tomato in the kitchen.",
    "A cheetah is running behind its prey.",
    "The scheduler places functions near their weights.",
    "Embeddings map sentences to points in a vector space.",
]


# --- measurement --------------------------------------------------------------------


def function_ready(port: int, headers: dict[str, str]) -> bool:
    """Whether the demo function answers ``GET /v2/models/minilm/ready`` with 200."""
    return harness.http_status(port, f"/v2/models/{FUNCTION}/ready", headers) == 200


def load_embedder() -> BertEmbedder:
    d = resolve_model_dir(ModelSource(builtin="all-minilm-l6-v2"))
    cfg = BertConfig.from_model_dir(d)
    weights = safetensors.torch.load_file(d / "model.safetensors")
    return BertEmbedder(weights, cfg, load_tokenizer(d, cfg.max_seq_length))


def texts_for(batch: int) -> list[str]:
    return [SENTENCES[i % len(SENTENCES)] for i in range(batch)]


class Gateway:
    """One keep-alive HTTP connection to the gateway's infer endpoint."""

    def __init__(self, port: int, headers: dict[str, str]) -> None:
        self.conn = http.client.HTTPConnection(harness.HOST, port, timeout=60)
        self.headers = {"Content-Type": "application/json", **headers}  # the API key
        self.connections = 0
        self.last_decode_s = 0.0
        self._sock: object = None

    def infer(self, body: bytes) -> dict[str, Any]:
        self.conn.request(
            "POST",
            f"/v2/models/{FUNCTION}/infer",
            body=body,
            headers=self.headers,
        )
        if self.conn.sock is not self._sock:  # http.client reconnected (or first request)
            self._sock = self.conn.sock
            self.connections += 1
        resp = self.conn.getresponse()
        raw = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"infer returned HTTP {resp.status}: {raw[:500]!r}")
        t0 = time.perf_counter()
        reply: dict[str, Any] = json.loads(raw)
        self.last_decode_s = time.perf_counter() - t0
        return reply

    def close(self) -> None:
        self.conn.close()


def infer_body(texts: list[str]) -> bytes:
    payload = {
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]
    }
    return json.dumps(payload).encode()


def embedding_of(reply: dict[str, Any], batch: int) -> torch.Tensor:
    out = next(o for o in reply["outputs"] if o["name"] == "embedding")
    if out["shape"][0] != batch:
        raise RuntimeError(f"gateway returned shape {out['shape']} for a batch of {batch}")
    return torch.tensor(out["data"], dtype=torch.float32).reshape(out["shape"])


@dataclass
class Stats:
    p50_ms: float
    p99_ms: float
    mean_ms: float

    @classmethod
    def of(cls, seconds: list[float]) -> Stats:
        ms = [x * 1e3 for x in seconds]
        return cls(harness.percentile(ms, 50), harness.percentile(ms, 99), sum(ms) / len(ms))


@dataclass
class BatchResult:
    batch: int
    requests: int
    gateway: Stats
    in_process: Stats
    overhead_p50_ms: float
    ratio_p50: float
    ratio_p99: float
    max_abs_diff: float
    breakdown_median_ms: dict[str, float] = field(default_factory=dict)
    cold_replies: int = 0
    compute_ratio: float = 0.0  # the worker's compute (median) over in-process (median)


def measure(gw: Gateway, emb: BertEmbedder, batch: int, requests: int, warmup: int) -> BatchResult:
    texts = texts_for(batch)
    body = infer_body(texts)

    # Correctness first: the gateway must return what the model computes here.
    reference = emb.embed(texts)
    diff = float((embedding_of(gw.infer(body), batch) - reference).abs().max())
    if not diff <= MAX_ABS_DIFF:
        raise RuntimeError(
            f"batch {batch}: gateway embedding differs from in-process by {diff:.3g} "
            f"(allowed {MAX_ABS_DIFF:g})"
        )

    for i in range(warmup):
        if i % 2:
            emb.embed(texts)
            gw.infer(body)
        else:
            gw.infer(body)
            emb.embed(texts)

    gw_s: list[float] = []
    ip_s: list[float] = []
    parts: dict[str, list[float]] = {
        k: [] for k in ("queue", "transfer", "load", "compute", "total", "outside", "client_decode")
    }
    cold = 0

    def one_gateway() -> None:
        nonlocal cold
        t0 = time.perf_counter()
        reply = gw.infer(body)
        wall = time.perf_counter() - t0
        gw_s.append(wall)
        b = reply["parameters"]["breakdown_us"]
        for k in ("queue", "transfer", "load", "compute", "total"):
            parts[k].append(b[k] / 1e3)
        # HTTP, JSON both ways, gateway and NATS hops: what the platform's total does not see
        parts["outside"].append(wall * 1e3 - b["total"] / 1e3)
        parts["client_decode"].append(gw.last_decode_s * 1e3)
        cold += b["load"] > 0

    def one_in_process() -> None:
        t0 = time.perf_counter()
        emb.embed(texts)
        ip_s.append(time.perf_counter() - t0)

    for i in range(requests):  # interleaved, order alternating, so drift hits both alike
        first, second = (
            (one_gateway, one_in_process) if i % 2 == 0 else (one_in_process, one_gateway)
        )
        first()
        second()

    g, p = Stats.of(gw_s), Stats.of(ip_s)
    compute_ms = harness.percentile(parts["compute"], 50)
    return BatchResult(
        batch=batch,
        requests=requests,
        gateway=g,
        in_process=p,
        overhead_p50_ms=g.p50_ms - p.p50_ms,
        ratio_p50=g.p50_ms / p.p50_ms,
        ratio_p99=g.p99_ms / p.p99_ms,
        max_abs_diff=diff,
        breakdown_median_ms={k: harness.percentile(v, 50) for k, v in parts.items()},
        cold_replies=cold,
        compute_ratio=compute_ms / p.p50_ms,
    )


# --- reporting ----------------------------------------------------------------------


def print_note() -> None:
    print(
        "note    : the in-process model and the platform's worker (plus gateway, scheduler, NATS)\n"
        "          share the same cores; the two are interleaved request by request, so\n"
        "          neither runs while the other is being timed, but both see the same noise."
    )


def print_result(r: BatchResult) -> None:
    print(f"\nbatch {r.batch}: {r.requests} requests each, interleaved")
    print(f"  {'':<26}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}")
    for label, s in (("(a) gateway, HTTP warm", r.gateway), ("(b) in-process embed", r.in_process)):
        print(f"  {label:<26}{s.p50_ms:>10.2f}{s.p99_ms:>10.2f}{s.mean_ms:>10.2f}")
    print(f"  overhead at p50: {r.overhead_p50_ms:+.2f} ms")
    print(f"  ratio gateway/in-process: p50 {r.ratio_p50:.2f}x, p99 {r.ratio_p99:.2f}x")
    b = r.breakdown_median_ms
    print(
        "  platform breakdown (medians, ms): "
        f"queue {b['queue']:.2f}, transfer {b['transfer']:.2f}, load {b['load']:.2f}, "
        f"compute {b['compute']:.2f}, total {b['total']:.2f}; "
        f"outside it (HTTP, JSON, gateway, NATS) {b['outside']:.2f}, "
        f"of which this client's json.loads {b['client_decode']:.2f}"
    )
    print(f"  max |gateway - in-process| = {r.max_abs_diff:.2e}; cold replies: {r.cold_replies}")
    print(
        f"  worker compute / in-process: {r.compute_ratio:.2f}x "
        f"(the same call, the same thread settings)"
    )


# --- main ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=200, help="timed requests per batch size")
    ap.add_argument("--warmup", type=int, default=20, help="untimed requests per batch size")
    ap.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    ap.add_argument("--keep-data-dir", action="store_true", help="keep the temporary data dir")
    ap.add_argument("--json", type=Path, default=None, metavar="PATH", help="write results here")
    ap.add_argument("--ready-timeout", type=float, default=180.0, help="seconds to wait for up")
    ap.add_argument(
        "--max-compute-ratio",
        type=float,
        default=1.25,
        help="exit 1 when the worker's compute exceeds in-process by more than this",
    )
    ap.add_argument(
        "--no-auth",
        action="store_true",
        help="start up with --no-auth (the baseline of what API keys cost)",
    )
    args = ap.parse_args(argv)
    try:
        args.batches = [int(b) for b in args.batch.split(",") if b.strip()]
    except ValueError:
        ap.error(f"--batch: not a list of integers: {args.batch!r}")
    if not args.batches or min(args.batches) < 1:
        ap.error("--batch: sizes must be positive")
    if args.requests < 1 or args.warmup < 0:
        ap.error("--requests must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads_env = harness.with_worker_threads()  # the in-process model computes as workers do
    signal.signal(signal.SIGTERM, harness.terminate)
    m = harness.machine(
        "CPU (no GPU)", extra={"torch_threads": torch.get_num_threads(), **threads_env}
    )
    harness.print_machine(m)
    print_note()

    emb = load_embedder()
    data_dir = Path(tempfile.mkdtemp(prefix="gpufaas-bench-"))
    plat: harness.Platform | None = None
    gw: Gateway | None = None
    results: list[BatchResult] = []
    try:
        extra = ("--no-auth",) if args.no_auth else ()
        plat = harness.Platform.start(data_dir, "--demo", "--devices", "cpu", *extra)
        up = plat
        took = plat.wait_ready(args.ready_timeout, lambda port: function_ready(port, up.headers))
        print(
            f"platform: gpufaas up --demo --devices cpu {' '.join(extra)} on port"
            f" {plat.http_port}, ready in {took:.1f} s"
        )
        gw = Gateway(plat.http_port, plat.headers)
        for batch in args.batches:
            r = measure(gw, emb, batch, args.requests, args.warmup)
            print_result(r)
            results.append(r)
        print(f"\nHTTP connections opened: {gw.connections} (keep-alive)")
        m["loadavg_1m_after"] = round(os.getloadavg()[0], 2)
        print(
            f"load average (1 min): {m['loadavg_1m_before']} before, {m['loadavg_1m_after']} "
            f"after, on {m['cores']} cores (this bench alone adds about 1)"
        )
    finally:
        if gw is not None:
            gw.close()
        if plat is not None:
            print(f"platform stopped (exit status {harness.stop(plat)})")
        if args.keep_data_dir:
            print(f"data dir kept: {data_dir}")
        else:
            shutil.rmtree(data_dir, ignore_errors=True)

    if args.json is not None:
        doc = {
            "machine": m,
            "command": [sys.executable, *sys.argv],
            "settings": {"requests": args.requests, "warmup": args.warmup, "batches": args.batches},
            "results": [asdict(r) for r in results],
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"results written to {args.json}")
    slow = [r for r in results if r.compute_ratio > args.max_compute_ratio]
    for r in slow:
        print(
            f"REGRESSION: batch {r.batch}: the worker computes {r.compute_ratio:.2f}x the "
            f"in-process call (allowed {args.max_compute_ratio:g}x)",
            file=sys.stderr,
        )
    return 1 if slow else 0


if __name__ == "__main__":
    sys.exit(main())
