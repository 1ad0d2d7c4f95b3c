"""Per-GPU placement on real GPUs: a worker lane computes on the CUDA device its placement
names (never the first GPU by position), and on a node with two GPUs `gpufaas up` puts a
second model's function on the second GPU, where it answers like the CPU.

Skipped, with the reason, without CUDA (or, for the second, with one GPU only).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gpufaas.launch import Up
from gpufaas.shared.config import Config
from gpufaas.worker.service import WorkerService
from tests.e2e.test_up import http

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine"),
]

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0


def _current_device() -> int:
    return int(torch.cuda.current_device())


async def test_each_lane_computes_on_the_cuda_device_its_gpu_names(tmp_path: Path) -> None:
    shm = tmp_path / "shm"
    shm.mkdir(mode=0o700)
    worker = WorkerService(Config(devices="auto", shm_dir=shm, data_dir=tmp_path / "data"))
    try:
        for index in range(GPUS):
            lane = await worker.lanes.lane(f"gpu:{index}")
            assert lane.cuda_index == index
            # Every thread of the lane has its GPU current: work that names no device
            # lands there, and a tensor made on the lane is on it.
            assert lane.executor.submit(_current_device).result() == index
            made = lane.executor.submit(lambda: torch.zeros(1, device="cuda")).result()
            assert made.device == torch.device("cuda", index)
    finally:
        await worker.lanes.shutdown()


class Scorer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query = torch.nn.Parameter(torch.linspace(-1, 1, 384))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"scores": x @ self.query}


@pytest.mark.slow
@pytest.mark.skipif(GPUS < 2, reason=f"needs 2 CUDA GPUs (per-GPU placement); found {GPUS}")
def test_a_second_model_goes_to_the_second_gpu_and_answers_there(tmp_path: Path) -> None:
    model = tmp_path / "scorer"
    model.mkdir()
    batch = torch.export.Dim("batch", min=1, max=1024)
    ep = torch.export.export(Scorer(), (torch.randn(3, 384),), dynamic_shapes=({0: batch},))
    torch.export.save(ep, model / "model.pt2")
    roots = {"GPUFAAS_MODEL_ROOTS": str(tmp_path)}  # the scorer is a server path
    up = Up.start(tmp_path / "data", "--demo", "--devices", "auto", env=roots)
    try:
        up.wait_ready(300)
        body = {"name": "scorer", "model": {"path": str(model), "architecture": "torch-export"}}
        status, reply = http(up, f"{up.url}/v1/functions", body)
        assert status == 201, reply
        assert reply["gpus"] != {}, reply
        ((gpu,),) = reply["gpus"].values()
        assert gpu != "gpu:0"  # the demo's GPU holds one instance already: the idle one
        x = torch.randn(4, 384)
        req = {
            "inputs": [
                {"name": "x", "datatype": "FP32", "shape": [4, 384], "data": x.flatten().tolist()}
            ]
        }
        status, reply = http(up, f"{up.url}/v2/models/scorer/infer", req)
        assert status == 200, reply
        assert reply["parameters"]["device"] == gpu, json.dumps(reply)[:300]
        got = torch.tensor(reply["outputs"][0]["data"])
        assert (got - Scorer()(x)["scores"].detach()).abs().max().item() <= 1e-3
        node = http(up, f"{up.url}/v1/nodes")[1]["nodes"][0]
        assert node["tensor_store"][gpu]["bytes_stored"] > 0  # its one copy, on its GPU
    finally:
        assert up.stop() == 0
