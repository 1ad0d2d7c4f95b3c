"""Shared fixtures: a real nats-server on a free port, and free ports."""

from __future__ import annotations

import importlib.util
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gpufaas.embedded import accepting, nats_server_binary, write_config
from tests.support import eventually_blocking


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class NatsServer:
    """A real nats-server with JetStream, started for one test."""

    url: str
    port: int
    proc: subprocess.Popen[bytes]
    conf: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def start(self) -> None:
        """(Re)start on the same port and store."""
        self.proc = subprocess.Popen(
            [str(nats_server_binary()), "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        eventually_blocking(lambda: accepting("127.0.0.1", self.port), 10, "nats-server")


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    port = free_port()
    conf = write_config(tmp_path / "data", "127.0.0.1", port)
    server = NatsServer(f"nats://127.0.0.1:{port}", port, None, conf)  # type: ignore[arg-type]
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def minilm_pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo MiniLM exported with torch.export (scripts/export_minilm.py), once a session.

    Its weights have the names, dtypes and bytes of the packaged model.safetensors.
    """
    script = Path(__file__).parents[1] / "scripts" / "export_minilm.py"
    spec = importlib.util.spec_from_file_location("export_minilm", script)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path_factory.mktemp("minilm-pt2")
    assert module.main([str(out)]) == 0
    return out / "model.pt2"
