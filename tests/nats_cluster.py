"""Three local nats-servers routed into one cluster on loopback, each with its own
JetStream store: for the tests of replicas and of a server's death."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gpufaas.embedded import accepting, nats_server_binary
from gpufaas.launch import free_ports
from tests.support import eventually_blocking


@dataclass
class Cluster:
    """Three nats-servers routed to each other, each with its own JetStream store."""

    names: list[str]
    ports: list[int]
    procs: list[subprocess.Popen[bytes]]

    @property
    def url(self) -> str:
        return ",".join(f"nats://127.0.0.1:{p}" for p in self.ports)

    def url_of(self, name: str) -> str:
        return f"nats://127.0.0.1:{self.ports[self.names.index(name)]}"

    def kill(self, name: str) -> None:
        proc = self.procs[self.names.index(name)]
        proc.kill()
        proc.wait(10)


@contextlib.contextmanager
def nats_cluster(root: Path) -> Iterator[Cluster]:
    """Start the three servers (stores and logs under ``root``); kill them at exit."""
    ports = free_ports(6)
    clients, routes = ports[:3], ports[3:]
    names = [f"n{i}" for i in range(3)]
    procs = []
    for i, name in enumerate(names):
        store = root / name
        store.mkdir(parents=True)
        peers = ", ".join(f'"nats://127.0.0.1:{r}"' for j, r in enumerate(routes) if j != i)
        conf = store / "nats.conf"
        conf.write_text(
            f'listen: "127.0.0.1:{clients[i]}"\nserver_name: {name}\n'
            f'jetstream {{ store_dir: "{store / "js"}" }}\n'
            f'cluster {{ name: gpufaas-test\n  listen: "127.0.0.1:{routes[i]}"\n'
            f"  routes: [{peers}] }}\n"
        )
        with (store / "nats.log").open("wb") as log:
            procs.append(
                subprocess.Popen(
                    [str(nats_server_binary()), "-c", str(conf)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
    try:
        listening = lambda: all(accepting("127.0.0.1", p) for p in clients)  # noqa: E731
        eventually_blocking(listening, 10, "the nats-servers to listen")
        yield Cluster(names, clients, procs)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
