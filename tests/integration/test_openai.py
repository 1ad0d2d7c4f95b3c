"""The OpenAI-compatible embeddings endpoint driven by the official ``openai`` SDK, and the
model repository extension over plain HTTP, against the in-process platform and the real
MiniLM demo."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import openai
import pytest
import safetensors.torch
import torch

from gpufaas.shared.catalog import resolve_model_dir
from gpufaas.shared.messages import ModelSource
from gpufaas.worker.models.bert import BertConfig, BertEmbedder, load_tokenizer
from tests.integration.conftest import DEMO_BODY, Platform, bearer, text_request

pytestmark = pytest.mark.integration

LONG = " ".join(f"Sentence {i} is about rivers, hills and weather." for i in range(60))
TEXTS = ["The cat sits on the mat.", "Ünïcödé café 日本語 🙂", "", LONG]


@pytest.fixture(scope="module")
def minilm() -> tuple[BertEmbedder, Any]:
    d = resolve_model_dir(ModelSource(builtin="all-minilm-l6-v2"))
    cfg = BertConfig.from_model_dir(d)
    tokenizer = load_tokenizer(d, cfg.max_seq_length)
    weights = safetensors.torch.load_file(d / "model.safetensors")
    return BertEmbedder(weights, cfg, tokenizer), tokenizer


def tokens_of(tokenizer: Any, texts: list[str]) -> int:
    """Tokens the worker's own tokenizer feeds the model (padding left out)."""
    return sum(sum(e.attention_mask) for e in tokenizer.encode_batch(texts))


def url_of(p: Platform) -> str:
    return str(p.client.make_url("")).rstrip("/")


@pytest.fixture
async def sdk(platform: Platform) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=f"{url_of(platform)}/v1", api_key=platform.api_key, max_retries=0
    ) as client:
        yield client


class Doubler(torch.nn.Module):
    """Not an embedding function: FP32 [N, 4] in, FP32 [N, 4] out."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"y": x * 2}


@pytest.fixture(scope="module")
def doubler_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("doubler")
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(Doubler(), (torch.randn(3, 4),), dynamic_shapes=({0: batch},))
    torch.export.save(ep, out / "model.pt2")
    return out


async def test_sdk_embeddings_match_the_reference(
    platform: Platform, sdk: openai.AsyncOpenAI, minilm: tuple[BertEmbedder, Any]
) -> None:
    embedder, tokenizer = minilm
    assert (await platform.client.post("/v1/functions", json=DEMO_BODY)).status == 201
    reference = embedder.embed(TEXTS).numpy()

    floats = await sdk.embeddings.create(model="minilm", input=TEXTS, encoding_format="float")
    assert floats.object == "list"
    assert floats.model == "minilm"
    assert [d.index for d in floats.data] == [0, 1, 2, 3]
    got = np.asarray([d.embedding for d in floats.data], dtype=np.float32)
    assert got.shape == (4, 384)
    assert np.abs(got - reference).max() <= 1e-5
    # The long text is cut at max_seq_length (256) as the model reads it.
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == tokens_of(tokenizer, TEXTS)
    assert tokens_of(tokenizer, [LONG]) == 256

    # The SDK's default asks for base64 and decodes it: the same float32 values, bit for bit.
    default = await sdk.embeddings.create(model="minilm", input=TEXTS)
    assert np.array_equal(np.asarray([d.embedding for d in default.data], np.float32), got)

    # One text alone (no padding in its batch): its float and base64 replies agree.
    single = await sdk.embeddings.create(model="minilm", input=TEXTS[0], encoding_format="float")
    assert np.abs(np.asarray(single.data[0].embedding) - reference[0]).max() <= 1e-5
    raw = await sdk.embeddings.with_raw_response.create(
        model="minilm", input="The cat sits on the mat.", encoding_format="base64"
    )
    assert raw.headers["X-Request-ID"]
    body = raw.http_response.json()
    (row,) = body["data"]
    decoded = np.frombuffer(base64.b64decode(row["embedding"]), dtype="<f4")
    assert np.array_equal(decoded, np.asarray(single.data[0].embedding, np.float32))
    assert body["usage"] == {
        "prompt_tokens": tokens_of(tokenizer, TEXTS[:1]),
        "total_tokens": tokens_of(tokenizer, TEXTS[:1]),
    }


async def test_sdk_errors_in_openai_shape(
    platform: Platform, sdk: openai.AsyncOpenAI, doubler_dir: Path
) -> None:
    c = platform.client
    assert (
        await c.post("/v1/functions", json={**DEMO_BODY, "options": {"max_rows": 2}})
    ).status == 201
    path_body = {
        "name": "doubler",
        "model": {"path": str(doubler_dir), "architecture": "torch-export"},
    }
    assert (await c.post("/v1/functions", json=path_body)).status == 201

    with pytest.raises(openai.NotFoundError) as missing:
        await sdk.embeddings.create(model="nope", input="x")
    assert missing.value.body == {
        "message": "model 'nope' not found",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }
    assert missing.value.response.headers["X-Request-ID"]

    with pytest.raises(openai.BadRequestError) as other:
        await sdk.embeddings.create(model="doubler", input="x")
    assert "not an embedding function" in other.value.message
    assert other.value.param == "model"

    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"input": ["a", "b", "c"]}, 413, "input"),  # over max_rows
        ({"input": "x", "dimensions": 128}, 400, "dimensions"),
        ({"input": [101, 2023, 102]}, 400, "input"),  # token ids
        ({"input": []}, 400, "input"),
    ]
    for args, status, param in cases:
        with pytest.raises(openai.APIStatusError) as err:
            await sdk.embeddings.create(model="minilm", **args)
        assert (err.value.status_code, err.value.param) == (status, param), args
    # The model's own width is accepted.
    ok = await sdk.embeddings.create(model="minilm", input="x", dimensions=384)
    assert len(ok.data[0].embedding) == 384

    # Another tenant's key does not see this tenant's function.
    key = await platform.key_for("other")
    async with openai.AsyncOpenAI(
        base_url=f"{url_of(platform)}/v1", api_key=key, max_retries=0
    ) as theirs:
        with pytest.raises(openai.NotFoundError):
            await theirs.embeddings.create(model="minilm", input="x")
    async with openai.AsyncOpenAI(
        base_url=f"{url_of(platform)}/v1", api_key="not-a-key", max_retries=0
    ) as wrong:
        with pytest.raises(openai.AuthenticationError) as denied:
            await wrong.embeddings.create(model="minilm", input="x")
    assert denied.value.body["code"] == "invalid_api_key"  # type: ignore[index]
    async with aiohttp.ClientSession() as anon:
        resp = await anon.post(
            f"{url_of(platform)}/v1/embeddings", json={"model": "minilm", "input": "x"}
        )
        assert resp.status == 401
        assert (await resp.json())["error"]["param"] == "Authorization"
        resp = await anon.get(f"{url_of(platform)}/v1/embeddings", headers=bearer(platform.api_key))
        assert resp.status == 405
        assert resp.headers["Allow"] == "POST"
        assert (await resp.json())["error"]["type"] == "invalid_request_error"


async def index_of(p: Platform, body: Any = None) -> dict[str, dict[str, Any]]:
    resp = await p.client.post("/v2/repository/index", json=body)
    assert resp.status == 200, await resp.text()
    return {e["name"]: e for e in await resp.json()}


async def test_repository_load_and_unload_scale_the_function(platform: Platform) -> None:
    c = platform.client
    meta = await (await c.get("/v2")).json()
    assert "model_repository" in meta["extensions"]
    assert await index_of(platform) == {}
    assert (await c.post("/v1/functions", json=DEMO_BODY)).status == 201
    # tritonclient sends an empty body.
    assert await index_of(platform) == {
        "minilm": {"name": "minilm", "version": "1", "state": "READY", "reason": ""}
    }
    worker = platform.services["worker"]
    scheduler = platform.services["scheduler"]

    resp = await c.post("/v2/repository/models/minilm/unload", data=b"")
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["state"] == "UNAVAILABLE"
    entry = (await index_of(platform, {"ready": False}))["minilm"]
    assert entry["state"] == "UNAVAILABLE"
    assert "scaled to zero" in entry["reason"]
    assert await index_of(platform, {"ready": True}) == {}
    # The autoscaler does not bring it back, and the drained instance goes.
    t = time.time() + 1
    for step in range(3):
        await scheduler.autoscale_once(t + step)  # type: ignore[attr-defined]
    assert ("default", "minilm") not in worker.instances  # type: ignore[attr-defined]
    assert (await index_of(platform))["minilm"]["state"] == "UNAVAILABLE"
    listed = await (await c.get("/v1/functions/minilm")).json()
    assert listed["nodes"] == []  # still deployed

    resp = await c.post("/v2/repository/models/minilm/load", json={"parameters": {"config": "{}"}})
    assert resp.status == 400
    assert (await resp.json())["field"] == "parameters.config"
    resp = await c.post("/v2/repository/models/minilm/load")
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["state"] == "READY"
    assert ("default", "minilm") in worker.instances  # type: ignore[attr-defined]
    for step in range(3):
        await scheduler.autoscale_once(time.time() + step)  # type: ignore[attr-defined]
    assert (await index_of(platform))["minilm"]["state"] == "READY"
    # Loading a loaded model changes nothing; unloaded, a request still cold-starts it.
    assert (await c.post("/v2/repository/models/minilm/load")).status == 200
    assert (await c.post("/v2/repository/models/minilm/unload")).status == 200
    resp = await c.post("/v2/models/minilm/infer", json=text_request(["still callable"]))
    assert resp.status == 200, await resp.text()

    missing = await c.post("/v2/repository/models/nope/load")
    assert missing.status == 404
    other = await platform.key_for("other")
    resp = await c.post("/v2/repository/index", headers=bearer(other))
    assert await resp.json() == []
    resp = await c.post("/v2/repository/models/minilm/unload", headers=bearer(other))
    assert resp.status == 404


async def test_tritonclient_drives_the_repository(platform: Platform) -> None:
    """The official client's calls (empty bodies, its own paths) work unmodified."""
    import tritonclient.http as httpclient  # noqa: PLC0415  (only this test needs it)

    assert (await platform.client.post("/v1/functions", json=DEMO_BODY)).status == 201
    host = str(platform.client.make_url("")).removeprefix("http://").rstrip("/")
    auth = bearer(platform.api_key)

    def drive() -> list[list[dict[str, Any]]]:
        client = httpclient.InferenceServerClient(host)
        try:
            seen = [client.get_model_repository_index(headers=auth)]
            client.unload_model("minilm", headers=auth)
            seen.append(client.get_model_repository_index(headers=auth))
            client.load_model("minilm", headers=auth)
            seen.append(client.get_model_repository_index(headers=auth))
            return seen
        finally:
            client.close()

    states = [[e["state"] for e in index] for index in await asyncio.to_thread(drive)]
    assert states == [["READY"], ["UNAVAILABLE"], ["READY"]]
