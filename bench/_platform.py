"""What the benchmarks share: the platform (``gpufaas up``, NATS), statistics, the machine.

Scripts here use it as ``import _platform as harness``: ``python bench/x.py`` puts
``bench/`` on ``sys.path`` (and mypy, given the ``bench`` folder, finds it the same way).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from gpufaas.launch import HOST, Up, free_ports, http_status, log_tail

__all__ = ["HOST", "Platform", "free_ports", "http_status", "log_tail"]


# --- the platform -------------------------------------------------------------------

# ``gpufaas up`` itself is started, awaited and stopped by ``gpufaas.launch`` (the e2e tests
# use it too): ``Platform.start(data_dir, "--demo", ...)``, ``.wait_ready``, ``.stop``.
Platform = Up


def with_worker_threads() -> dict[str, str]:
    """Run this benchmark under the OpenMP settings the platform's workers compute with
    (``gpufaas.platform.worker_thread_env``), re-executing it once if they differ: OpenMP
    reads them when torch loads, and an in-process baseline under another policy (a
    spinning one) measures the policy, and steals the cores the worker computes on."""
    from gpufaas.platform import worker_thread_env  # noqa: PLC0415

    want = worker_thread_env()
    if any(os.environ.get(k) != v for k, v in want.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **want})
    return want


def stop(plat: Platform) -> int:
    """Stop ``gpufaas up`` (SIGTERM, waited for); on a failed stop, the tail of its log on
    stderr. Returns its exit status."""
    status = plat.stop()
    if status != 0:
        print(log_tail(plat.log_path), file=sys.stderr)
    return status


def write_json(path: Path | None, machine: Mapping[str, Any], results: Mapping[str, Any]) -> None:
    """The machine, the command line and ``results`` as JSON at ``path`` (if given)."""
    if path is None:
        return
    doc = {"machine": dict(machine), "command": [sys.executable, *sys.argv], **results}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"results written to {path}")


def start_nats(
    data_dir: Path, timeout_s: float = 60.0
) -> tuple[subprocess.Popen[bytes], str, Path]:
    """The embedded nats-server with the platform's generated config, on a free port.

    Returns the process, its URL and its log file.
    """
    from gpufaas.embedded import accepting, nats_server_binary, write_config  # noqa: PLC0415

    (port,) = free_ports(1)
    conf = write_config(data_dir, HOST, port)
    log_path = data_dir / "nats-server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [str(nats_server_binary()), "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + timeout_s
    while not accepting(HOST, port):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"nats-server did not start:\n{log_tail(log_path)}")
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.02)  # the poll interval, cut short if it exits
    return proc, f"nats://{HOST}:{port}", log_path


def terminate(signum: int, frame: FrameType | None) -> None:
    """SIGTERM handler: exit, unwinding through the ``finally`` that stops the platform."""
    raise SystemExit(128 + signum)


# --- statistics and the machine ------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100)."""
    s = sorted(values)
    if not s:
        return float("nan")
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def mib(n: float) -> str:
    """Bytes as MiB, one decimal."""
    return f"{n / 2**20:,.1f} MiB"


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (or what ``platform`` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(
    device: str, *, memory: bool = False, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The machine and software, for the report; ``memory`` adds total RAM, ``extra`` more keys.

    The ``extra`` keys follow ``torch``; ``device`` and the load average come last.
    """
    m: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
    }
    if memory:
        mem_total = 0
        with contextlib.suppress(OSError, ValueError, IndexError):
            mem_total = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
        m["memory"] = mem_total
    m["python"] = platform.python_version()
    m["torch"] = torch.__version__
    m.update(extra or {})
    m["device"] = device
    m["loadavg_1m_before"] = round(os.getloadavg()[0], 2)
    return m


def print_machine(m: dict[str, Any]) -> None:
    """Print what ``machine`` found (memory, safetensors and torch threads where present)."""
    memory = f", {mib(m['memory'])}" if "memory" in m else ""
    print(f"machine : {m['cpu']}, {m['cores']} cores ({m['cores_usable']} usable){memory}")
    safetensors = f", safetensors {m['safetensors']}" if "safetensors" in m else ""
    print(f"software: python {m['python']}, torch {m['torch']}{safetensors}")
    threads = (
        f"; torch.get_num_threads() here = {m['torch_threads']}" if "torch_threads" in m else ""
    )
    print(f"device  : {m['device']}{threads}")
