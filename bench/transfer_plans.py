"""Transfer plans on a simulated DGX-1: the planner versus a naive copy and the optimum.

Builds the link model of ``dgx1-v100`` (8x V100, hybrid cube-mesh NVLink, four PCIe 3.0
switches each shared by two GPUs) and, for each case and size, compares

  (a) the planner's plan: its modelled time (all parts finishing together),
  (b) the naive serverless copy: one route only, host-staged GPU -> host -> GPU over
      PCIe for GPU pairs, or the destination's own PCIe link for host -> GPU,
  (c) the link model's optimum: size / max-flow over every path of the resource graph
      (any number of relays, through the host too) + the lowest route latency,

each idle and under a background load on some links (subtracted from the capacities
for all three). For GPU pairs it also prints the NVLink-only optimum, since the planner
never stages a GPU pair through the host when an NVLink path exists (by policy).

Times (a)-(c) are **simulated from the link model, not measured**. The planner's
decision time (median/p95 over many decisions, wall clock on this CPU) is measured.

Run:  .venv/bin/python bench/transfer_plans.py [--decisions 2000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import _platform as harness

from gpufaas.shared.devices import load_topology
from gpufaas.transfer.linkmodel import LinkModel, Route, nvlink_resource, pcie_resource
from gpufaas.transfer.planner import Planner

MiB = 2**20
GiB = 2**30
GB = 1e9
TARGET = 1.10  # plan within 10% of the optimum
TOPOLOGY = "dgx1-v100"
LABEL = "simulated (link model), not measured"


@dataclass(frozen=True)
class Case:
    src: str
    dst: str
    label: str


CASES = [
    Case("host", "gpu:0", "host -> gpu:0 (PCIe, uplink shared with gpu:1)"),
    Case("gpu:0", "gpu:3", "gpu:0 -> gpu:3 (direct NVLink, 2 links)"),
    Case("gpu:0", "gpu:1", "gpu:0 -> gpu:1 (direct NVLink, 1 link)"),
    Case("gpu:0", "gpu:5", "gpu:0 -> gpu:5 (no direct NVLink)"),
]

# Other work on the node: a copy into gpu:2 (10 GB/s on switch1's uplink), gpu:4
# streaming to gpu:0, gpu:0 sending to gpu:3 and gpu:1, and traffic into gpu:5.
BACKGROUND: dict[str, float] = {
    "uplink:switch1:h2d": 10 * GB,
    pcie_resource("gpu:2", "h2d"): 10 * GB,
    nvlink_resource("gpu:4", "gpu:0"): 40 * GB,
    nvlink_resource("gpu:0", "gpu:3"): 40 * GB,
    nvlink_resource("gpu:0", "gpu:1"): 25 * GB,
    nvlink_resource("gpu:1", "gpu:5"): 30 * GB,
    nvlink_resource("gpu:4", "gpu:5"): 25 * GB,
}


@dataclass
class Row:
    case: str
    src: str
    dst: str
    load: str
    nbytes: int
    plan_ms: float
    plan_gbps: float
    routes: list[str]
    route_mib: list[float]
    naive_route: str
    naive_ms: float
    optimum_ms: float
    nvlink_optimum_ms: float | None
    speedup_vs_naive: float
    ratio_to_optimum: float
    ratio_to_nvlink_optimum: float | None
    within_target: bool


@dataclass
class Timing:
    case: str
    load: str
    decisions: int
    median_us: float
    p95_us: float


# --- the three figures ---------------------------------------------------------------


def naive_route(model: LinkModel, src: str, dst: str) -> Route:
    """What a naive system does: stage GPU pairs through the host, else one PCIe link."""
    kind = "host-staged" if "host" not in (src, dst) else "direct"
    return next(r for r in model.routes(src, dst) if r.kind == kind)


def single_route_s(model: LinkModel, route: Route, nbytes: int, load: dict[str, float]) -> float:
    spare = min(model.available_bps(route.resources, load))
    return route.latency_s + nbytes / spare if spare > 0 else float("inf")


def nvlink_optimum_s(
    model: LinkModel, src: str, dst: str, nbytes: int, load: dict[str, float]
) -> float:
    """The optimum over NVLink paths alone: what the no-host policy leaves for a GPU pair."""
    nvlinks = [r for r in model.capacities_bps if r.startswith("nvlink:")]
    value, _ = model.flow_net(src, dst, nvlinks).max_flow(model.available_bps(nvlinks, load))
    nv_routes = [r for r in model.routes(src, dst) if r.kind != "host-staged"]
    return nbytes / value + min(r.latency_s for r in nv_routes)


def evaluate(planner: Planner, case: Case, nbytes: int, *, loaded: bool) -> Row:
    model = planner.model
    src, dst = case.src, case.dst
    load = BACKGROUND if loaded else {}
    plan = planner.plan(src, dst, nbytes, load)
    naive = naive_route(model, src, dst)
    naive_s = single_route_s(model, naive, nbytes, load)
    optimum_s = model.max_flow_time(src, dst, nbytes, load)
    nv_s = nvlink_optimum_s(model, src, dst, nbytes, load) if "host" not in (src, dst) else None
    return Row(
        case=case.label,
        src=src,
        dst=dst,
        load="background" if loaded else "idle",
        nbytes=nbytes,
        plan_ms=plan.modelled_time_s * 1e3,
        plan_gbps=plan.rate_bps / GB,
        routes=[p.route.name for p in plan.parts],
        route_mib=[round(p.nbytes / MiB, 2) for p in plan.parts],
        naive_route=naive.name,
        naive_ms=naive_s * 1e3,
        optimum_ms=optimum_s * 1e3,
        nvlink_optimum_ms=None if nv_s is None else nv_s * 1e3,
        speedup_vs_naive=naive_s / plan.modelled_time_s,
        ratio_to_optimum=plan.modelled_time_s / optimum_s,
        ratio_to_nvlink_optimum=None if nv_s is None else plan.modelled_time_s / nv_s,
        within_target=plan.modelled_time_s <= TARGET * optimum_s,
    )


def time_decisions(planner: Planner, case: Case, n: int, *, loaded: bool) -> Timing:
    """Wall-clock time of ``plan()`` (measured), sizes alternating 64 MiB / 1 GiB."""
    load = BACKGROUND if loaded else {}
    src, dst = case.src, case.dst
    for i in range(min(n, 200)):  # warm-up
        planner.plan(src, dst, (64 * MiB, GiB)[i % 2], load)
    took: list[float] = []
    for i in range(n):
        t0 = time.perf_counter_ns()
        planner.plan(src, dst, (64 * MiB, GiB)[i % 2], load)
        took.append((time.perf_counter_ns() - t0) / 1e3)
    return Timing(
        case.label,
        "background" if loaded else "idle",
        n,
        statistics.median(took),
        harness.percentile(took, 95),
    )


# --- reporting -----------------------------------------------------------------------


def print_rows(rows: list[Row]) -> None:
    print(f"\nplans ({LABEL}); ms = modelled milliseconds")
    head = (
        f"  {'case':<48}{'load':<11}{'size':>8}{'plan ms':>9}{'GB/s':>7}{'naive ms':>10}"
        f"{'optimum':>9}{'NVL-only':>9}{'naive/plan':>11}{'plan/opt':>9}{'plan/NVL':>9}"
    )
    print(head)
    for r in rows:
        size = f"{r.nbytes // MiB} MiB" if r.nbytes < GiB else f"{r.nbytes // GiB} GiB"
        nv = f"{r.nvlink_optimum_ms:>9.3f}" if r.nvlink_optimum_ms is not None else f"{'-':>9}"
        nvr = f"{r.ratio_to_nvlink_optimum:>8.3f}x" if r.ratio_to_nvlink_optimum else f"{'-':>9}"
        print(
            f"  {r.case:<48}{r.load:<11}{size:>8}{r.plan_ms:>9.3f}{r.plan_gbps:>7.1f}"
            f"{r.naive_ms:>10.3f}{r.optimum_ms:>9.3f}{nv}{r.speedup_vs_naive:>10.2f}x"
            f"{r.ratio_to_optimum:>8.3f}x{nvr}"
        )
    print("\nroutes of the 1 GiB plans (MiB per route):")
    for r in rows:
        if r.nbytes == GiB:
            parts = ", ".join(f"{n} {m:.0f}" for n, m in zip(r.routes, r.route_mib, strict=True))
            print(f"  {r.case} [{r.load}]: {parts}")
    met = sum(r.within_target for r in rows)
    print(f"\nwithin {TARGET:.2f}x of the optimum: {met} of {len(rows)} plans")
    for r in rows:
        if not r.within_target:
            print(f"  over: {r.case} [{r.load}] {r.nbytes // MiB} MiB at {r.ratio_to_optimum:.3f}x")


def print_timings(timings: list[Timing]) -> None:
    print("\nplanner decision time (measured, wall clock on this CPU, one Python thread):")
    for t in timings:
        print(f"  {t.case:<48}{t.load:<11} median {t.median_us:7.1f} us   p95 {t.p95_us:7.1f} us")
    print(
        f"  all cases: median of medians {statistics.median(t.median_us for t in timings):.1f} us, "
        f"worst p95 {max(t.p95_us for t in timings):.1f} us (target <= 50 us per decision)"
    )


# --- main ----------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--decisions", type=int, default=2000, help="timed plan() calls per case")
    ap.add_argument("--json", type=Path, default=None, metavar="PATH", help="write results here")
    args = ap.parse_args(argv)
    if args.decisions < 1:
        ap.error("--decisions must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    m = harness.machine(f"simulated DGX-1 ({TOPOLOGY} link model); plans {LABEL}")
    harness.print_machine(m)
    t0 = time.perf_counter()
    model = LinkModel(load_topology(TOPOLOGY))
    planner = Planner(model)
    setup_ms = (time.perf_counter() - t0) * 1e3
    n_routes = sum(len(model.routes(s, d)) for s in model.devices for d in model.devices if s != d)
    print(
        f"link model: {len(model.capacities_bps)} resources, {n_routes} candidate routes "
        f"(<= {model.max_nvlink_hops} NVLink hops), built with the planner in {setup_ms:.1f} ms"
    )
    print("background load: " + ", ".join(f"{r} {v / GB:g} GB/s" for r, v in BACKGROUND.items()))

    rows: list[Row] = []
    timings: list[Timing] = []
    for case in CASES:
        for loaded in (False, True):
            rows.extend(evaluate(planner, case, n, loaded=loaded) for n in (64 * MiB, GiB))
            timings.append(time_decisions(planner, case, args.decisions, loaded=loaded))
    print_rows(rows)
    print_timings(timings)

    if args.json is not None:
        doc: dict[str, Any] = {
            "machine": m,
            "command": [sys.executable, *sys.argv],
            "settings": {
                "topology": TOPOLOGY,
                "decisions": args.decisions,
                "background": BACKGROUND,
            },
            "label": LABEL,
            "plans": [asdict(r) for r in rows],
            "decision_time_measured": [asdict(t) for t in timings],
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
