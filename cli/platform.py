"""`gpufaas up` and `gpufaas node`: run the platform's processes on this machine."""

from __future__ import annotations

import math
import os
import shutil
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from urllib.parse import urlsplit

from rich.console import Console

from gpufaas.admin_key import print_key, start_auth
from gpufaas.embedded import (
    MeshSecrets,
    accepting,
    nats_server_binary,
    port_free,
    write_config,
)
from gpufaas.shared.config import Config, default_shm_dir
from gpufaas.shared.constants import DEFAULT_GRPC_PORT, DEFAULT_NATS_PORT, NODE_SERVICES
from gpufaas.shared.devices import parse_devices
from gpufaas.shared.errors import PlatformError
from gpufaas.shared.paths import check_root
from gpufaas.supervisor import Child, StartError, Supervisor

READY_TIMEOUT_S = 120.0
# A service that crashes is restarted, unless it crashed this often within the window.
RESTART_LIMIT = 3
RESTART_WINDOW_S = 60.0
# A service's exit this soon after NATS was unreachable is put down to the outage: it
# covers a service's connect deadline (GPUFAAS_CONNECT_DEADLINE_S, 30 s by default).
NATS_GRACE_S = 60.0


class UsageError(RuntimeError):
    """A problem the user fixes with a flag (the message names it)."""


@dataclass(frozen=True)
class UpOptions:
    host: str
    http_port: int
    nats_port: int
    nats_url: str | None
    devices: str
    topology: str
    nodes: int
    data_dir: Path
    demo: bool
    auth: bool = True  # --no-auth: the gateway trusts the tenant header (experiments only)
    grpc_port: int = DEFAULT_GRPC_PORT  # the gateway's gRPC port; 0: not served


def node_ids(count: int) -> list[str]:
    return [f"node-{i}" for i in range(count)]


def worker_thread_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The OpenMP settings worker processes compute with (a value the user exported wins):
    benchmarks run their in-process baselines with the same, so that a ratio compares the
    platform, not two thread policies."""
    env = os.environ if environ is None else environ
    return {"OMP_WAIT_POLICY": env.get("OMP_WAIT_POLICY", "PASSIVE")}


def start_node(
    sup: Supervisor, base: Config, node_id: str, mesh: MeshSecrets | None = None
) -> list[Child]:
    """Start one node's services (memory first: the others take GPU room from it), with
    the node's NATS identity and the workers' for the pool (``mesh``: the embedded one)."""
    env = base.replace(node_id=node_id).to_env() | (mesh.node_env(node_id) if mesh else {})
    env.pop("GPUFAAS_READY_FILE", None)
    # The worker's torch threads sleep between operators instead of spinning: on one
    # machine they share its cores with the gateway, scheduler and NATS, and a spinning
    # OpenMP pool starves them (bench/batching.py: 3.6x with it, 2.5x without). A value
    # the user exported wins.
    # The node's worker is a pool of worker processes, one per tenant, drawn from warm
    # spares (``gpufaas.worker.pool``), unless GPUFAAS_WORKER_ROLE says otherwise.
    worker_env = {
        **env,
        **worker_thread_env(),
        "GPUFAAS_WORKER_ROLE": os.environ.get("GPUFAAS_WORKER_ROLE", "pool"),
    }
    return [
        sup.spawn_service(f"{node_id}.{svc}", svc, worker_env if svc == "worker" else env)
        for svc in NODE_SERVICES
    ]


class StopSignal:
    """Turns SIGINT/SIGTERM into a flag the main loop polls.

    A plain flag, not a threading.Event: Event.set() from a signal handler can deadlock
    with the same thread's Event.wait() (the handler runs while wait holds the lock),
    which once left `gpufaas up` deaf to Ctrl-C and SIGTERM.
    """

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True

    def wait(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` in short steps; whether a stop was requested."""
        end = time.monotonic() + timeout
        while not self.requested and time.monotonic() < end:
            time.sleep(0.05)
        return self.requested


def describe_nodes(gateway: str, key: str | None = None) -> list[str]:
    """One line per node: its devices as probed (``--devices auto``) or simulated."""
    from gpufaas.client import ApiError, call  # noqa: PLC0415 - HTTP only once up

    try:
        nodes = call(f"{gateway}/v1/nodes", timeout=10, key=key)["nodes"]
    except ApiError as exc:
        return [f"(cannot list nodes: {exc})"]
    lines = []
    for n in nodes:
        devs = [
            f"{d['name']} {d['model']} ({d['memory_bytes'] / 2**30:.0f} GiB)" for d in n["devices"]
        ]
        lines.append(f"{n['node']}: {'; '.join(devs) or 'devices not reported yet'}")
    return lines


class NatsWatch:
    """When NATS was last seen down (the embedded server exited, or nothing accepted on
    any of its URLs): a service that exits during or soon after an outage waited for NATS
    and gave up, which is not a crash loop of its own."""

    def __init__(self, nats_url: str) -> None:
        self.endpoints = [
            (u.hostname or "127.0.0.1", u.port or DEFAULT_NATS_PORT)
            for u in (urlsplit(s.strip()) for s in nats_url.split(",") if s.strip())
        ]
        self.last_down = -math.inf

    def went_down(self) -> None:
        self.last_down = time.monotonic()

    def outage_within(self, window_s: float) -> bool:
        """Whether NATS is unreachable now or was within the last ``window_s``."""
        if not any(accepting(host, port) for host, port in self.endpoints):
            self.went_down()
            return True
        return time.monotonic() - self.last_down < window_s


def wait_until_stopped(
    sup: Supervisor, stop: StopSignal, console: Console, nats: NatsWatch | None = None
) -> int:
    """Block until a signal (exit 0); restart an exited process (the embedded NATS server
    too, with its config and store), give up only if one keeps crashing on its own."""
    while not stop.wait(0.5):
        dead = sup.exited()
        if dead is None:
            continue
        status = dead.proc.returncode
        if dead.name == "nats" and nats is not None:
            nats.went_down()
        # Exits while NATS is or just was away are the outage's, not the service's.
        counted = dead.name == "nats" or nats is None or not nats.outage_within(NATS_GRACE_S)
        if sup.restart(dead, limit=RESTART_LIMIT, window_s=RESTART_WINDOW_S, counted=counted):
            console.print(f"[yellow]{dead.name} exited with status {status}; restarted[/yellow]")
            continue
        console.print(
            f"[red]{dead.name} exited with status {status}[/red]; stopping everything. "
            f"Last lines of {dead.log_path}:\n{dead.log_tail()}"
        )
        return 1
    return 0


def check_options(opts: UpOptions) -> Config:
    """Refuse, before starting anything, what would fail later; returns the base config.

    Other ``GPUFAAS_*`` settings (timeouts, keep-alive, ...) pass through to every process.
    """
    if not port_free(opts.host, opts.http_port):
        raise UsageError(
            f"port {opts.http_port} (HTTP gateway) is in use; choose another with --http-port"
        )
    if opts.grpc_port and (
        opts.grpc_port in (opts.http_port, opts.nats_port)
        or not port_free(opts.host, opts.grpc_port)
    ):
        raise UsageError(
            f"port {opts.grpc_port} (gRPC gateway) is in use; choose another with --grpc-port "
            "(0: no gRPC)"
        )
    if opts.nats_url is None and not port_free(opts.host, opts.nats_port):
        raise UsageError(
            f"port {opts.nats_port} (NATS) is in use; choose another with --nats-port, "
            "or use a running server with --nats-url"
        )
    if opts.nodes < 1:
        raise UsageError("--nodes must be at least 1")
    try:
        parse_devices(opts.devices, opts.topology)
    except PlatformError as exc:
        flag = "--topology" if exc.field == "topology" else "--devices"
        raise UsageError(f"{exc.message} (flag {flag})") from None
    try:
        env = Config.from_env()
        # Ours alone (0700) or refused now, naming it, rather than by each service later.
        check_root(default_shm_dir() / f"up-{opts.http_port}")
    except PlatformError as exc:
        raise UsageError(exc.message) from None
    return env.replace(
        nats_url=opts.nats_url or f"nats://{opts.host}:{opts.nats_port}",
        http_host=opts.host,
        http_port=opts.http_port,
        grpc_port=opts.grpc_port,
        devices=opts.devices,
        topology=opts.topology,
        shm_dir=default_shm_dir() / f"up-{opts.http_port}",
        data_dir=opts.data_dir,
        log_format="json",
        auth=env.auth and opts.auth,
    )


def up(opts: UpOptions, console: Console) -> int:
    """Start NATS (unless given), the node services, the scheduler and the gateway."""
    base = check_options(opts)
    nats_url, shm_dir = base.nats_url, base.shm_dir
    stop = StopSignal()
    sup = Supervisor(opts.data_dir / "run" / f"up-{opts.http_port}")
    try:
        with console.status("[bold]Starting gpufaas…") as status:
            mesh: MeshSecrets | None = None
            if opts.nats_url is None:  # its users and their passwords, new at each start
                mesh = MeshSecrets.generate(sup.run_dir / "secrets", node_ids(opts.nodes))
                conf = write_config(opts.data_dir, opts.host, opts.nats_port, mesh=mesh)
                status.update(f"Starting NATS on port {opts.nats_port}…")
                nats = sup.spawn(
                    "nats", [str(nats_server_binary()), "-c", str(conf)], {}, ready=False
                )
                sup.wait_ready([nats], 30, probe=lambda _: accepting(opts.host, opts.nats_port))
            status.update("Checking the admin API key…")
            # As NATS admin: only it (and gateways) may write the keys bucket.
            admin_env = base.to_env() | (mesh.settings("admin") if mesh else {})
            key, created = start_auth(base.auth, admin_env, opts.data_dir, console)
            status.update("Starting node services, scheduler and gateway…")
            children: list[Child] = []
            for node_id in node_ids(opts.nodes):
                children += start_node(sup, base, node_id, mesh)
            for role in ("scheduler", "gateway"):
                env = base.to_env() | (mesh.settings(role) if mesh else {})
                children.append(sup.spawn_service(role, role, env))
            sup.wait_ready(children, READY_TIMEOUT_S)
        url = f"http://{opts.host}:{opts.http_port}"
        grpc = f"  gRPC {opts.host}:{opts.grpc_port}" if opts.grpc_port else ""
        console.print(
            f"[green]gpufaas is up[/green]  gateway [bold]{url}[/bold]{grpc}  NATS {nats_url}"
        )
        for line in describe_nodes(url, key):
            console.print(f"  {line}", soft_wrap=True, highlight=False)
        console.print(f"  logs: {sup.logs}")
        print_key(console, url, key, created, opts.data_dir)
        if opts.demo:
            from gpufaas.client import ApiError, deploy_demo  # noqa: PLC0415 - only with --demo

            try:
                deploy_demo(url, console, key)
            except ApiError as exc:
                console.print(f"[red]the demo model could not be deployed:[/red] {exc}")
                console.print(f"  the services' logs are in {sup.logs}")
                return 1
        console.print("Press Ctrl-C to stop.")
        return wait_until_stopped(sup, stop, console, NatsWatch(nats_url))
    except (StartError, PlatformError) as exc:
        console.print(f"[red]start-up failed:[/red] {exc}")
        return 1
    finally:
        with console.status("Stopping…"):
            sup.stop()
        shutil.rmtree(shm_dir, ignore_errors=True)
        console.print("gpufaas stopped; nothing left running.")


def node(config: Config, console: Console) -> int:
    """Run one node's services (used by the compose GPU node)."""
    stop = StopSignal()
    sup = Supervisor(config.data_dir / "run" / f"node-{config.node_id}")
    try:
        sup.wait_ready(start_node(sup, config, config.node_id), READY_TIMEOUT_S)
        console.print(f"node {config.node_id} is up (NATS {config.nats_url})")
        return wait_until_stopped(sup, stop, console, NatsWatch(config.nats_url))
    except StartError as exc:
        console.print(f"[red]node start-up failed:[/red] {exc}")
        return 1
    finally:
        sup.stop()
