"""The pool's processes: what the manager imports, how a spare dies with it, what a spare
warms up before it is bound."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from gpufaas.shared.catalog import DEMO_MODEL, resolve_model_dir
from gpufaas.shared.messages import ModelSource
from gpufaas.worker.models.bert import BertConfig, warm_up
from gpufaas.worker.runners import shared_tokenizer, warm_up_bert

pytestmark = pytest.mark.unit

POOL_IMPORTS = """
import sys
from gpufaas.shared.config import Config
from gpufaas.worker.__main__ import service_for
pool = service_for(Config(worker_role="pool", devices="cpu"))
assert type(pool).__name__ == "WorkerPoolService", type(pool)
print(sorted(m for m in ("torch", "numpy", "tokenizers") if m in sys.modules))
"""


def test_the_pool_manager_never_imports_torch() -> None:
    out = subprocess.run(
        [sys.executable, "-c", POOL_IMPORTS], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_a_process_whose_pool_is_gone_exits_at_once() -> None:
    """``--parent-pid`` names another process than its parent (the pool died before the
    child asked for its death signal): it exits before importing anything heavy."""
    not_parent = 1 if os.getpid() != 1 else 2
    t0 = time.monotonic()
    out = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            "-m",
            "gpufaas.worker",
            "--parent-pid",
            str(not_parent),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 1, out.stderr[-2000:]
    assert "| torch" not in out.stderr  # importtime lists every module imported
    assert time.monotonic() - t0 < 30


def test_a_spare_warms_the_builtin_tokenizer_for_the_instances_it_builds_later() -> None:
    model_dir = resolve_model_dir(ModelSource(builtin=DEMO_MODEL))
    took = warm_up_bert([model_dir])
    assert took["forward_us"] > 0
    config = BertConfig.from_model_dir(model_dir)
    t0 = time.perf_counter()
    tokenizer = shared_tokenizer(model_dir, config.max_seq_length)  # what a build asks for
    assert time.perf_counter() - t0 < 0.005  # parsed already, not again (~18 ms)
    assert tokenizer is shared_tokenizer(model_dir, config.max_seq_length)


def test_the_warm_up_forward_needs_no_model_weights() -> None:
    """Random weights of the model's widths, one layer and a small vocabulary: a model
    with a 30k vocabulary and six layers warms with a fraction of its parameters."""
    config = BertConfig(
        vocab_size=30522,
        hidden_size=64,
        num_layers=6,
        num_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        type_vocab_size=2,
        layer_norm_eps=1e-12,
        max_seq_length=32,
    )
    grad = torch.is_grad_enabled()
    warm_up(config)  # 2.4 M parameters in full, and no weights file anywhere
    assert torch.is_grad_enabled() == grad
