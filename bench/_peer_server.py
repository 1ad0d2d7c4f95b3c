"""The hand-written peer of ``serve_peers.py``: aiohttp + torch serving MiniLM, no batching.

What a careful engineer writes without a serving framework: one aiohttp process, the model
loaded once, each request's texts embedded in a one-thread executor (``run_in_executor``,
so the event loop keeps accepting), the reply as Open Inference Protocol JSON. Started by
``serve_peers.py`` as a child with the platform worker's OpenMP and thread environment.

  python bench/_peer_server.py serve --port P        # POST /v2/models/minilm/infer
  python bench/_peer_server.py ceiling --batch 1,16,64 --seconds S   # one JSON line

``ceiling`` is the in-process batch ceiling: the same model in this process (hence under the
same environment), whole batches back to back, embeddings per second.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
import torch
from aiohttp import web
from invoke_overhead import SENTENCES, load_embedder

from gpufaas.worker.models.bert import BertEmbedder

MODEL = "minilm"
MAX_BATCH = 1024  # texts in one request; more is a 400
EMBEDDER: web.AppKey[BertEmbedder] = web.AppKey("embedder", BertEmbedder)
EXECUTOR: web.AppKey[ThreadPoolExecutor] = web.AppKey("executor", ThreadPoolExecutor)


def bad(message: str) -> web.HTTPBadRequest:
    """A 400 whose JSON body names the field at fault."""
    return web.HTTPBadRequest(
        text=orjson.dumps({"error": message}).decode(), content_type="application/json"
    )


def texts_of(doc: object) -> list[str]:
    """The texts of an infer request: one BYTES input ``text`` of shape [N]."""
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        raise bad("inputs: expected a list of input tensors")
    inputs = doc["inputs"]
    if len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise bad("inputs: expected exactly one input, 'text'")
    inp = inputs[0]
    if inp.get("name") != "text":
        raise bad(f"inputs[0].name: expected 'text', got {inp.get('name')!r}")
    if inp.get("datatype") != "BYTES":
        raise bad(f"inputs[0].datatype: expected 'BYTES', got {inp.get('datatype')!r}")
    data = inp.get("data")
    if not isinstance(data, list) or not all(isinstance(t, str) for t in data):
        raise bad("inputs[0].data: expected a list of strings")
    if not 1 <= len(data) <= MAX_BATCH:
        raise bad(f"inputs[0].data: expected 1 to {MAX_BATCH} texts, got {len(data)}")
    if inp.get("shape") != [len(data)]:
        raise bad(f"inputs[0].shape: expected [{len(data)}] for {len(data)} texts")
    return data


async def infer(request: web.Request) -> web.Response:
    """``POST /v2/models/minilm/infer``: the embeddings, FP32 [N, 384]."""
    try:
        doc = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise bad(f"body: not JSON ({exc})") from None
    texts = texts_of(doc)
    emb = request.app[EMBEDDER]
    loop = asyncio.get_running_loop()
    out = await loop.run_in_executor(request.app[EXECUTOR], emb.embed, texts)
    reply = {
        "model_name": MODEL,
        "outputs": [
            {
                "name": "embedding",
                "datatype": "FP32",
                "shape": list(out.shape),
                "data": out.flatten().tolist(),
            }
        ],
    }
    return web.Response(body=orjson.dumps(reply), content_type="application/json")


async def ready(request: web.Request) -> web.Response:
    """``GET /v2/health/ready``: 200 once serving, with this process's torch threads."""
    settings = {"torch_threads": torch.get_num_threads()}
    return web.Response(body=orjson.dumps(settings), content_type="application/json")


def create_app(emb: BertEmbedder) -> web.Application:
    """The peer's app over a loaded model; its executor is shut down with the app."""
    app = web.Application()
    app[EMBEDDER] = emb

    async def executor_ctx(app: web.Application) -> AsyncIterator[None]:
        app[EXECUTOR] = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch")
        yield
        app[EXECUTOR].shutdown(wait=True, cancel_futures=True)

    app.cleanup_ctx.append(executor_ctx)
    app.router.add_post(f"/v2/models/{MODEL}/infer", infer)
    app.router.add_get("/v2/health/ready", ready)
    return app


def ceiling(emb: BertEmbedder, batches: list[int], seconds: float) -> dict[str, Any]:
    """Embeddings per second of whole batches back to back, per batch size."""
    out: dict[str, Any] = {"torch_threads": torch.get_num_threads(), "batches": {}}
    for b in batches:
        texts = [SENTENCES[i % len(SENTENCES)] for i in range(b)]
        emb.embed(texts)  # warm: the allocator's buffers for this shape
        calls, t0 = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < seconds:
            emb.embed(texts)
            calls += 1
        out["batches"][str(b)] = {
            "calls": calls,
            "seconds": elapsed,
            "emb_per_s": calls * b / elapsed,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--torch-threads", type=int, default=0, help="torch.set_num_threads (0: the default)"
    )
    sub = ap.add_subparsers(dest="mode", required=True)
    serve = sub.add_parser("serve", help="serve the model over HTTP")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, required=True)
    ceil = sub.add_parser("ceiling", help="print the in-process batch ceiling as JSON")
    ceil.add_argument("--batch", default="16,64", help="comma-separated batch sizes")
    ceil.add_argument("--seconds", type=float, default=5.0, help="seconds per batch size")
    args = ap.parse_args(argv)
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    emb = load_embedder()
    if args.mode == "ceiling":
        batches = [int(b) for b in args.batch.split(",") if b.strip()]
        print(orjson.dumps(ceiling(emb, batches, args.seconds)).decode(), flush=True)
        return 0
    web.run_app(create_app(emb), host=args.host, port=args.port, access_log=None, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
