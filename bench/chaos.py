"""Chaos: what callers see while each of the platform's processes is SIGKILLed in turn.

Starts ``gpufaas up --demo --devices cpu`` (the all-MiniLM-L6-v2 embedding model as
function ``minilm``) on free ports with a temporary data directory, and ``--clients``
threads that invoke ``POST /v2/models/minilm/infer`` in a loop over one keep-alive HTTP
connection each, every request with a sentence of its own from a pool whose embeddings
this process computed once in-process (``BertEmbedder``, the same weights): every 200
answer is checked against it. Then, for each process in turn (``--only``):

  before   ``--seconds-per-phase`` of load;
  kill     SIGKILL of the process: the default tenant's worker process (the pool binds
           another), the scheduler, the node's tensor store, transfer service or memory
           service, or the embedded nats-server (``gpufaas up`` restarts the last five);
  during   from the kill until 2 s after the first success of a request sent after it;
  after    ``--seconds-per-phase`` more, then a wait until the restarted process is ready
           again (its ready file names it; NATS: it accepts) before the next kill.

and prints, per process and phase, successful requests per second and the p99 latency of
the requests answered in the phase (by their answer's time), the failures by status, and
the recovery time: from the kill to the first 200 of a request sent after it. "longest"
is the longest a request answered in the ``during`` phase waited (one in flight at the
kill included). Only the machine's own figures: CPU, no GPU.

Run:  .venv/bin/python bench/chaos.py [--clients 4] [--seconds-per-phase 10]
                                      [--only worker,scheduler,tensorstore,transfer,memory,nats]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import _platform as harness
import safetensors.torch
import torch

from gpufaas.embedded import accepting
from gpufaas.shared.catalog import resolve_model_dir
from gpufaas.shared.messages import ModelSource
from gpufaas.worker.models.bert import BertConfig, BertEmbedder, load_tokenizer

FUNCTION = "minilm"
TENANT = "default"  # the admin key's tenant, which up's --demo deploys under
TARGETS = ("worker", "scheduler", "tensorstore", "transfer", "memory", "nats")
ATOL = 1e-4  # a batch merged with other requests pads differently: tiny float differences
SETTLE_S = 2.0  # the during phase lasts this long after the first success
RECOVER_TIMEOUT_S = 120.0
POLL_S = 0.05
SUBJECTS = ("A man", "The girl", "A cheetah", "The scheduler", "Someone", "A tenant")
VERBS = ("is eating", "is carrying", "is chasing", "is placing", "is reading", "deploys")
OBJECTS = ("food", "a baby", "its prey", "a function", "a book", "a model")


def sentences() -> list[str]:
    """216 distinct sentences: each client cycles through its own share of them."""
    return [f"{s} {v} {o}." for s in SUBJECTS for v in VERBS for o in OBJECTS]


def load_embedder() -> BertEmbedder:
    d = resolve_model_dir(ModelSource(builtin="all-minilm-l6-v2"))
    cfg = BertConfig.from_model_dir(d)
    weights = safetensors.torch.load_file(d / "model.safetensors")
    return BertEmbedder(weights, cfg, load_tokenizer(d, cfg.max_seq_length))


# --- load ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Shot:
    """One request: when it was sent and answered, the status (0: no HTTP answer) and
    error code, and whether a 200's embedding was the expected one."""

    sent: float
    done: float
    status: int
    code: str
    right: bool


class Load:
    """``clients`` threads invoking the demo in a loop; every answer is kept as a Shot."""

    def __init__(self, port: int, headers: dict[str, str], expected: dict[str, torch.Tensor]):
        self.port, self.headers, self.expected = port, headers, expected
        self.shots: list[Shot] = []  # appended by the clients (list.append is atomic)
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self, clients: int) -> None:
        texts = sorted(self.expected)
        for i in range(clients):
            mine = texts[i::clients]
            t = threading.Thread(target=self._client, args=(mine,), name=f"client-{i}", daemon=True)
            t.start()
            self.threads.append(t)

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join()

    def _client(self, texts: list[str]) -> None:
        conn = http.client.HTTPConnection(harness.HOST, self.port, timeout=60)
        headers = {"Content-Type": "application/json", **self.headers}
        k = 0
        while not self.stopping.is_set():
            text = texts[k % len(texts)]
            k += 1
            body = json.dumps(
                {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [text]}]}
            ).encode()
            sent = time.monotonic()
            try:
                conn.request("POST", f"/v2/models/{FUNCTION}/infer", body=body, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
            except (OSError, http.client.HTTPException):
                conn.close()  # reconnects at the next request
                self.shots.append(Shot(sent, time.monotonic(), 0, "connection", False))
                time.sleep(POLL_S)  # not a busy loop while nothing listens
                continue
            done = time.monotonic()
            self.shots.append(self._judge(text, sent, done, resp.status, raw))
        conn.close()

    def _judge(self, text: str, sent: float, done: float, status: int, raw: bytes) -> Shot:
        try:
            reply = json.loads(raw)
        except ValueError:
            return Shot(sent, done, status, "not json", False)
        if status != 200:
            return Shot(sent, done, status, str(reply.get("code", "?")), False)
        out = next((o for o in reply.get("outputs", []) if o.get("name") == "embedding"), None)
        right = out is not None and torch.allclose(
            torch.tensor(out["data"], dtype=torch.float32).reshape(-1),
            self.expected[text],
            atol=ATOL,
        )
        return Shot(sent, done, 200, "", right)

    def answered(self, t0: float, t1: float) -> list[Shot]:
        """The shots answered in [t0, t1)."""
        return [s for s in list(self.shots) if t0 <= s.done < t1]

    def first_success(self, sent_after: float) -> Shot | None:
        return next((s for s in list(self.shots) if s.sent >= sent_after and s.status == 200), None)


# --- the platform's processes ---------------------------------------------------------


def target_pids(plat: harness.Platform, target: str) -> list[int]:
    return plat.pids(f"worker:{TENANT}" if target == "worker" else target)


def child_ready(plat: harness.Platform, target: str, killed: int) -> bool:
    """Whether the killed process's replacement is serving: a new tenant worker process,
    the embedded NATS accepting, or a restarted service that wrote its ready file."""
    pids = target_pids(plat, target)
    if not pids or killed in pids:
        return False
    if target == "worker":
        return True
    if target == "nats":
        return accepting(harness.HOST, plat.nats_port)
    ready = plat.run_dir / f"{'node-0.' if target in TARGETS[2:5] else ''}{target}.ready"
    with contextlib.suppress(OSError, ValueError):
        return int(ready.read_text()) in pids
    return False


# --- one kill -----------------------------------------------------------------------


@dataclass
class Phase:
    seconds: float
    ok_per_s: float
    p99_ms: float
    failed: dict[str, int]  # "<status> <code>" -> count

    @classmethod
    def of(cls, shots: list[Shot], t0: float, t1: float) -> Phase:
        lat = [(s.done - s.sent) * 1e3 for s in shots]
        failed = Counter(f"{s.status} {s.code}" for s in shots if s.status != 200)
        ok = sum(1 for s in shots if s.status == 200)
        return cls(t1 - t0, ok / (t1 - t0), harness.percentile(lat, 99), dict(failed))


@dataclass
class KillResult:
    target: str
    pid: int
    before: Phase
    during: Phase
    after: Phase
    recovery_s: float  # kill -> first 200 of a request sent after it
    longest_s: float  # the longest wait of a request answered during
    ready_s: float  # kill -> the replacement process serving again
    wrong: int  # 200s with an unexpected embedding, any phase


def kill_one(plat: harness.Platform, load: Load, target: str, phase_s: float) -> KillResult:
    t_before = time.monotonic()
    time.sleep(phase_s)
    pids = target_pids(plat, target)
    if len(pids) != 1:
        raise RuntimeError(f"expected one {target} process, found {pids}")
    [pid] = pids
    t_kill = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    first, ready = None, None
    while first is None or ready is None:  # the first success, and the replacement serving
        first = first or load.first_success(t_kill)
        if ready is None and child_ready(plat, target, pid):
            ready = time.monotonic()
        if time.monotonic() - t_kill > RECOVER_TIMEOUT_S:
            raise RuntimeError(f"no recovery {RECOVER_TIMEOUT_S:g} s after killing {target}")
        time.sleep(POLL_S)
    t_end = first.done + SETTLE_S
    t_after = t_end + phase_s
    time.sleep(max(t_after - time.monotonic(), 0))
    during = load.answered(t_kill, t_end)
    everything = load.answered(t_before, t_after)
    return KillResult(
        target=target,
        pid=pid,
        before=Phase.of(load.answered(t_before, t_kill), t_before, t_kill),
        during=Phase.of(during, t_kill, t_end),
        after=Phase.of(load.answered(t_end, t_after), t_end, t_after),
        recovery_s=first.done - t_kill,
        longest_s=max((s.done - s.sent for s in during), default=0.0),
        ready_s=ready - t_kill,
        wrong=sum(1 for s in everything if s.status == 200 and not s.right),
    )


# --- reporting ----------------------------------------------------------------------


def failures(p: Phase) -> str:
    return ", ".join(f"{n} x {k}" for k, n in sorted(p.failed.items())) or "0"


def print_table(results: list[KillResult]) -> None:
    print(
        "\n| killed | before req/s / p99 ms | during req/s / p99 ms (s) | after req/s / p99 ms "
        "| recovery s | longest s | failed during | wrong |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        b, d, a = r.before, r.during, r.after
        print(
            f"| {r.target} | {b.ok_per_s:.1f} / {b.p99_ms:.0f} | {d.ok_per_s:.1f} / "
            f"{d.p99_ms:.0f} ({d.seconds:.1f}) | {a.ok_per_s:.1f} / {a.p99_ms:.0f} | "
            f"{r.recovery_s:.2f} | {r.longest_s:.2f} | {failures(d)} | {r.wrong} |"
        )
    outside = [
        f"{r.target}: before {failures(r.before)}, after {failures(r.after)}" for r in results
    ]
    print("failures outside the during phases: " + "; ".join(outside))
    print(
        "back (kill -> replacement serving), s: "
        + ", ".join(f"{r.target} {r.ready_s:.2f}" for r in results)
    )


# --- main ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--clients", type=int, default=4, help="client threads")
    ap.add_argument("--seconds-per-phase", type=float, default=10.0, help="before and after")
    ap.add_argument("--only", default=",".join(TARGETS), help="processes to kill, in order")
    ap.add_argument("--keep-data-dir", action="store_true", help="keep the temporary data dir")
    ap.add_argument("--json", type=Path, default=None, metavar="PATH", help="write results here")
    ap.add_argument("--ready-timeout", type=float, default=180.0, help="seconds to wait for up")
    args = ap.parse_args(argv)
    args.targets = [t.strip() for t in args.only.split(",") if t.strip()]
    unknown = sorted(set(args.targets) - set(TARGETS))
    if unknown or not args.targets:
        ap.error(f"--only: choose from {','.join(TARGETS)} (not {unknown})")
    if args.clients < 1 or args.seconds_per_phase <= 0:
        ap.error("--clients must be >= 1 and --seconds-per-phase > 0")
    return args


def run(plat: harness.Platform, args: argparse.Namespace, emb: BertEmbedder) -> list[KillResult]:
    expected = {t: emb.embed([t])[0] for t in sentences()}
    load = Load(plat.http_port, plat.headers, expected)
    load.start(args.clients)
    results = []
    try:
        for target in args.targets:
            r = kill_one(plat, load, target, args.seconds_per_phase)
            print(
                f"  {target} (pid {r.pid}): recovered in {r.recovery_s:.2f} s, back in "
                f"{r.ready_s:.2f} s, during: {failures(r.during)}",
                flush=True,
            )
            results.append(r)
    finally:
        load.stop()
    shots = load.shots
    bad = Counter(f"{s.status} {s.code}" for s in shots if s.status != 200)
    print(
        f"\n{len(shots)} requests, {sum(s.status == 200 for s in shots)} answered 200, "
        f"{sum(s.status == 200 and not s.right for s in shots)} of them wrong; "
        f"failed: {dict(bad) or 0}"
    )
    if plat.proc.poll() is not None:
        raise RuntimeError(f"gpufaas up exited:\n{harness.log_tail(plat.log_path)}")
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, harness.terminate)
    m = harness.machine("CPU (no GPU)", extra={"torch_threads": torch.get_num_threads()})
    harness.print_machine(m)
    emb = load_embedder()
    data_dir = Path(tempfile.mkdtemp(prefix="gpufaas-bench-"))
    plat: harness.Platform | None = None
    results: list[KillResult] = []
    try:
        plat = harness.Platform.start(data_dir, "--demo", "--devices", "cpu")
        took = plat.wait_ready(args.ready_timeout)
        print(
            f"platform: gpufaas up --demo --devices cpu on port {plat.http_port}, ready in "
            f"{took:.1f} s; {args.clients} clients, {args.seconds_per_phase:g} s per phase"
        )
        results = run(plat, args, emb)
        print_table(results)
        restarts = [ln for ln in plat.log().splitlines() if "restarted" in ln]
        print("gpufaas up: " + ("; ".join(r.strip() for r in restarts) or "no restarts"))
    finally:
        if plat is not None:
            status = plat.stop()
            print(f"platform stopped (exit status {status})")
        if args.keep_data_dir:
            print(f"data dir kept: {data_dir}")
        else:
            shutil.rmtree(data_dir, ignore_errors=True)
    if args.json is not None:
        doc: dict[str, Any] = {
            "machine": m,
            "command": [sys.executable, *sys.argv],
            "settings": vars(args),
            "results": [asdict(r) for r in results],
        }
        args.json.write_text(json.dumps(doc, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
