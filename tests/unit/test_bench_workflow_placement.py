"""``bench/workflow_placement.py`` and ``bench/sched_trace.py`` run tiny: the real per-GPU
placement over simulated 8-GPU DGX-1 nodes (the figures are the benches')."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.unit


def _bench(name: str) -> Any:
    bench = Path(__file__).resolve().parents[2] / "bench"
    sys.path.insert(0, str(bench))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(bench))


def test_data_aware_placement_moves_fewer_pcie_bytes_than_blind() -> None:
    wp = _bench("workflow_placement")
    cfg = wp.BenchConfig(workflows=120, rate_wps=40.0)
    aware, blind = wp.run_all(cfg)
    assert (aware.policy, blind.policy) == ("data-aware", "blind")
    assert aware.workflows == blind.workflows == 108  # the first 10% are not counted
    assert aware.tubes.pcie < blind.tubes.pcie
    assert aware.tubes.network == 0 < blind.tubes.network
    # Every step with input tubes ran on their node, most on their GPU or a neighbour.
    assert aware.placed["other node"] == 0
    near = aware.placed["input GPU"] + aware.placed["NVLink nbr"]
    assert near > 0.5 * sum(aware.placed.values())  # the others: idler GPUs of that node
    assert [len(gpus) for gpus in aware.spread.values()] == [8, 8]
    assert sum(map(sum, aware.spread.values())) == aware.cold_starts
    assert wp.run_all(cfg) == [aware, blind]  # deterministic


def test_workflow_bench_prints_ratios_and_writes_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wp = _bench("workflow_placement")
    out = tmp_path / "wf.json"
    assert wp.main(["--workflows", "40", "--nodes", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "SIMULATED" in printed
    assert "blind / data-aware" in printed
    doc = json.loads(out.read_text())
    assert doc["label"] == "SIMULATED"
    assert [r["policy"] for r in doc["results"]] == ["data-aware", "blind"]
    assert all(r["tubes"]["network"] == 0 for r in doc["results"])  # one node


def test_sched_trace_places_instances_on_gpus_of_8_gpu_nodes() -> None:
    st = _bench("sched_trace")
    cfg, _ = st.parse_args(["--duration-s", "60", "--rate", "10"])
    assert (cfg.nodes, cfg.gpus_per_node, cfg.gpu_gib, cfg.h2d_gbps) == (2, 8, 32.0, 12.5)
    rng = st.random.Random(cfg.seed)
    models = st.make_models(cfg, rng)
    arrivals = st.make_trace(cfg, models, rng)
    ours, rr, _ = (st.Simulation(p, cfg, models, arrivals).run() for p in st.POLICIES)
    assert ours.completed == rr.completed == len(arrivals)
    assert list(ours.spread) == ["node-0", "node-1"]
    assert all(len(gpus) == 8 for gpus in ours.spread.values())
    assert sum(map(sum, ours.spread.values())) == ours.loads
    assert ours.loads <= rr.loads
