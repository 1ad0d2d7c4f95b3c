"""What the benchmarks share: start, poll and stop ``gpufaas up``, statistics, the machine.

Scripts here use it as ``import _platform as harness``: ``python bench/x.py`` puts
``bench/`` on ``sys.path`` (and mypy, given the ``bench`` folder, finds it the same way).
"""

from __future__ import annotations

import contextlib
import datetime
import http.client
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from gpufaas.shared.config import default_shm_dir

HOST = "127.0.0.1"
READY_LINE = "Press Ctrl-C to stop."
STOP_TIMEOUT_S = 60.0


# --- the platform -------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports that were free a moment ago (bound together, then released)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def http_status(port: int, path: str) -> int | None:
    """Status of ``GET path``, or None when nothing answers yet."""
    conn = http.client.HTTPConnection(HOST, port, timeout=2)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
    except OSError:
        return None
    else:
        return resp.status
    finally:
        conn.close()


def log_tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file, or a note that there is none."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no output)"


@dataclass
class Platform:
    """A running ``gpufaas up``: its process, gateway port, log and data directory."""

    proc: subprocess.Popen[bytes]
    http_port: int
    log_path: Path
    data_dir: Path

    @property
    def shm_dir(self) -> Path:
        """This platform's shared-memory directory (the host tier's segments live below it)."""
        return default_shm_dir() / f"up-{self.http_port}"


def start_platform(
    data_dir: Path, log_path: Path, *, demo: bool = False, devices: str = "cpu"
) -> Platform:
    """Start ``gpufaas up --devices <devices>`` (``--demo`` if asked) on free ports, logging
    to a file."""
    http_port, nats_port = free_ports(2)
    argv = [
        str(Path(sys.executable).parent / "gpufaas"),
        "up",
        "--http-port",
        str(http_port),
        "--nats-port",
        str(nats_port),
        "--data-dir",
        str(data_dir),
        "--devices",
        devices,
    ]
    if demo:
        argv.append("--demo")
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
    return Platform(proc, http_port, log_path, data_dir)


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


def wait_ready(plat: Platform, timeout_s: float, ready: Callable[[int], bool]) -> float:
    """Poll until up has printed that it is up, the gateway is ready and ``ready(port)`` holds.

    Returns the seconds taken; raises if up exits first or ``timeout_s`` passes.
    """
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    while True:
        if plat.proc.poll() is not None:
            raise RuntimeError(
                f"gpufaas up exited with status {plat.proc.returncode} before it was ready:\n"
                f"{log_tail(plat.log_path)}"
            )
        if (
            READY_LINE in plat.log_path.read_text(errors="replace")
            and http_status(plat.http_port, "/v2/health/ready") == 200
            and ready(plat.http_port)
        ):
            return time.monotonic() - t0
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"gpufaas up not ready after {timeout_s:.0f} s:\n{log_tail(plat.log_path)}"
            )
        with contextlib.suppress(subprocess.TimeoutExpired):
            plat.proc.wait(timeout=0.2)  # the poll interval, cut short if the process exits


def stop_platform(plat: Platform) -> int:
    """SIGTERM and wait for exit (SIGKILL only if it does not stop in time); exit status."""
    if plat.proc.poll() is None:
        plat.proc.send_signal(signal.SIGTERM)
        try:
            return plat.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            print(
                f"gpufaas up ignored SIGTERM for {STOP_TIMEOUT_S:.0f} s; killing it",
                file=sys.stderr,
            )
            plat.proc.kill()
    return plat.proc.wait()


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
