"""Starting platform processes, waiting until each is ready, and stopping them in order.

Children run in their own session (so a terminal's Ctrl-C reaches only us and we stop
them in order) and get SIGTERM if this process dies (PR_SET_PDEATHSIG), so nothing
is left running whatever happens to the supervisor.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gpufaas.shared.process import die_with_parent


class StartError(RuntimeError):
    """A child failed to become ready; the message says which and shows its log's tail."""


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    ready_file: Path | None
    argv: list[str]
    env: dict[str, str]
    restarts: list[float] = field(default_factory=list)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class Supervisor:
    """Owns child processes; ``stop()`` ends them in reverse start order."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.logs = run_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.children: list[Child] = []

    def spawn(
        self, name: str, argv: list[str], env: dict[str, str], *, ready: bool = True
    ) -> Child:
        """Start a child with its output in ``logs/<name>.log``."""
        ready_file = self.run_dir / f"{name}.ready" if ready else None
        if ready_file is not None:
            ready_file.unlink(missing_ok=True)
            env = {**env, "GPUFAAS_READY_FILE": str(ready_file)}
        log_path = self.logs / f"{name}.log"
        child = Child(name, self._popen(argv, env, log_path, "wb"), log_path, ready_file, argv, env)
        self.children.append(child)
        return child

    @staticmethod
    def _popen(
        argv: list[str], env: dict[str, str], log_path: Path, mode: str
    ) -> subprocess.Popen[bytes]:
        with open(log_path, mode) as log:
            return subprocess.Popen(
                argv,
                env={**os.environ, **env},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,  # noqa: PLW1509 - only calls prctl, no locks
            )

    def restart(self, child: Child, *, limit: int, window_s: float, counted: bool = True) -> bool:
        """Start an exited child again (log appended), unless it crashed ``limit`` times lately.

        ``counted=False``: the exit had an outside cause (NATS was unreachable), not a crash
        loop of the child, so it does not count towards the limit."""
        now = time.monotonic()
        child.restarts = [t for t in child.restarts if now - t < window_s]
        if counted and len(child.restarts) >= limit:
            return False
        if counted:
            child.restarts.append(now)
        if child.ready_file is not None:
            child.ready_file.unlink(missing_ok=True)
        child.proc = self._popen(child.argv, child.env, child.log_path, "ab")
        return True

    def spawn_service(self, name: str, module: str, env: dict[str, str]) -> Child:
        """Start ``python -m gpufaas.<module>``."""
        return self.spawn(name, [sys.executable, "-m", f"gpufaas.{module}"], env)

    def wait_ready(
        self, children: list[Child], timeout: float, probe: Callable[[Child], bool] | None = None
    ) -> None:
        """Poll until every child is ready (ready file written, or ``probe`` true), with a deadline."""
        deadline = time.monotonic() + timeout
        pending = list(children)
        while pending:
            for child in list(pending):
                if child.proc.poll() is not None:
                    raise StartError(
                        f"{child.name} exited with status {child.proc.returncode} while starting; "
                        f"last lines of {child.log_path}:\n{child.log_tail()}"
                    )
                ok = probe(child) if probe else bool(child.ready_file and child.ready_file.exists())
                if ok:
                    pending.remove(child)
            if pending and time.monotonic() > deadline:
                names = ", ".join(c.name for c in pending)
                raise StartError(f"{names} not ready after {timeout:g} s; logs in {self.logs}")
            if pending:
                time.sleep(0.05)

    def exited(self) -> Child | None:
        """A child that has exited, if any."""
        return next((c for c in self.children if c.proc.poll() is not None), None)

    def stop(self, deadline_s: float = 10.0) -> None:
        """SIGTERM each child in reverse start order, SIGKILL after the deadline."""
        for child in reversed(self.children):
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
                try:
                    child.proc.wait(timeout=deadline_s)
                except subprocess.TimeoutExpired:
                    child.proc.kill()
                    child.proc.wait()
            if child.ready_file is not None:
                child.ready_file.unlink(missing_ok=True)
        self.children.clear()
