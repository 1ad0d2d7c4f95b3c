"""Real-GPU checks; skipped (with the reason) on machines without CUDA."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

from gpufaas.shared.catalog import resolve_model_dir
from gpufaas.shared.devices import parse_devices
from gpufaas.shared.messages import ModelSource
from gpufaas.worker.models.bert import BertConfig, BertEmbedder, load_tokenizer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine"),
]


def test_probe_finds_the_gpus() -> None:
    devices = parse_devices("auto")
    assert devices.backend == "cuda"
    assert [d.name for d in devices.devices][1:] == [
        f"gpu:{i}" for i in range(torch.cuda.device_count())
    ]


def test_bert_on_cuda_matches_cpu() -> None:
    d = resolve_model_dir(ModelSource(builtin="all-minilm-l6-v2"))
    cfg = BertConfig.from_model_dir(d)
    tok = load_tokenizer(d, cfg.max_seq_length)
    cpu_w = safetensors.torch.load_file(d / "model.safetensors")
    gpu_w = {k: v.to("cuda:0") for k, v in cpu_w.items()}
    texts = ["a GPU test", "another sentence, somewhat longer than the first one"]
    cpu = BertEmbedder(cpu_w, cfg, tok).embed(texts)
    gpu = BertEmbedder(gpu_w, cfg, tok).embed(texts)
    assert (cpu - gpu).abs().max().item() <= 1e-4


def test_a_segment_is_shared_with_another_process_through_its_ipc_handle() -> None:
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    from gpufaas.shared.cuda_ipc import CudaSegment  # noqa: PLC0415

    data = torch.arange(1024, dtype=torch.float32)
    seg = CudaSegment(0, data.numel() * 4)
    seg.write(0, memoryview(data.numpy().tobytes()))
    child = (
        "import sys, torch\n"
        "from gpufaas.shared.cuda_ipc import open_segment\n"
        "raw = open_segment(bytes.fromhex(sys.argv[1]), 4096, 0)\n"
        "print(float(raw.view(torch.float32).sum()))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", child, seg.handle.hex()],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert float(out.stdout) == float(data.sum())
    seg.free()
