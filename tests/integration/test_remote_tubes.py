"""A gateway that shares no shared memory with a node (``gateway_local_shm`` off, as on
Kubernetes): big inputs go through the object tier and big outputs are fetched from the
node that holds them; nothing is left behind (real NATS, the real demo model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch

from gpufaas.gateway import remote_tubes
from gpufaas.shared.catalog import resolve_model_dir
from gpufaas.shared.config import Config
from gpufaas.shared.constants import TUBES_OBJECT_BUCKET
from gpufaas.shared.errors import NotFound
from gpufaas.shared.messages import ModelSource, Tube
from gpufaas.shared.objects import stat_object
from gpufaas.worker.models.bert import BertConfig, BertEmbedder, load_tokenizer
from tests.conftest import NatsServer
from tests.integration.conftest import DEMO_BODY, Platform, make_config, text_request

pytestmark = pytest.mark.integration

TEXTS = [f"sentence number {i} about serverless inference on GPUs" for i in range(40)]


@pytest.fixture
def platform_config(nats_server: NatsServer, tmp_path: Path) -> Config:
    # Tubes both ways: 40 sentences (~2 KiB) in, 40 x 384 floats (60 KiB) out.
    return make_config(nats_server, tmp_path).replace(
        gateway_local_shm=False, inline_threshold=1024
    )


def embed(texts: list[str]) -> np.ndarray:
    d = resolve_model_dir(ModelSource(builtin="all-minilm-l6-v2"))
    cfg = BertConfig.from_model_dir(d)
    weights = safetensors.torch.load_file(d / "model.safetensors")
    return BertEmbedder(weights, cfg, load_tokenizer(d, cfg.max_seq_length)).embed(texts).numpy()


async def test_big_tensors_cross_without_shared_memory(
    platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = platform.client
    assert (await c.post("/v1/functions", json=DEMO_BODY)).status == 201
    written: list[Tube] = []
    write_input = remote_tubes.write_input

    async def spy(*args: Any) -> Tube:
        tube = await write_input(*args)
        written.append(tube)
        return tube

    monkeypatch.setattr(remote_tubes, "write_input", spy)
    resp = await c.post("/v2/models/minilm/infer", json=text_request(TEXTS))
    assert resp.status == 200, await resp.text()
    body: dict[str, Any] = await resp.json()
    got = np.asarray(body["outputs"][0]["data"], dtype=np.float32).reshape(len(TEXTS), -1)
    assert np.abs(got - embed(TEXTS)).max() <= 1e-5
    (tube,) = written  # the input went to the object tier, not to this machine's shm
    assert [p.tier for p in tube.placements] == ["object"]
    # The request's tubes (the input's object, both records) are dropped.
    kv = platform.services["scheduler"].kv
    assert tube.id in await kv.tubes.keys()  # its record was there (a delete marker now)
    assert [await kv.tubes.value(k) for k in await kv.tubes.keys()] == [None, None]
    with pytest.raises(NotFound):
        await stat_object(platform.services["scheduler"].js, TUBES_OBJECT_BUCKET, tube.id)
