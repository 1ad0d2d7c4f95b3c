"""The wire formats side by side, in one run on one platform.

Starts ``gpufaas up --demo --devices cpu`` on free ports and sends the same MiniLM call
(``minilm``, a batch of texts) in three forms, interleaved request by request so that drift
hits them alike:

  - JSON over HTTP (``POST /v2/models/minilm/infer``),
  - binary tensors over HTTP (``Inference-Header-Content-Length``; the embedding comes
    back as raw float32),
  - gRPC ``ModelInfer`` with ``raw_input_contents``/``raw_output_contents``.

The model in this process is the floor. It prints the p50 and p99 of each, at each batch
size, and the ratio of each to JSON. Then it deploys a ``torch.export`` program that sums a
large FP32 input and sends the input (64 MiB by default) in two ways:

  - in the HTTP body (binary),
  - through the system shared-memory extension: the client's region is written once and
    registered, and each call names it, so the bytes cross no socket.

Every embedding is checked against the in-process one, and every sum against numpy.

Run:  .venv/bin/python bench/protocols.py [--requests 100] [--batch 1,32] [--big-mib 64]
"""

from __future__ import annotations

import argparse
import functools
import http.client
import json
import os
import shutil
import signal
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _platform as harness
import grpc
import numpy as np
import torch
from invoke_overhead import Stats, load_embedder, texts_for

from gpufaas.gateway.proto import grpc_service_pb2 as pb
from gpufaas.gateway.proto import grpc_service_pb2_grpc as pb_grpc

FUNCTION = "minilm"
BIG = "vsum"
HEADER = "Inference-Header-Content-Length"
MAX_ABS_DIFF = 1e-5


def bytes_tensor(texts: list[str]) -> bytes:
    """``BYTES`` elements as the binary extension carries them (4-byte LE length each)."""
    return b"".join(struct.pack("<I", len(t.encode())) + t.encode() for t in texts)


class Http:
    """One keep-alive connection to the gateway."""

    def __init__(self, port: int, headers: dict[str, str]) -> None:
        self.conn = http.client.HTTPConnection(harness.HOST, port, timeout=120)
        self.headers = headers

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[bytes, Any]:
        self.conn.request("POST", path, body=body, headers={**self.headers, **headers})
        resp = self.conn.getresponse()
        raw = resp.read()
        if resp.status not in (200, 201):
            raise RuntimeError(f"{path} returned HTTP {resp.status}: {raw[:300]!r}")
        return raw, resp.headers

    def json_embed(self, texts: list[str]) -> np.ndarray:
        body = {
            "inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]
        }
        raw, _ = self.post(
            f"/v2/models/{FUNCTION}/infer",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
        out = json.loads(raw)["outputs"][0]
        return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])

    def binary_infer(self, model: str, head: dict[str, Any], data: bytes) -> list[np.ndarray]:
        """A binary request (``head`` then ``data``); the outputs, all asked as binary."""
        header = json.dumps(head).encode()
        raw, headers = self.post(
            f"/v2/models/{model}/infer",
            header + data,
            {HEADER: str(len(header)), "Content-Type": "application/octet-stream"},
        )
        size = int(headers.get(HEADER, len(raw)))
        reply = json.loads(raw[:size])
        outs, at = [], size
        for out in reply["outputs"]:
            n = out["parameters"]["binary_data_size"] if "parameters" in out else 0
            arr = np.frombuffer(raw[at : at + n], dtype=np.float32).reshape(out["shape"])
            outs.append(arr)
            at += n
        return outs

    def binary_embed(self, texts: list[str]) -> np.ndarray:
        data = bytes_tensor(texts)
        head = {
            "inputs": [
                {
                    "name": "text",
                    "datatype": "BYTES",
                    "shape": [len(texts)],
                    "parameters": {"binary_data_size": len(data)},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
        return self.binary_infer(FUNCTION, head, data)[0]


class Grpc:
    """A blocking channel to the gateway's gRPC port, with the API key as metadata."""

    def __init__(self, port: int, key: str | None) -> None:
        self.channel = grpc.insecure_channel(f"{harness.HOST}:{port}")
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
        self.metadata: tuple[tuple[str, str | bytes], ...] = (
            (("authorization", f"Bearer {key}"),) if key else ()
        )

    def embed(self, texts: list[str]) -> np.ndarray:
        req = pb.ModelInferRequest(
            model_name=FUNCTION,
            inputs=[
                pb.ModelInferRequest.InferInputTensor(
                    name="text", datatype="BYTES", shape=[len(texts)]
                )
            ],
            raw_input_contents=[bytes_tensor(texts)],
        )
        reply = self.stub.ModelInfer(req, metadata=self.metadata, timeout=60)
        out = reply.outputs[0]
        return np.frombuffer(reply.raw_output_contents[0], dtype=np.float32).reshape(
            list(out.shape)
        )

    def close(self) -> None:
        self.channel.close()


def timed(calls: dict[str, Callable[[], Any]], requests: int) -> dict[str, Stats]:
    """Each call ``requests`` times, interleaved, the order rotating each round."""
    names = list(calls)
    seconds: dict[str, list[float]] = {n: [] for n in names}
    for i in range(requests):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            t0 = time.perf_counter()
            calls[name]()
            seconds[name].append(time.perf_counter() - t0)
    return {n: Stats.of(s) for n, s in seconds.items()}


def print_table(title: str, stats: dict[str, Stats], base: str) -> None:
    print(f"\n{title}")
    print(f"  {'':<30}{'p50 ms':>9}{'p99 ms':>9}   p50 against the first")
    for name, s in stats.items():
        print(
            f"  {name:<30}{s.p50_ms:>9.2f}{s.p99_ms:>9.2f}{s.p50_ms / stats[base].p50_ms:>15.2f}x"
        )


def wire_formats(up: harness.Platform, args: argparse.Namespace) -> None:
    emb = load_embedder()
    web, rpc = Http(up.http_port, up.headers), Grpc(up.grpc_port, up.api_key)
    try:
        for batch in args.batches:
            texts = texts_for(batch)
            want = emb.embed(texts).numpy()
            for name, got in (
                ("json", web.json_embed(texts)),
                ("binary", web.binary_embed(texts)),
                ("grpc", rpc.embed(texts)),
            ):
                diff = float(np.abs(got - want).max())
                if diff > MAX_ABS_DIFF:
                    raise RuntimeError(f"{name} at batch {batch} differs by {diff:.3g}")
            calls: dict[str, Callable[[], Any]] = {
                "JSON over HTTP": functools.partial(web.json_embed, texts),
                "binary tensors over HTTP": functools.partial(web.binary_embed, texts),
                "gRPC, raw contents": functools.partial(rpc.embed, texts),
                "in-process model": functools.partial(emb.embed, texts),
            }
            timed(calls, args.warmup)
            stats = timed(calls, args.requests)
            print_table(f"batch {batch}: {args.requests} requests each", stats, "JSON over HTTP")
    finally:
        rpc.close()
        web.conn.close()


class VSum(torch.nn.Module):
    """``s = (x * scale).sum(dim=1)``: a large input, a tiny output."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.scale).sum(dim=1, keepdim=True)


def export_vsum(root: Path, width: int) -> Path:
    out = root / "vsum"
    out.mkdir()
    ep = torch.export.export(VSum(), (torch.ones(1, width),))
    torch.export.save(ep, out / "model.pt2")
    return out


def deploy(web: Http, model_dir: Path) -> None:
    body = {"name": BIG, "model": {"path": str(model_dir), "architecture": "torch-export"}}
    web.post("/v1/functions", json.dumps(body).encode(), {"Content-Type": "application/json"})


def big_input(up: harness.Platform, model_dir: Path, args: argparse.Namespace) -> None:
    width = args.big_mib * 1024 * 1024 // 4
    x = np.random.default_rng(0).standard_normal((1, width), dtype=np.float32)
    want = float(x.sum(dtype=np.float64))
    web = Http(up.http_port, up.headers)
    key = f"gpufaas-bench-{os.getpid()}"
    shm = Path("/dev/shm") / key
    try:
        deploy(web, model_dir)
        shm.write_bytes(x.tobytes())
        region = {"key": key, "offset": 0, "byte_size": x.nbytes}
        web.post(
            "/v2/systemsharedmemory/region/bench/register",
            json.dumps(region).encode(),
            {"Content-Type": "application/json"},
        )

        def in_body() -> float:
            data = x.tobytes()
            head = {
                "inputs": [
                    {
                        "name": "x",
                        "datatype": "FP32",
                        "shape": [1, width],
                        "parameters": {"binary_data_size": len(data)},
                    }
                ],
                "parameters": {"binary_data_output": True},
            }
            return float(web.binary_infer(BIG, head, data)[0][0, 0])

        def in_shm() -> float:
            params = {"shared_memory_region": "bench", "shared_memory_byte_size": x.nbytes}
            head = {
                "inputs": [
                    {"name": "x", "datatype": "FP32", "shape": [1, width], "parameters": params}
                ],
                "parameters": {"binary_data_output": True},
            }
            return float(web.binary_infer(BIG, head, b"")[0][0, 0])

        for name, call in (("body", in_body), ("shm", in_shm)):
            got = call()
            if abs(got - want) > 1e-3 * max(1.0, abs(want)):
                raise RuntimeError(f"{name}: sum {got} != {want}")
        stats = timed(
            {"HTTP body (binary)": in_body, "system shared memory": in_shm}, args.big_requests
        )
        print_table(
            f"a {args.big_mib} MiB FP32 input: {args.big_requests} requests each",
            stats,
            "HTTP body (binary)",
        )
    finally:
        shm.unlink(missing_ok=True)
        web.conn.close()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=100, help="timed requests per form and batch")
    ap.add_argument("--warmup", type=int, default=10, help="untimed requests per form and batch")
    ap.add_argument("--batch", default="1,32", help="comma-separated batch sizes")
    ap.add_argument("--big-mib", type=int, default=64, help="MiB of the large input (0: skip)")
    ap.add_argument("--big-requests", type=int, default=20, help="timed requests with it")
    ap.add_argument("--ready-timeout", type=float, default=180.0, help="seconds to wait for up")
    args = ap.parse_args(argv)
    args.batches = [int(b) for b in args.batch.split(",") if b.strip()]
    if not args.batches or min(args.batches) < 1 or args.requests < 1 or args.big_mib < 0:
        ap.error("batch sizes and --requests must be positive, --big-mib 0 or more")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads_env = harness.with_worker_threads()  # the in-process row computes as workers do
    signal.signal(signal.SIGTERM, harness.terminate)
    m = harness.machine(
        "CPU (no GPU)", extra={"torch_threads": torch.get_num_threads(), **threads_env}
    )
    harness.print_machine(m)
    root = Path(tempfile.mkdtemp(prefix="gpufaas-bench-"))
    model_dir = export_vsum(root, args.big_mib * 1024 * 1024 // 4) if args.big_mib else root
    env = {
        "GPUFAAS_MODEL_ROOTS": str(root),
        "GPUFAAS_MAX_BODY_BYTES": str((args.big_mib + 16) * 1024 * 1024),
    }
    up: harness.Platform | None = None
    try:
        up = harness.Platform.start(root / "data", "--demo", "--devices", "cpu", env=env)
        plat = up
        ready = plat.wait_ready(
            args.ready_timeout,
            lambda port: (
                harness.http_status(port, f"/v2/models/{FUNCTION}/ready", plat.headers) == 200
            ),
        )
        print(f"platform: gpufaas up --demo --devices cpu, ready in {ready:.1f} s")
        wire_formats(up, args)
        if args.big_mib:
            big_input(up, model_dir, args)
    finally:
        if up is not None:
            harness.stop(up)
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
