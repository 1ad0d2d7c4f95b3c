"""Tensor sharing: memory of 10 related functions, and cold start over resident tensors.

Starts ``gpufaas up --devices cpu`` (no demo) on free ports with a temporary data
directory and writes 9 fine-tuned variants of the demo all-MiniLM-L6-v2 model
(``scripts/make_variants.py``: the top encoder layer perturbed, every other tensor
byte-identical to the base). Then:

(a) Memory. Deploys the base model (as a path directory) and the 9 variants as 10
    functions and invokes each once. Prints the union of their unique tensor bytes
    (hashed here from the files, like the tensor store does), the host-tier segment
    files the store holds, the PSS of the mappings of those segments summed over all
    platform processes (``/proc/<pid>/smaps``), and the PSS of every platform process.
    Baseline, after the platform is stopped (so shared libraries are not split with it):
    10 plain processes, each ``safetensors.torch.load_file`` + ``BertEmbedder`` + embed
    once over its own model directory, then idle; their PSS and their weight mappings.

(b) Cold start. Deploys ``warm-src`` (the base model), then, interleaved with the
    baselines, deploys ``resident-<i>`` of the same model directory: each builds a new
    instance over tensors already resident in shared memory. Timed: the worker's build
    (``load_us`` of the ``function.deployed`` event) and the deploy HTTP call end to end.
    Baselines, each in a fresh subprocess timed inside it: ``safetensors.torch.load_file``
    + config + tokenizer + ``BertEmbedder``, and the same with ``torch.load`` of a
    ``torch.save``d state dict instead of ``load_file``.

Run:  .venv/bin/python bench/tensor_sharing.py [--variants 9] [--reps 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import _platform as harness
import blake3
import safetensors.torch
import torch

from gpufaas.shared.catalog import resolve_model_dir
from gpufaas.shared.messages import ModelSource
from gpufaas.worker.models.bert import BertConfig, BertEmbedder, load_tokenizer

WEIGHTS_FILE = "model.safetensors"
TEXT = "Content-addressed tensors are stored once and shared by every function."
MAKE_VARIANTS = Path(__file__).resolve().parent.parent / "scripts" / "make_variants.py"

MakeVariants = Callable[[Path, Path, int, int, int], list[Path]]


# --- the platform -------------------------------------------------------------------


# Started platforms by HTTP port: requests carry their admin key (server paths need one).
PLATFORMS: dict[int, harness.Platform] = {}


def http_json(
    port: int, method: str, path: str, body: Any = None, timeout: float = 120.0
) -> tuple[int, Any]:
    """One request with the platform's admin key; (status, decoded JSON or None)."""
    conn = http.client.HTTPConnection(harness.HOST, port, timeout=timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        headers |= PLATFORMS[port].headers
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        try:
            return resp.status, json.loads(raw) if raw else None
        except json.JSONDecodeError:
            return resp.status, raw.decode(errors="replace")
    finally:
        conn.close()


def worker_listed(port: int) -> bool:
    """Whether ``GET /v1/nodes`` lists a node with a worker (deploys 503 until it does)."""
    try:
        status, body = http_json(port, "GET", "/v1/nodes", timeout=5)
    except OSError:
        return False
    nodes = body.get("nodes", []) if status == 200 and isinstance(body, dict) else []
    return any("worker" in n.get("services", {}) for n in nodes)


def deploy(port: int, name: str, model_dir: Path) -> tuple[float, dict[str, Any]]:
    """``POST /v1/functions``; (seconds end to end, the record)."""
    body = {"name": name, "model": {"path": str(model_dir)}}
    t0 = time.perf_counter()
    status, reply = http_json(port, "POST", "/v1/functions", body)
    took = time.perf_counter() - t0
    if status != 201:
        raise RuntimeError(f"deploy {name}: HTTP {status}: {reply}")
    return took, reply if isinstance(reply, dict) else {}


def invoke(port: int, name: str) -> tuple[float, torch.Tensor, dict[str, Any]]:
    """One inference of ``TEXT``; (seconds end to end, embedding, breakdown_us)."""
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [TEXT]}]}
    t0 = time.perf_counter()
    status, reply = http_json(port, "POST", f"/v2/models/{name}/infer", body)
    took = time.perf_counter() - t0
    if status != 200 or not isinstance(reply, dict):
        raise RuntimeError(f"infer {name}: HTTP {status}: {reply}")
    out = next(o for o in reply["outputs"] if o["name"] == "embedding")
    emb = torch.tensor(out["data"], dtype=torch.float32).reshape(out["shape"])
    return took, emb, dict(reply["parameters"]["breakdown_us"])


def deployed_events(port: int, names: Iterable[str], timeout_s: float = 30.0) -> dict[str, Any]:
    """The ``function.deployed`` event data of each function in ``names`` (replayed via SSE)."""
    wanted = set(names)
    found: dict[str, Any] = {}
    conn = http.client.HTTPConnection(harness.HOST, port, timeout=timeout_s)
    try:
        conn.request(
            "GET", "/v1/events?kinds=function.deployed&replay=all", headers=PLATFORMS[port].headers
        )
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"GET /v1/events: HTTP {resp.status}")
        deadline = time.monotonic() + timeout_s
        while not wanted <= found.keys():
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"no function.deployed event for {sorted(wanted - found.keys())}"
                )
            line = resp.fp.readline()
            if not line:
                raise RuntimeError("event stream ended early")
            if line.startswith(b"data: "):
                data = json.loads(line[6:]).get("data", {})
                if data.get("function") in wanted:
                    found[data["function"]] = data
    finally:
        conn.close()
    return found


# --- processes and their memory ------------------------------------------------------


def descendants(root: int) -> set[int]:
    """``root`` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = set(), [root]
    while todo:
        pid = todo.pop()
        out.add(pid)
        todo += children.get(pid, [])
    return out


def pids_mentioning(text: str) -> set[int]:
    """Processes whose command line or environment contains ``text``."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if text.encode() in cmdline or text.encode() in environ:
            found.add(int(entry.name))
    return found


def platform_pids(plat: harness.Platform) -> set[int]:
    """The up process, its descendants, and anything carrying its data dir (not this one)."""
    pids = descendants(plat.proc.pid) | pids_mentioning(str(plat.data_dir))
    pids.discard(os.getpid())
    return {p for p in pids if Path(f"/proc/{p}").exists()}


def process_label(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return "?"
    node = next((e.split("=", 1)[1] for e in environ if e.startswith("GPUFAAS_NODE_ID=")), "")
    if "-m" in argv and argv.index("-m") + 1 < len(argv):
        svc = argv[argv.index("-m") + 1].removeprefix("gpufaas.")
        return f"{node}.{svc}" if svc in NODE_SERVICES and node else svc
    if any("nats-server" in a for a in argv[:1]):
        return "nats-server"
    if "up" in argv[1:3]:
        return "gpufaas up (supervisor)"
    return Path(argv[0]).name


NODE_SERVICES = ("tensorstore", "transfer", "memory", "worker")


_MAPPING_HEADER = re.compile(r"^[0-9a-f]+-[0-9a-f]+ ")


@dataclass
class Mapping:
    path: str
    pss: int
    rss: int
    private: int


def smaps(pid: int) -> list[Mapping]:
    """Every mapping of ``pid`` with its Pss, Rss and Private_* bytes."""
    out: list[Mapping] = []
    cur: Mapping | None = None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head, _, rest = line.partition(":")
            if _MAPPING_HEADER.match(line):  # "start-end perms offset dev inode [path]"
                parts = line.split(None, 5)
                cur = Mapping(parts[5].strip() if len(parts) > 5 else "", 0, 0, 0)
                out.append(cur)
            elif cur is not None and rest.strip().endswith("kB"):
                kb = int(rest.split()[0]) * 1024
                if head == "Pss":
                    cur.pss = kb
                elif head == "Rss":
                    cur.rss = kb
                elif head in ("Private_Clean", "Private_Dirty"):
                    cur.private += kb
    return out


@dataclass
class ProcMem:
    pid: int
    label: str
    pss: int
    seg_pss: int = 0
    seg_rss: int = 0
    weight_pss: int = 0  # baseline: mappings of its model file
    weight_rss: int = 0
    weight_private: int = 0


def measure_platform(plat: harness.Platform) -> list[ProcMem]:
    prefix = f"{plat.shm_dir}/tensors/"
    out = []
    for pid in sorted(platform_pids(plat)):
        try:
            maps = smaps(pid)
        except OSError:
            continue  # exited meanwhile
        seg = [m for m in maps if m.path.startswith(prefix)]
        out.append(
            ProcMem(
                pid,
                process_label(pid),
                sum(m.pss for m in maps),
                seg_pss=sum(m.pss for m in seg),
                seg_rss=sum(m.rss for m in seg),
            )
        )
    return out


def segment_files(plat: harness.Platform) -> tuple[int, int, int]:
    """(files, bytes, bytes allocated in tmpfs) of the tensor segments (not indexes)."""
    files = nbytes = alloc = 0
    for path in (plat.shm_dir / "tensors").rglob("*"):
        if path.is_file() and not path.name.endswith(".json") and not path.name.startswith("."):
            st = path.stat()
            files += 1
            nbytes += st.st_size
            alloc += st.st_blocks * 512
    return files, nbytes, alloc


# --- tensors --------------------------------------------------------------------------


def tensor_hashes(model_file: Path) -> dict[str, int]:
    """Content address -> bytes of each tensor (blake3 of dtype, shape, bytes, as the store)."""
    out = {}
    for t in safetensors.torch.load_file(str(model_file)).values():
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy()
        h = blake3.blake3(f"{dtype_name(t.dtype)}|{','.join(map(str, t.shape))}|".encode())
        h.update(raw.data)
        out[h.hexdigest()] = raw.nbytes
    return out


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def load_make_variants() -> MakeVariants:
    spec = importlib.util.spec_from_file_location("make_variants", MAKE_VARIANTS)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {MAKE_VARIANTS}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being built
    spec.loader.exec_module(module)
    fn: MakeVariants = module.make_variants
    return fn


# --- children: the baselines ---------------------------------------------------------


def child_main(mode: str, model_dir: Path, pt_file: Path | None) -> int:
    """Run in a fresh interpreter: load a model the ordinary way, report, maybe stay up."""
    t_imported = time.monotonic()
    t0 = time.perf_counter()
    if mode == "torch_load":
        assert pt_file is not None
        weights = torch.load(pt_file, weights_only=True)
    else:
        weights = safetensors.torch.load_file(str(model_dir / WEIGHTS_FILE))
    t1 = time.perf_counter()
    cfg = BertConfig.from_model_dir(model_dir)
    tok = load_tokenizer(model_dir, cfg.max_seq_length)
    t2 = time.perf_counter()
    emb = BertEmbedder(weights, cfg, tok)
    t3 = time.perf_counter()
    emb.embed([TEXT])
    t4 = time.perf_counter()
    report: dict[str, Any] = {
        "imported_at": t_imported,
        "loaded_at": time.monotonic(),
        "weights_ms": (t1 - t0) * 1e3,
        "config_tokenizer_ms": (t2 - t1) * 1e3,
        "build_ms": (t3 - t2) * 1e3,
        "load_ms": (t3 - t0) * 1e3,
        "first_embed_ms": (t4 - t3) * 1e3,
        "weight_bytes": sum(t.numel() * t.element_size() for t in weights.values()),
    }
    if mode == "hold":
        report["weights_in"] = weights_location(weights)
    print(json.dumps(report), flush=True)
    if mode == "hold":
        sys.stdin.read()  # until the parent closes our stdin
    return 0


def weights_location(weights: dict[str, torch.Tensor]) -> dict[str, int]:
    """Bytes of the weights by what backs them: a file mapping (named) or anonymous memory."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(None, 5)
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        ranges.append((lo, hi, parts[5] if len(parts) > 5 else "[anon]"))
    out: dict[str, int] = {}
    for t in weights.values():
        ptr = t.data_ptr()
        where = next((p for lo, hi, p in ranges if lo <= ptr < hi), "?")
        out[where] = out.get(where, 0) + t.numel() * t.element_size()
    return out


def spawn_child(mode: str, model_dir: Path, pt_file: Path | None = None) -> subprocess.Popen[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", mode, str(model_dir)]
    if pt_file is not None:
        argv += ["--pt", str(pt_file)]
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def child_report(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"baseline child {proc.pid} exited with {proc.wait()} before reporting")
    report: dict[str, Any] = json.loads(line)
    return report


def timed_child(mode: str, model_dir: Path, pt_file: Path | None) -> dict[str, Any]:
    spawned = time.monotonic()
    proc = spawn_child(mode, model_dir, pt_file)
    try:
        report = child_report(proc)
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(timeout=60)
    report["spawn_to_imported_ms"] = (report["imported_at"] - spawned) * 1e3
    report["spawn_to_loaded_ms"] = (report["loaded_at"] - spawned) * 1e3
    return report


def measure_baseline(model_dirs: list[Path]) -> tuple[list[ProcMem], list[dict[str, Any]]]:
    """Start one plain process per model dir, wait until all have embedded, measure, stop."""
    procs = [spawn_child("hold", d) for d in model_dirs]
    try:
        reports = [child_report(p) for p in procs]
        mems = []
        for p, d in zip(procs, model_dirs, strict=True):
            maps = smaps(p.pid)
            wf = [m for m in maps if m.path == str(d / WEIGHTS_FILE)]
            mems.append(
                ProcMem(
                    p.pid,
                    f"plain {d.name}",
                    sum(m.pss for m in maps),
                    weight_pss=sum(m.pss for m in wf),
                    weight_rss=sum(m.rss for m in wf),
                    weight_private=sum(m.private for m in wf),
                )
            )
        return mems, reports
    finally:
        for p in procs:
            if p.stdin is not None:
                p.stdin.close()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


# --- statistics and reporting --------------------------------------------------------


@dataclass
class Dist:
    median: float
    p95: float
    n: int

    @classmethod
    def of(cls, xs: list[float]) -> Dist:
        return cls(statistics.median(xs), harness.percentile(xs, 95), len(xs))


def print_procs(title: str, procs: list[ProcMem], *, weights: bool) -> None:
    print(f"  {title}")
    for p in procs:
        extra = (
            f"  weight-file map PSS {harness.mib(p.weight_pss)}, RSS {harness.mib(p.weight_rss)}, private {harness.mib(p.weight_private)}"
            if weights
            else f"  segment-map PSS {harness.mib(p.seg_pss)} (RSS {harness.mib(p.seg_rss)})"
        )
        print(f"    {p.pid:>8} {p.label:<28} PSS {harness.mib(p.pss):>12}{extra}")


# --- the two measurements -------------------------------------------------------------


@dataclass
class MemoryResult:
    functions: int
    union_bytes: int
    sum_model_bytes: int
    idle_platform_pss: int
    platform_pss: int
    segment_pss: int
    segment_rss: int
    segment_files: int
    segment_bytes: int
    segment_alloc: int
    baseline_pss: int
    baseline_weight_pss: int
    baseline_weight_rss: int
    baseline_weight_private: int
    baseline_weights_in: dict[str, int]
    worker_other_pss_idle: int  # the worker's PSS outside the segment mappings
    worker_other_pss: int
    deploy_events: dict[str, dict[str, Any]]
    processes: list[dict[str, Any]] = field(default_factory=list)
    baseline_processes: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class ColdResult:
    reps: int
    deploy_http_ms: Dist
    deploy_load_ms: Dist
    first_invoke_ms: Dist
    load_file_ms: Dist
    load_file_weights_ms: Dist
    load_file_tokenizer_ms: Dist
    torch_load_ms: Dist
    torch_load_weights_ms: Dist
    spawn_to_loaded_ms: Dist
    raw: dict[str, list[float]] = field(default_factory=dict)


def deploy_memory_set(
    plat: harness.Platform, names_dirs: list[tuple[str, Path]]
) -> tuple[list[ProcMem], list[torch.Tensor]]:
    """Deploy and invoke once each function; the platform's memory afterwards."""
    embs = []
    for name, d in names_dirs:
        took, _ = deploy(plat.http_port, name, d)
        _, emb, _ = invoke(plat.http_port, name)
        embs.append(emb)
        print(f"  deployed {name:<11} in {took * 1e3:7.1f} ms and invoked it")
    return measure_platform(plat), embs


def check_embeddings(embs: list[torch.Tensor]) -> None:
    """Each variant's output must differ from the base's, yet stay close to it."""
    base = embs[0]
    for i, e in enumerate(embs[1:], 1):
        diff = float((e - base).abs().max())
        cos = float((e * base).sum())
        if not (diff > 1e-5 and cos > 0.95):
            raise RuntimeError(f"variant {i - 1}: max |diff| {diff:.2e}, cosine {cos:.4f}")


def run_cold(
    plat: harness.Platform, base_dir: Path, pt_file: Path, reps: int
) -> tuple[dict[str, list[float]], list[str]]:
    """Interleave resident deploys with fresh-process loads; raw timings (ms)."""
    raw: dict[str, list[float]] = {
        k: []
        for k in (
            "deploy_http",
            "first_invoke",
            "load_file",
            "load_file_weights",
            "load_file_tokenizer",
            "load_file_first_embed",
            "spawn_to_loaded",
            "torch_load",
            "torch_load_weights",
        )
    }
    names = []

    def platform_one(i: int) -> None:
        name = f"resident-{i}"
        took, _ = deploy(plat.http_port, name, base_dir)
        inv, _, _ = invoke(plat.http_port, name)
        names.append(name)
        raw["deploy_http"].append(took * 1e3)
        raw["first_invoke"].append(inv * 1e3)

    def load_file_one(_: int) -> None:
        r = timed_child("load_file", base_dir, None)
        raw["load_file"].append(r["load_ms"])
        raw["load_file_weights"].append(r["weights_ms"])
        raw["load_file_tokenizer"].append(r["config_tokenizer_ms"])
        raw["load_file_first_embed"].append(r["first_embed_ms"])
        raw["spawn_to_loaded"].append(r["spawn_to_loaded_ms"])

    def torch_load_one(_: int) -> None:
        r = timed_child("torch_load", base_dir, pt_file)
        raw["torch_load"].append(r["load_ms"])
        raw["torch_load_weights"].append(r["weights_ms"])

    order = [platform_one, load_file_one, torch_load_one]
    for i in range(reps):  # rotate the order each round so drift hits all alike
        k = i % len(order)
        for step in order[k:] + order[:k]:
            step(i)
    return raw, names


# --- main ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--variants", type=int, default=9, help="fine-tuned variants besides the base")
    ap.add_argument("--layers", type=int, default=1, help="top encoder layers each variant changes")
    ap.add_argument("--reps", type=int, default=10, help="cold-start repetitions of each kind")
    ap.add_argument("--keep-data-dir", action="store_true", help="keep the temporary data dir")
    ap.add_argument("--json", type=Path, default=None, metavar="PATH", help="write results here")
    ap.add_argument("--ready-timeout", type=float, default=180.0, help="seconds to wait for up")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--pt", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("model_dir", nargs="?", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is None and (args.variants < 1 or args.reps < 1):
        ap.error("--variants and --reps must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        return child_main(args.child, args.model_dir, args.pt)
    signal.signal(signal.SIGTERM, harness.terminate)
    t_start = time.monotonic()
    m = harness.machine(
        "CPU, host shared-memory tier (no GPU)",
        memory=True,
        extra={"safetensors": getattr(safetensors, "__version__", "?")},
    )
    harness.print_machine(m)
    data_dir = Path(tempfile.mkdtemp(prefix="gpufaas-bench-"))
    try:
        mem, cold = run(args, data_dir)
    finally:
        if args.keep_data_dir:
            print(f"data dir kept: {data_dir}")
        else:
            shutil.rmtree(data_dir, ignore_errors=True)
    m["loadavg_1m_after"] = round(os.getloadavg()[0], 2)
    m["bench_s"] = round(time.monotonic() - t_start, 1)
    print(
        f"\nload average (1 min): {m['loadavg_1m_before']} before, {m['loadavg_1m_after']} after; "
        f"bench took {m['bench_s']} s"
    )
    if args.json is not None:
        doc = {
            "machine": m,
            "command": [sys.executable, *sys.argv],
            "settings": {"variants": args.variants, "layers": args.layers, "reps": args.reps},
            "memory": asdict(mem),
            "cold_start": asdict(cold),
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"results written to {args.json}")
    return 0


@dataclass
class Models:
    base_dir: Path
    variant_dirs: list[Path]
    pt_file: Path  # the base's state dict, torch.save'd, for the torch.load baseline
    union_bytes: int
    sum_bytes: int

    @property
    def dirs(self) -> list[Path]:
        return [self.base_dir, *self.variant_dirs]


def prepare_models(args: argparse.Namespace, data_dir: Path) -> Models:
    """Write the variants and the .pt copy; hash every tensor for the union."""
    base_dir = resolve_model_dir(ModelSource(builtin="all-minilm-l6-v2"))
    variant_dirs = load_make_variants()(
        base_dir, data_dir / "variants", args.variants, args.layers, 0
    )
    pt_file = data_dir / "base.pt"
    base_weights = safetensors.torch.load_file(str(base_dir / WEIGHTS_FILE))
    torch.save({k: v.clone() for k, v in base_weights.items()}, pt_file)
    del base_weights
    union: dict[str, int] = {}
    sum_bytes = 0
    for d in [base_dir, *variant_dirs]:
        hashes = tensor_hashes(d / WEIGHTS_FILE)
        union.update(hashes)
        sum_bytes += sum(hashes.values())
    models = Models(base_dir, variant_dirs, pt_file, sum(union.values()), sum_bytes)
    print(
        f"\nmodels: base + {args.variants} variants (top {args.layers} encoder layer(s) "
        f"perturbed): {harness.mib(sum_bytes)} in all, {harness.mib(models.union_bytes)} unique tensor bytes "
        "(union)"
    )
    return models


def run(args: argparse.Namespace, data_dir: Path) -> tuple[MemoryResult, ColdResult]:
    models = prepare_models(args, data_dir)
    base_dir, variant_dirs, model_dirs = models.base_dir, models.variant_dirs, models.dirs
    # The models are deployed by server path: under the model roots, with the admin key.
    roots = {"GPUFAAS_MODEL_ROOTS": f"{base_dir}:{data_dir}"}
    plat = harness.Platform.start(data_dir, "--devices", "cpu", env=roots)
    PLATFORMS[plat.http_port] = plat
    try:
        took = plat.wait_ready(args.ready_timeout, worker_listed)
        print(f"platform: gpufaas up --devices cpu on port {plat.http_port}, ready in {took:.1f} s")
        idle = measure_platform(plat)

        print(f"\n(a) memory: deploy {len(model_dirs)} functions, invoke each once")
        names_dirs = [("base", base_dir)] + [
            (f"variant-{i}", d) for i, d in enumerate(variant_dirs)
        ]
        procs, embs = deploy_memory_set(plat, names_dirs)
        check_embeddings(embs)
        files, seg_bytes, seg_alloc = segment_files(plat)
        events = deployed_events(plat.http_port, [n for n, _ in names_dirs])
        _, nodes = http_json(plat.http_port, "GET", "/v1/nodes")
        node0 = nodes["nodes"][0] if isinstance(nodes, dict) and nodes.get("nodes") else {}
        node_pids = {svc: info.get("pid") for svc, info in node0.get("services", {}).items()}
        print(f"  /v1/nodes: {node0.get('node')} service pids {node_pids}")
        print(f"  tensor store: {node0.get('tensor_store')}")

        print(f"\n(b) cold start over resident tensors: {args.reps} rounds, interleaved")
        deploy(plat.http_port, "warm-src", base_dir)
        raw, resident_names = run_cold(plat, base_dir, models.pt_file, args.reps)
        cold_events = deployed_events(plat.http_port, resident_names)
        raw["deploy_load"] = [cold_events[n]["load_us"] / 1e3 for n in resident_names]
    finally:
        print(f"platform stopped (exit status {harness.stop(plat)})")

    print("\nbaseline: one plain process per model (after the platform stopped)")
    base_mems, base_reports = measure_baseline(model_dirs)
    weights_in: dict[str, int] = {}
    for r in base_reports:
        for where, n in r["weights_in"].items():
            key = "model.safetensors (file mapping)" if where.endswith(WEIGHTS_FILE) else where
            weights_in[key] = weights_in.get(key, 0) + n
    mem = MemoryResult(
        functions=len(model_dirs),
        union_bytes=models.union_bytes,
        sum_model_bytes=models.sum_bytes,
        idle_platform_pss=sum(p.pss for p in idle),
        platform_pss=sum(p.pss for p in procs),
        segment_pss=sum(p.seg_pss for p in procs),
        segment_rss=sum(p.seg_rss for p in procs),
        segment_files=files,
        segment_bytes=seg_bytes,
        segment_alloc=seg_alloc,
        baseline_pss=sum(p.pss for p in base_mems),
        baseline_weight_pss=sum(p.weight_pss for p in base_mems),
        baseline_weight_rss=sum(p.weight_rss for p in base_mems),
        baseline_weight_private=sum(p.weight_private for p in base_mems),
        baseline_weights_in=weights_in,
        worker_other_pss_idle=sum(p.pss - p.seg_pss for p in idle if p.label.endswith(".worker")),
        worker_other_pss=sum(p.pss - p.seg_pss for p in procs if p.label.endswith(".worker")),
        deploy_events={n: events[n] for n, _ in names_dirs},
        processes=[asdict(p) for p in procs],
        baseline_processes=[asdict(p) for p in base_mems],
    )
    cold = ColdResult(
        reps=args.reps,
        deploy_http_ms=Dist.of(raw["deploy_http"]),
        deploy_load_ms=Dist.of(raw["deploy_load"]),
        first_invoke_ms=Dist.of(raw["first_invoke"]),
        load_file_ms=Dist.of(raw["load_file"]),
        load_file_weights_ms=Dist.of(raw["load_file_weights"]),
        load_file_tokenizer_ms=Dist.of(raw["load_file_tokenizer"]),
        torch_load_ms=Dist.of(raw["torch_load"]),
        torch_load_weights_ms=Dist.of(raw["torch_load_weights"]),
        spawn_to_loaded_ms=Dist.of(raw["spawn_to_loaded"]),
        raw=raw,
    )
    print_procs("platform processes, idle (before any deploy):", idle, weights=False)
    print_procs(
        f"platform processes, {len(model_dirs)} functions deployed and invoked:",
        procs,
        weights=False,
    )
    print_procs("plain processes:", base_mems, weights=True)
    print_memory(mem)
    print_cold(cold)
    return mem, cold


def print_memory(r: MemoryResult) -> None:
    u = r.union_bytes
    stored = sum(e.get("bytes_stored", 0) for e in r.deploy_events.values())
    dedup = sum(e.get("bytes_deduplicated", 0) for e in r.deploy_events.values())
    print(f"\n(a) memory, {r.functions} functions (base + variants), CPU host tier")
    print(f"  sum of model sizes                        {harness.mib(r.sum_model_bytes):>12}")
    print(f"  union of unique tensor bytes              {harness.mib(u):>12}   (1.00x)")
    print(
        f"  deploy events: bytes_stored {harness.mib(stored)}, bytes_deduplicated {harness.mib(dedup)}"
    )
    print(
        f"  tensor segment files in /dev/shm          {harness.mib(r.segment_alloc):>12}   "
        f"({r.segment_alloc / u:.2f}x union; {r.segment_files} files, {harness.mib(r.segment_bytes)} bytes)"
    )
    print(
        f"  PSS of segment mappings, all processes    {harness.mib(r.segment_pss):>12}   "
        f"({r.segment_pss / u:.2f}x union; RSS {harness.mib(r.segment_rss)}: pages touched so far)"
    )
    print(f"  platform total PSS, idle (no function)    {harness.mib(r.idle_platform_pss):>12}")
    print(
        f"  platform total PSS, {r.functions} functions          {harness.mib(r.platform_pss):>12}   "
        f"(+{harness.mib(r.platform_pss - r.idle_platform_pss)} over idle)"
    )
    grown = r.worker_other_pss - r.worker_other_pss_idle
    print(
        f"    the worker outside the segments: {harness.mib(r.worker_other_pss_idle)} idle -> "
        f"{harness.mib(r.worker_other_pss)} (+{harness.mib(grown)}, {harness.mib(grown / r.functions)} per function: "
        "its instances and compute buffers)"
    )
    print(
        f"  {r.functions} plain processes, total PSS          {harness.mib(r.baseline_pss):>12}   "
        f"({r.baseline_pss / r.platform_pss:.2f}x the platform)"
    )
    print(
        f"    of which their weight-file mappings PSS {harness.mib(r.baseline_weight_pss):>12}   "
        f"(RSS {harness.mib(r.baseline_weight_rss)}, private {harness.mib(r.baseline_weight_private)}; "
        f"{r.baseline_weight_pss / max(r.segment_pss, 1):.2f}x the platform's segment PSS)"
    )
    where = ", ".join(f"{k}: {harness.mib(v)}" for k, v in r.baseline_weights_in.items())
    print(f"    weights of the plain processes are backed by: {where}")


def print_cold(c: ColdResult) -> None:
    print(f"\n(b) cold start of an instance, {c.reps} rounds each (ms; median / p95)")
    rows = [
        ("platform: deploy over resident tensors, worker build (load_us)", c.deploy_load_ms),
        ("platform: deploy HTTP call end to end", c.deploy_http_ms),
        ("platform: first invoke after that deploy (end to end)", c.first_invoke_ms),
        ("fresh process: load_file + config/tokenizer + BertEmbedder", c.load_file_ms),
        ("  of which safetensors.torch.load_file", c.load_file_weights_ms),
        ("  of which config + tokenizer", c.load_file_tokenizer_ms),
        ("fresh process: first embed after that load", Dist.of(c.raw["load_file_first_embed"])),
        ("fresh process: torch.load + config/tokenizer + BertEmbedder", c.torch_load_ms),
        ("  of which torch.load (weights_only)", c.torch_load_weights_ms),
        (
            "fresh process: spawn to loaded (interpreter, imports, load_file path)",
            c.spawn_to_loaded_ms,
        ),
    ]
    for label, d in rows:
        print(f"  {label:<72}{d.median:>9.1f} / {d.p95:>8.1f}")
    for label, base in (("load_file path", c.load_file_ms), ("torch.load path", c.torch_load_ms)):
        print(
            f"  ratio {label} / platform: {base.median / c.deploy_load_ms.median:.2f}x vs the worker "
            f"build, {base.median / c.deploy_http_ms.median:.2f}x vs the deploy call (medians)"
        )
    print(
        "  (a worker that built the model before builds the new instance over the manifest it "
        "remembers while the tensor store confirms the lease: the build is one store round trip)"
    )
    print(
        f"  ratio spawn-to-loaded / deploy call: "
        f"{c.spawn_to_loaded_ms.median / c.deploy_http_ms.median:.1f}x (medians)"
    )


if __name__ == "__main__":
    sys.exit(main())
