"""Run ``gpufaas up`` as a child process: free ports, a log file, a deadline to be ready, an
orderly stop.

The benchmarks and the end-to-end tests start the platform through it, and so can a
user's own scripts or test suites that want a throwaway platform on this machine.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from gpufaas.shared.apikeys import ADMIN_KEY_FILE, read_key_file
from gpufaas.shared.config import default_shm_dir

HOST = "127.0.0.1"
# ``up`` prints this on a line of its own once everything is started (and the demo, if
# asked, deployed); a traceback quoting the source that prints it does not count.
READY_LINE = re.compile(r"^Press Ctrl-C to stop\.$", re.MULTILINE)
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 60.0
POLL_S = 0.1


class NotReady(RuntimeError):
    """``gpufaas up`` exited, or was not ready in time (the message ends with its log)."""


def gpufaas_executable() -> str:
    """The ``gpufaas`` script installed beside this Python."""
    return str(Path(sys.executable).parent / "gpufaas")


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


def http_status(port: int, path: str, headers: Mapping[str, str] | None = None) -> int | None:
    """Status of ``GET path`` on this machine's ``port`` (with ``headers``: ``Up.headers``
    for a route that needs a key), or None when nothing answers yet."""
    conn = http.client.HTTPConnection(HOST, port, timeout=2)
    try:
        conn.request("GET", path, headers=dict(headers or {}))
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


def _descendants(root: int) -> dict[int, list[str]]:
    """The command line of every live process below ``root`` (zombies and processes
    whose command line is gone, being exited, left out)."""
    children: dict[int, list[int]] = {}
    argvs: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            _, rest = (entry / "stat").read_text().rsplit(")", 1)
            raw = (entry / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue  # gone
        state, ppid = rest.split()[:2]
        children.setdefault(int(ppid), []).append(int(entry.name))
        if state not in ("Z", "X") and raw:
            argvs[int(entry.name)] = raw.rstrip(b"\0").decode(errors="replace").split("\0")
    out, todo = {}, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        if pid in argvs:
            out[pid] = argvs[pid]
        todo += children.get(pid, [])
    return out


def _worker_tenant(pid: int, logs: Path) -> str | None:
    """The tenant a pool's worker process serves: the one it was started for (its
    environment), or the one it was bound to as a spare (``worker.bound`` in its log)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    except OSError:
        return None
    env = dict(e.split("=", 1) for e in raw.split("\0") if "=" in e)
    if env.get("GPUFAAS_WORKER_TENANT"):
        return env["GPUFAAS_WORKER_TENANT"]
    for log in logs.glob(f"*.worker-{env.get('GPUFAAS_WORKER_SPARE_ID', '?')}.log"):
        for line in log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if isinstance(rec, dict) and rec.get("event") == "worker.bound":
                    return str(rec.get("tenant"))
    return None


@dataclass
class Up:
    """A running ``gpufaas up``: its process, ports, data directory and log file."""

    proc: subprocess.Popen[bytes]
    http_port: int
    nats_port: int
    data_dir: Path
    log_path: Path
    grpc_port: int = 0  # the gateway's gRPC port (0: not served)

    @classmethod
    def start(
        cls,
        data_dir: Path,
        *args: str,
        log_path: Path | None = None,
        ports: tuple[int, int] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Up:
        """Start ``gpufaas up <args>`` on ``ports`` (HTTP, NATS; free ones by default) and
        a free gRPC port (unless ``args`` name one), with ``env`` added to this process's
        environment and its output in ``log_path`` (``data_dir/up.log`` by default).
        Returns at once: see ``wait_ready``."""
        if "--grpc-port" in args:
            grpc_port = int(args[args.index("--grpc-port") + 1])
            http_port, nats_port = ports or free_ports(2)
        else:
            http_port, nats_port, grpc_port = (*ports, *free_ports(1)) if ports else free_ports(3)
            args = (*args, "--grpc-port", str(grpc_port))
        data_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_path or data_dir / "up.log"
        argv = [
            gpufaas_executable(),
            "up",
            "--http-port",
            str(http_port),
            "--nats-port",
            str(nats_port),
            "--data-dir",
            str(data_dir),
            *args,
        ]
        # Wide lines: what up prints (URLs, the curl line) is read back whole.
        full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=full_env
            )
        return cls(proc, http_port, nats_port, data_dir, log_path, grpc_port)

    @property
    def url(self) -> str:
        """The gateway's base URL."""
        return f"http://{HOST}:{self.http_port}"

    @property
    def api_key(self) -> str | None:
        """The admin API key up keeps in its data directory (None before it made one, or
        with ``--no-auth``)."""
        return read_key_file(self.data_dir / ADMIN_KEY_FILE)[0]

    @property
    def headers(self) -> dict[str, str]:
        """``Authorization: Bearer <admin key>``, for requests to this platform's gateway."""
        key = self.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    @property
    def shm_dir(self) -> Path:
        """This platform's shared-memory directory (the host tier's segments live below it)."""
        return default_shm_dir() / f"up-{self.http_port}"

    def log(self) -> str:
        """Everything up has printed so far."""
        return self.log_path.read_text(errors="replace")

    @property
    def run_dir(self) -> Path:
        """Where up keeps its children's ready files and their ``logs/``."""
        return self.data_dir / "run" / f"up-{self.http_port}"

    def pids(self, name: str) -> list[int]:
        """This platform's live processes called ``name``: ``nats`` (the embedded server), a
        service (``scheduler``, ``gateway``; ``memory``, ``tensorstore``, ``transfer`` or
        ``worker``, the pool manager, of every node), or ``worker:<tenant>`` (the worker
        processes that serve that tenant: started for it, or spares bound to it). For chaos
        tests and benchmarks, which kill them."""
        found = []
        for pid, argv in _descendants(self.proc.pid).items():
            if name == "nats":
                hit = Path(argv[0]).name == "nats-server"
            elif name.startswith("worker:"):
                hit = argv[1:4] == ["-m", "gpufaas.worker", "--parent-pid"] and (
                    _worker_tenant(pid, self.run_dir / "logs") == name.removeprefix("worker:")
                )
            else:
                hit = argv[1:] == ["-m", f"gpufaas.{name}"]
            if hit:
                found.append(pid)
        return sorted(found)

    def wait_ready(
        self,
        timeout_s: float = READY_TIMEOUT_S,
        ready: Callable[[int], bool] | None = None,
    ) -> float:
        """Poll until up says it is up, the gateway is ready and ``ready(http_port)`` holds.

        Returns the seconds taken; raises ``NotReady`` if up exits first or ``timeout_s`` passes.
        """
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise NotReady(
                    f"gpufaas up exited with status {self.proc.returncode} before it was "
                    f"ready:\n{log_tail(self.log_path)}"
                )
            if (
                READY_LINE.search(self.log())
                and http_status(self.http_port, "/v2/health/ready") == 200
                and (ready is None or ready(self.http_port))
            ):
                return time.monotonic() - t0
            if time.monotonic() > deadline:
                raise NotReady(
                    f"gpufaas up not ready after {timeout_s:g} s:\n{log_tail(self.log_path)}"
                )
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=POLL_S)  # the poll interval, cut short if it exits

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """Send ``sig`` (up then stops every service in order) and wait for the exit status;
        SIGKILL only if it has not exited after ``timeout_s``."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                return self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                print(
                    f"gpufaas up ignored signal {sig} for {timeout_s:g} s; killing it",
                    file=sys.stderr,
                )
                self.proc.kill()
        return self.proc.wait()

    def __enter__(self) -> Up:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
