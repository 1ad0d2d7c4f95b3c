"""Workflow overhead: a two-step workflow's total against the sum of its steps' compute, and
the hand-off between two steps by size, on one node and across nodes.

Starts ``gpufaas up --demo --nodes 2 --devices sim:4`` (two nodes on this machine, four
simulated GPUs each) on free ports with a temporary data directory, with
``GPUFAAS_MAX_INSTANCES=1`` (no function is scaled out, so a pair of steps placed on two
nodes stays on two nodes), then:

1. **embed-score** (the README's workflow): the demo encoder ``minilm`` and a one-layer
   ``torch-export`` scorer (384 -> 1), deployed after it, so placement puts it on the
   other node (least loaded). ``--requests`` calls of two sentences: the median of the
   client's wall time and of the workflow's own ``total_us`` against the sum of the
   steps' ``compute_us`` from the same reply, and each step's ``transfer_us``.
2. **hand-off by size**: two weightless ``torch-export`` functions per node, ``grow``
   (``x`` FP32 [N, 1] -> ``y`` = x repeated to [N, K]) and ``sum`` (``y`` -> its row sums),
   wired as workflows ``grow -> sum`` on the same node and across nodes (placement is
   read back after deploying; least loaded alternates the nodes). For each size of ``y``
   (1 KiB ... 64 MiB) the two placements alternate call by call; it prints the medians of
   the producer's ``transfer_us`` (writing its output), the consumer's (reading it) and
   their sum, the hand-off, against the same-node figure.

Every figure is from one run; the baseline of each ratio is measured in the same run.
Compute is on the CPU (the GPUs are simulated: capacities and links only).

Run:  .venv/bin/python bench/workflow_overhead.py [--requests 30] [--handoffs 10]
          [--sizes 1k,3k,64k,1m,16m,64m] [--json out.json]
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import _platform as harness
import torch

EMBED_SCORE = {
    "name": "embed-score",
    "steps": [
        {"name": "embed", "function": "minilm", "inputs": {"text": "$input.text"}},
        {"name": "score", "function": "scorer", "inputs": {"x": "embed.embedding"}},
    ],
    "outputs": {"scores": "score.scores"},
}
TEXTS = ["A man is eating food.", "The quick brown fox jumps over the lazy dog."]
SMALL_K, LARGE_K = 256, 16384  # floats per row of grow's output: 1 KiB and 64 KiB a row
UNITS = {"k": 1 << 10, "m": 1 << 20}
GOAL_TOTAL_MS = 2.0  # total <= compute + 2 ms
GOAL_HANDOFF_MS = 1.0  # a 3 KB hand-off across nodes <= 1 ms


# --- models --------------------------------------------------------------------------


class Scorer(torch.nn.Module):
    """One layer, 384 -> 1: ``x`` FP32 [N, 384] -> ``scores`` [N]."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(384, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"scores": self.layer(x).squeeze(1)}


class Grow(torch.nn.Module):
    """``x`` FP32 [N, 1] -> ``y`` [N, K]: an intermediate of any size from a tiny input."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"y": x.repeat(1, self.k)}


class RowSum(torch.nn.Module):
    """``y`` FP32 [N, K] -> ``s`` [N]: reads all of its input, answers little."""

    def forward(self, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"s": y.sum(dim=1)}


def export(root: Path, name: str, module: torch.nn.Module, example: torch.Tensor) -> Path:
    """``module`` as ``root/name/model.pt2``: its input's rows dynamic, and its width too
    where the example's is 3 (``sum``)."""
    out = root / name
    out.mkdir()
    dims = {0: torch.export.Dim("batch", min=1, max=1024)}
    if example.shape[1] == 3:
        dims[1] = torch.export.Dim("width", min=2, max=1 << 20)
    ep = torch.export.export(module.eval(), (example,), dynamic_shapes=(dims,))
    torch.export.save(ep, out / "model.pt2")
    return out


# --- the gateway ---------------------------------------------------------------------


class Gateway:
    """One keep-alive HTTP connection to the gateway."""

    def __init__(self, port: int, headers: dict[str, str]) -> None:
        self.conn = http.client.HTTPConnection(harness.HOST, port, timeout=120)
        self.headers = {"Content-Type": "application/json", **headers}

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        self.conn.request(method, path, body=data, headers=self.headers)
        resp = self.conn.getresponse()
        raw = resp.read()
        if resp.status >= 300:
            raise RuntimeError(f"{method} {path}: HTTP {resp.status}: {raw[:500]!r}")
        return json.loads(raw)

    def deploy(self, name: str, model_dir: Path) -> str:
        """Deploy a torch-export function; the node it was placed on."""
        body = {"name": name, "model": {"path": str(model_dir), "architecture": "torch-export"}}
        record = self.call("POST", "/v1/functions", body)
        return str(record["nodes"][0])

    def run(self, workflow: str, inputs: list[dict[str, Any]]) -> tuple[float, dict[str, Any]]:
        """One workflow call: the client's wall seconds and the reply."""
        t0 = time.perf_counter()
        reply = self.call("POST", f"/v1/workflows/{workflow}/infer", {"inputs": inputs})
        return time.perf_counter() - t0, reply


def median(values: list[float]) -> float:
    return harness.percentile(values, 50)


def steps_of(reply: dict[str, Any]) -> list[dict[str, Any]]:
    return list(reply["parameters"]["steps"])


# --- 1. embed-score ------------------------------------------------------------------


@dataclass
class EmbedScore:
    requests: int
    nodes: dict[str, str]  # step -> node (of the last call)
    wall_ms: float
    total_ms: float
    compute_ms: float  # the sum of the steps' compute, median over calls
    step_compute_ms: dict[str, float]
    step_transfer_ms: dict[str, float]
    output_tiers: list[str]


def embed_score(gw: Gateway, requests: int, warmup: int) -> EmbedScore:
    inputs = [{"name": "text", "datatype": "BYTES", "shape": [len(TEXTS)], "data": TEXTS}]
    for _ in range(warmup):
        gw.run("embed-score", inputs)
    wall, total, compute = [], [], []
    per: dict[str, dict[str, list[float]]] = {"compute": {}, "transfer": {}}
    reply: dict[str, Any] = {}
    for _ in range(requests):
        w, reply = gw.run("embed-score", inputs)
        steps = steps_of(reply)
        wall.append(w * 1e3)
        total.append(reply["parameters"]["total_us"] / 1e3)
        compute.append(sum(s["breakdown"]["compute_us"] for s in steps) / 1e3)
        for s in steps:
            for part in ("compute", "transfer"):
                ms = s["breakdown"][f"{part}_us"] / 1e3
                per[part].setdefault(s["step"], []).append(ms)
    steps = steps_of(reply)
    return EmbedScore(
        requests=requests,
        nodes={s["step"]: s["node"] for s in steps},
        wall_ms=median(wall),
        total_ms=median(total),
        compute_ms=median(compute),
        step_compute_ms={k: median(v) for k, v in per["compute"].items()},
        step_transfer_ms={k: median(v) for k, v in per["transfer"].items()},
        output_tiers=steps[0]["output_tiers"],
    )


def print_embed_score(r: EmbedScore) -> None:
    print(f"\n1. embed-score, {r.requests} calls of {len(TEXTS)} sentences")
    print(f"   steps' nodes: {r.nodes}; the intermediate: {r.output_tiers}")
    for label, ms in (("client wall", r.wall_ms), ("workflow total_us", r.total_ms)):
        over = ms - r.compute_ms
        print(
            f"   {label:<18} {ms:7.2f} ms vs compute {r.compute_ms:6.2f} ms: "
            f"{ms / r.compute_ms:.2f}x, +{over:.2f} ms = {over / GOAL_TOTAL_MS:.2f}x the "
            f"goal's +{GOAL_TOTAL_MS:g} ms"
        )
    for step, ms in r.step_transfer_ms.items():
        print(f"   step {step:<6} compute {r.step_compute_ms[step]:6.2f} ms, transfer {ms:6.3f} ms")


# --- 2. hand-off by size ----------------------------------------------------------------


@dataclass
class Handoff:
    size: int
    placement: str  # "same node" or "across nodes"
    mode: str  # how the intermediate went: inline, or the tier of its tube
    producer_ms: float  # the producer's transfer_us: writing its output
    consumer_ms: float  # the consumer's transfer_us: reading it
    handoff_ms: float  # the two, per call, median
    overhead_ms: float  # total_us minus the steps' compute, median


def parse_size(text: str) -> int:
    text = text.strip().lower()
    return int(text[:-1]) * UNITS[text[-1]] if text[-1] in UNITS else int(text)


def grow_input(size: int) -> tuple[str, list[dict[str, Any]]]:
    """The producer (small or large rows) and the input that makes ``size`` bytes of ``y``."""
    k = SMALL_K if size < LARGE_K * 4 else LARGE_K
    rows = max(size // (4 * k), 1)
    data = [float(i + 1) for i in range(rows)]
    return ("small" if k == SMALL_K else "large"), [
        {"name": "x", "datatype": "FP32", "shape": [rows, 1], "data": data}
    ]


def one_handoff(gw: Gateway, workflow: str, inputs: list[dict[str, Any]]) -> list[float]:
    """One call: producer and consumer transfer ms, their sum, and total minus compute."""
    _, reply = gw.run(workflow, inputs)
    rows = inputs[0]["shape"][0]
    (sums,) = reply["outputs"]
    k = sums["data"][0] / inputs[0]["data"][0]  # row i sums to (i + 1) * K
    if sums["shape"] != [rows] or k not in (SMALL_K, LARGE_K):
        raise RuntimeError(f"{workflow}: wrong sums {sums['shape']} {sums['data'][:3]}")
    grow, total = steps_of(reply)
    p, c = grow["breakdown"]["transfer_us"] / 1e3, total["breakdown"]["transfer_us"] / 1e3
    compute = (grow["breakdown"]["compute_us"] + total["breakdown"]["compute_us"]) / 1e3
    return [p, c, p + c, reply["parameters"]["total_us"] / 1e3 - compute]


def handoffs(
    gw: Gateway, pairs: dict[str, dict[str, str]], sizes: list[int], n: int
) -> list[Handoff]:
    out = []
    for size in sizes:
        producer, inputs = grow_input(size)
        flows = pairs[producer]  # placement -> workflow
        samples: dict[str, list[list[float]]] = {p: [] for p in flows}
        for i in range(n + 1):  # the first round warms up; the order alternates
            for placement in sorted(flows, reverse=bool(i % 2)):
                got = one_handoff(gw, flows[placement], inputs)
                if i:
                    samples[placement].append(got)
        _, reply = gw.run(flows["same node"], inputs)
        mode = "/".join(steps_of(reply)[0]["output_tiers"])
        for placement, rows in samples.items():
            cols = [median(list(col)) for col in zip(*rows, strict=True)]
            out.append(Handoff(size, placement, mode, *cols))
    return out


def print_handoffs(results: list[Handoff], n: int) -> None:
    print(f"\n2. hand-off grow -> sum by the size of the intermediate, {n} calls each, medians")
    print(
        f"   {'size':>8}  {'mode':<7} {'placement':<13}{'producer':>10}{'consumer':>10}"
        f"{'hand-off':>10}{'vs same':>9}{'total-compute':>15}"
    )
    same = {r.size: r.handoff_ms for r in results if r.placement == "same node"}
    for r in results:
        size = harness.mib(r.size) if r.size >= 1 << 20 else f"{r.size >> 10} KiB"
        ratio = r.handoff_ms / same[r.size] if same[r.size] > 0 else float("nan")
        print(
            f"   {size:>8}  {r.mode:<7} {r.placement:<13}{r.producer_ms:>8.3f}ms"
            f"{r.consumer_ms:>8.3f}ms{r.handoff_ms:>8.3f}ms{ratio:>8.2f}x{r.overhead_ms:>13.2f}ms"
        )
    for r in results:
        if r.size == 3 << 10 and r.placement == "across nodes":
            print(
                f"   3 KiB across nodes: {r.handoff_ms:.3f} ms = "
                f"{r.handoff_ms / GOAL_HANDOFF_MS:.2f}x the goal's {GOAL_HANDOFF_MS:g} ms"
            )


# --- main ---------------------------------------------------------------------------


def export_all(root: Path) -> dict[str, Path]:
    """Every function's program, in the order they are deployed."""
    return {
        name: export(root, name, module, example)
        for name, module, example in (
            ("scorer", Scorer(), torch.randn(2, 384)),
            ("grow-small", Grow(SMALL_K), torch.ones(2, 1)),
            ("grow-large", Grow(LARGE_K), torch.ones(2, 1)),
            ("sum-a", RowSum(), torch.ones(2, 3)),
            ("sum-b", RowSum(), torch.ones(2, 3)),
        )
    }


def deploy_all(gw: Gateway, models: dict[str, Path]) -> dict[str, dict[str, str]]:
    """The scorer and embed-score, then grow and sum on both nodes and the four grow -> sum
    workflows; returns producer ("small", "large") -> placement -> workflow."""
    scorer = gw.deploy("scorer", models["scorer"])
    print(f"   scorer placed on {scorer} (minilm on node-0 since up)")
    gw.call("POST", "/v1/workflows", EMBED_SCORE)
    nodes = {name: gw.deploy(name, path) for name, path in models.items() if name != "scorer"}
    print(f"   placed: {nodes}")
    pairs: dict[str, dict[str, str]] = {}
    for producer in ("small", "large"):
        for consumer in ("sum-a", "sum-b"):
            same = nodes[f"grow-{producer}"] == nodes[consumer]
            flow = f"{producer}-{consumer}"
            steps = [
                {"name": "grow", "function": f"grow-{producer}", "inputs": {"x": "$input.x"}},
                {"name": "sum", "function": consumer, "inputs": {"y": "grow.y"}},
            ]
            gw.call("POST", "/v1/workflows", {"name": flow, "steps": steps})
            pairs.setdefault(producer, {})["same node" if same else "across nodes"] = flow
    if any(len(p) != 2 for p in pairs.values()):
        raise RuntimeError(f"placement gave no same-node and cross-node pair: {nodes}")
    return pairs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=30, help="timed embed-score calls")
    ap.add_argument("--warmup", type=int, default=5, help="untimed embed-score calls")
    ap.add_argument("--handoffs", type=int, default=10, help="timed calls per size and placement")
    ap.add_argument("--sizes", default="1k,3k,64k,1m,16m,64m", help="sizes of the intermediate")
    ap.add_argument("--json", type=Path, default=None, metavar="PATH", help="write results here")
    ap.add_argument("--ready-timeout", type=float, default=240.0, help="seconds to wait for up")
    args = ap.parse_args(argv)
    try:
        args.size_list = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    except (ValueError, KeyError, IndexError):
        ap.error(f"--sizes: not a list of sizes like 3k or 16m: {args.sizes!r}")
    big = LARGE_K * 4 * 1024
    if not args.size_list or not all(4 * SMALL_K <= s <= big for s in args.size_list):
        ap.error(f"--sizes: each between 1k and {big >> 20}m")
    if args.requests < 1 or args.handoffs < 1 or args.warmup < 0:
        ap.error("--requests and --handoffs must be >= 1, --warmup >= 0")
    return args


def measure(
    up: harness.Platform, models: dict[str, Path], args: argparse.Namespace
) -> dict[str, Any]:
    gw = Gateway(up.http_port, up.headers)
    try:
        pairs = deploy_all(gw, models)
        es = embed_score(gw, args.requests, args.warmup)
        print_embed_score(es)
        ho = handoffs(gw, pairs, args.size_list, args.handoffs)
        print_handoffs(ho, args.handoffs)
    finally:
        gw.conn.close()
    return {"embed_score": asdict(es), "handoffs": [asdict(h) for h in ho]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, harness.terminate)
    m = harness.machine("sim:4 per node (simulated GPUs, compute on the CPU)")
    harness.print_machine(m)
    root = Path(tempfile.mkdtemp(prefix="gpufaas-bench-"))
    env = {"GPUFAAS_MODEL_ROOTS": str(root), "GPUFAAS_MAX_INSTANCES": "1"}
    argv_up = ("--demo", "--nodes", "2", "--devices", "sim:4")
    up: harness.Platform | None = None
    results: dict[str, Any] = {}
    try:
        models = export_all(root)
        up = harness.Platform.start(root / "data", *argv_up, env=env)
        plat = up
        took = plat.wait_ready(
            args.ready_timeout,
            lambda port: harness.http_status(port, "/v2/models/minilm/ready", plat.headers) == 200,
        )
        print(f"platform: gpufaas up {' '.join(argv_up)}, GPUFAAS_MAX_INSTANCES=1, {took:.1f} s")
        results = measure(up, models, args)
        m["loadavg_1m_after"] = round(os.getloadavg()[0], 2)
        print(
            f"\nload average (1 min): {m['loadavg_1m_before']} before, {m['loadavg_1m_after']} after"
        )
    finally:
        if up is not None:
            harness.stop(up)
        shutil.rmtree(root, ignore_errors=True)
    harness.write_json(args.json, m, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
