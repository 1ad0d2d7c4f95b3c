"""``bench/serve_peers.py`` with tiny settings: its hand-written peer answers the platform's
route with the model's embedding and names a bad field in a 400, and a whole run against
``gpufaas up`` checks every reply and writes its results. The figures are the bench's."""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from aiohttp.test_utils import TestClient, TestServer

from tests.e2e.benches import BENCH, run_bench


@pytest.fixture(scope="module")
def peer_server() -> Iterator[Any]:
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("_peer_server")
    finally:
        sys.path.remove(str(BENCH))


def infer_doc(texts: list[str]) -> dict[str, Any]:
    return {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]}


@pytest.mark.integration
async def test_peer_serves_the_model_and_names_bad_fields(peer_server: Any) -> None:
    emb = peer_server.load_embedder()
    texts = ["A man is eating food.", "It is raining in the city tonight."]
    async with TestClient(TestServer(peer_server.create_app(emb))) as client:
        resp = await client.post("/v2/models/minilm/infer", json=infer_doc(texts))
        assert resp.status == 200
        out = (await resp.json())["outputs"][0]
        assert out["name"] == "embedding"
        assert out["shape"] == [2, 384]
        got = torch.tensor(out["data"]).reshape(2, 384)
        assert float((got - emb.embed(texts)).abs().max()) <= 1e-5

        bad_shape = infer_doc(texts)
        bad_shape["inputs"][0]["shape"] = [3]
        for body, field in (
            (b"{nope", "body"),
            (json.dumps({"inputs": 1}).encode(), "inputs"),
            (json.dumps(bad_shape).encode(), "inputs[0].shape"),
            (json.dumps(infer_doc([])).encode(), "inputs[0].data"),
        ):
            resp = await client.post("/v2/models/minilm/infer", data=body)
            assert resp.status == 400, body
            assert (await resp.json())["error"].startswith(field + ":"), body


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(400)  # up, the peer, a ceiling child: about a minute on a quiet 2-core box
def test_bench_runs_both_servers_and_checks_every_reply(tmp_path: Path) -> None:
    args = ["--clients", "1,2", "--seconds", "0.5", "--warmup", "0.2", "--rounds", "1"]
    stdout, doc = run_bench("serve_peers.py", args, tmp_path / "peers.json")
    assert "plat/peer" in stdout
    assert "p99/p50 at one client" in stdout
    assert doc["settings"]["worker"]["env"].get("OMP_WAIT_POLICY")  # the worker's, passed on
    assert [row["clients"] for row in doc["summary"]] == [1, 2]
    for row in doc["summary"]:
        for server in ("peer", "platform"):
            assert row[server]["replies_checked"] > 0
            assert row[server]["max_abs_diff"] <= 1e-5
        assert row["ceiling_emb_per_s"] > 0
