"""``bench/workflow_overhead.py`` with tiny settings against ``gpufaas up --nodes 2``: the
small intermediate goes inline at no transfer cost, across nodes as on one, and a 1 MiB
one is a tube on the GPU tier, handed over on one node and across. The figures are the
bench's."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.benches import run_bench


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(400)  # up with two nodes, five deploys: about a minute on a 2-core box
def test_bench_measures_the_workflow_and_hand_offs_by_size(tmp_path: Path) -> None:
    args = ["--requests", "2", "--warmup", "1", "--handoffs", "1", "--sizes", "3k,1m"]
    stdout, doc = run_bench("workflow_overhead.py", args, tmp_path / "workflow.json")
    assert "the goal's" in stdout
    es = doc["embed_score"]
    assert es["output_tiers"] == ["inline"]
    assert es["nodes"] == {"embed": "node-0", "score": "node-1"}  # across nodes, inline
    assert es["step_transfer_ms"]["embed"] < 1.0  # was 3-4.5 ms: a tube written and adopted
    modes = {(h["size"], h["placement"]): h["mode"] for h in doc["handoffs"]}
    # 1 MiB: a tube on the producer's GPU tier (whichever GPU placement chose for it).
    gpu = {k: m for k, m in modes.items() if m.startswith("gpu:")}
    assert modes == {
        (3 << 10, "same node"): "inline",
        (3 << 10, "across nodes"): "inline",
        **gpu,
    }
    assert set(gpu) == {(1 << 20, "same node"), (1 << 20, "across nodes")}
