"""`gpufaas up` as a user runs it: real processes, HTTP, signals, nothing left behind."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gpufaas.client import sse
from gpufaas.shared.config import default_shm_dir
from tests.conftest import NatsServer, free_port, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

GPUFAAS = str(Path(sys.executable).parent / "gpufaas")


def http(url: str, body: Any = None, method: str | None = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def pids_mentioning(text: str) -> list[int]:
    """Processes whose command line contains ``text`` (our children carry the data dir or port)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (entry / "environ").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if text in cmdline or text in environ:
            found.append(int(entry.name))
    return found


class Up:
    def __init__(
        self,
        tmp_path: Path,
        *args: str,
        ports: tuple[int, int] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.http_port, self.nats_port = ports or (free_port(), free_port())
        self.data_dir = tmp_path / "data"
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.log = tmp_path / f"up-{self.http_port}.log"
        argv = [
            GPUFAAS,
            "up",
            "--http-port",
            str(self.http_port),
            "--nats-port",
            str(self.nats_port),
            "--data-dir",
            str(self.data_dir),
            *args,
        ]
        self.out = open(self.log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv,
            stdout=self.out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "COLUMNS": "200", **(env or {})},
        )
        self.shm = default_shm_dir() / f"up-{self.http_port}"

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        # A line of its own: a traceback quoting the source that prints it does not count.
        while not re.search(
            r"^Press Ctrl-C to stop\.$", self.log.read_text(errors="replace"), re.M
        ):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"gpufaas up did not become ready:\n{self.log.read_text()}")
            time.sleep(0.1)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        rc = self.proc.wait(60)
        self.out.close()
        return rc


@pytest.fixture
def up_sim(tmp_path: Path) -> Iterator[Up]:
    up = Up(tmp_path, "--demo", "--devices", "sim:2", "--nodes", "2")
    try:
        up.wait_ready()
        yield up
    finally:
        up.stop()


def test_up_demo_invoke_and_clean_stop(up_sim: Up) -> None:
    up = up_sim
    text = up.log.read_text()
    assert up.url in text
    assert f"nats://127.0.0.1:{up.nats_port}" in text
    assert f"curl -s {up.url}/v2/models/minilm/infer" in text

    status, nodes = http(f"{up.url}/v1/nodes")
    assert status == 200
    assert [n["node"] for n in nodes["nodes"]] == ["node-0", "node-1"]
    for n in nodes["nodes"]:
        assert [d["name"] for d in n["devices"]] == ["host", "gpu:0", "gpu:1"]

    # The curl line's request, as printed.
    curl_body = text.split(" -d '", 1)[1].split("'", 1)[0]
    status, res = http(f"{up.url}/v2/models/minilm/infer", json.loads(curl_body))
    assert status == 200, res
    vec = np.asarray(res["outputs"][0]["data"], dtype=np.float32)
    assert vec.shape == (384,)
    assert abs(float(np.linalg.norm(vec)) - 1) < 1e-4

    cli = subprocess.run(
        [GPUFAAS, "status", "--url", up.url],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
        check=False,
    )
    assert cli.returncode == 0, cli.stderr
    assert "minilm" in cli.stdout
    assert "node-1" in cli.stdout
    assert "memory (per device" in cli.stdout  # the pools of every node's memory service
    assert all(n["memory"]["pools"].keys() == {"gpu:0", "gpu:1", "host"} for n in nodes["nodes"])
    cli = subprocess.run(
        [GPUFAAS, "invoke", "minilm", "hello", "--url", up.url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert cli.returncode == 0, cli.stderr
    assert "embedding FP32 [1, 384]" in cli.stdout

    wf = up.data_dir / "wf.json"  # a one-step workflow through the CLI
    wf.write_text(
        json.dumps(
            {
                "name": "embed",
                "steps": [{"name": "e", "function": "minilm", "inputs": {"text": "$input.text"}}],
            }
        )
    )
    for argv in (["workflow", "deploy", str(wf)], ["workflow", "invoke", "embed", "hi"]):
        cli = subprocess.run(
            [GPUFAAS, *argv, "--url", up.url],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert cli.returncode == 0, cli.stdout + cli.stderr
    assert "embedding FP32 [1, 384]" in cli.stdout
    assert "e: minilm on node-" in cli.stdout

    events = subprocess.Popen(
        [GPUFAAS, "events", "--replay", "all", "--kinds", "function.*", "--url", up.url],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    try:
        assert events.stdout is not None
        first = events.stdout.readline()
        assert "function.deployed" in first
        assert '"function": "minilm"' in first
    finally:
        events.kill()
        events.communicate()

    pids = pids_mentioning(str(up.data_dir))
    assert len(pids) >= 10  # nats + 2 x 4 node services + scheduler + gateway (+ the CLI)
    assert up.stop() == 0
    assert "nothing left running" in up.log.read_text()
    assert [p for p in pids if Path(f"/proc/{p}").exists()] == []
    assert not (default_shm_dir() / f"up-{up.http_port}").exists()


def test_state_survives_a_restart_of_up(tmp_path: Path) -> None:
    first = Up(tmp_path, "--demo", "--devices", "cpu")
    first.wait_ready()
    assert first.stop(signal.SIGINT) == 0
    second = Up(tmp_path, "--devices", "cpu", ports=(first.http_port, first.nats_port))
    try:
        second.wait_ready()
        status, listed = http(f"{second.url}/v1/functions")
        assert status == 200
        assert [f["spec"]["name"] for f in listed["functions"]] == ["minilm"]
        status, res = http(
            f"{second.url}/v2/models/minilm/infer",
            {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["x"]}]},
        )
        assert status == 200, res
    finally:
        assert second.stop() == 0


def test_taken_port_fails_at_once_naming_the_flag(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        t0 = time.monotonic()
        res = subprocess.run(
            [GPUFAAS, "up", "--http-port", str(port), "--data-dir", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert res.returncode == 2
        assert f"port {port}" in res.stdout
        assert "--http-port" in res.stdout
        assert time.monotonic() - t0 < 20
        res = subprocess.run(
            [
                GPUFAAS,
                "up",
                "--nats-port",
                str(port),
                "--http-port",
                str(free_port()),
                "--data-dir",
                str(tmp_path),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert res.returncode == 2
        assert f"port {port}" in res.stdout
        assert "--nats-port" in res.stdout


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--devices", "sim:99"], "--devices"),
        (["--devices", "gpu"], "--devices"),
        (["--devices", "sim:2", "--topology", "nope"], "--topology"),
        (["--nodes", "0"], "--nodes"),
    ],
)
def test_bad_flags_fail_at_once(tmp_path: Path, flags: list[str], says: str) -> None:
    res = subprocess.run(
        [
            GPUFAAS,
            "up",
            "--http-port",
            str(free_port()),
            "--nats-port",
            str(free_port()),
            "--data-dir",
            str(tmp_path),
            *flags,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 2, res.stdout
    assert says in res.stdout
    assert not (tmp_path / "run").exists()  # nothing was started


def test_killed_supervisor_leaves_nothing_running(tmp_path: Path) -> None:
    up = Up(tmp_path, "--devices", "cpu")
    up.wait_ready()
    pids = pids_mentioning(str(up.data_dir))
    assert up.stop(signal.SIGKILL) == -signal.SIGKILL
    deadline = time.monotonic() + 30
    while [p for p in pids if Path(f"/proc/{p}").exists() and _alive(p)]:
        assert time.monotonic() < deadline, "children outlived a SIGKILLed supervisor"
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_each_service_runs_alone_and_stops_cleanly(tmp_path: Path, nats_server: NatsServer) -> None:
    env = {
        **os.environ,
        "GPUFAAS_NATS_URL": nats_server.url,
        "GPUFAAS_NODE_ID": "solo",
        "GPUFAAS_SHM_DIR": str(tmp_path / "shm"),
        "GPUFAAS_DEVICES": "sim:1",
    }
    procs = {}
    for svc, argv in [
        ("memory", [GPUFAAS, "memory"]),
        ("transfer", [sys.executable, "-m", "gpufaas.transfer"]),
    ]:
        ready = tmp_path / f"{svc}.ready"
        procs[svc] = (
            subprocess.Popen(
                argv,
                env={**env, "GPUFAAS_READY_FILE": str(ready)},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            ),
            ready,
        )
    for svc, (proc, ready) in procs.items():
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None, f"{svc} exited early"
            assert time.monotonic() < deadline, f"{svc} not ready"
            time.sleep(0.05)
    for proc, _ in procs.values():
        proc.send_signal(signal.SIGTERM)
    assert [proc.wait(30) for proc, _ in procs.values()] == [0, 0]


def test_up_with_an_existing_nats(tmp_path: Path, nats_server: NatsServer) -> None:
    up = Up(tmp_path, "--devices", "cpu", "--nats-url", nats_server.url)
    try:
        up.wait_ready()
        assert nats_server.url in up.log.read_text()
        assert not (up.data_dir / "run" / f"up-{up.http_port}" / "logs" / "nats.log").exists()
        assert http(f"{up.url}/v2/health/ready")[0] == 200
    finally:
        assert up.stop() == 0
    assert nats_server.proc.poll() is None  # ours to start, not to stop


def test_crashed_services_are_restarted_and_recover(tmp_path: Path) -> None:
    up = Up(tmp_path, "--demo", "--devices", "cpu")
    try:
        up.wait_ready()
        before = http(f"{up.url}/v1/nodes")[1]["nodes"][0]["services"]
        for svc in ("worker", "tensorstore"):
            os.kill(before[svc]["pid"], signal.SIGKILL)

        def restarted() -> bool:
            nodes = http(f"{up.url}/v1/nodes")[1]["nodes"]
            now = nodes[0]["services"] if nodes else {}
            return all(
                svc in now and now[svc]["pid"] != before[svc]["pid"]
                for svc in ("worker", "tensorstore")
            )

        wait_for(restarted, 60, "the killed services to come back")
        req = urllib.request.Request(
            f"{up.url}/v2/models/minilm/infer",
            data=json.dumps(
                {
                    "inputs": [
                        {
                            "name": "text",
                            "datatype": "BYTES",
                            "shape": [1],
                            "data": ["after a crash"],
                        }
                    ]
                }
            ).encode(),
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert resp.status == 200
            assert resp.headers["Gpufaas-Cold"] == "1"  # the new worker built the instance
        assert "node-0.worker exited with status -9; restarted" in up.log.read_text()
        # The restarted tensor store recovered its index from shared memory: the cold
        # start re-registered the model without storing a byte.
        for kind, data in sse(f"{up.url}/v1/events?replay=all&kinds=tensor.deduplicated"):
            assert kind == "tensor.deduplicated"
            assert json.loads(data)["data"]["bytes_saved"] > 80 * 2**20
            break
    finally:
        assert up.stop() == 0


def test_store_killed_mid_load_loses_nothing(tmp_path: Path) -> None:
    """SIGKILL the tensor store while it writes a model's segment: no orphan, no leak."""
    # A short deploy deadline: the worker waits that long for the dead store to answer.
    up = Up(tmp_path, "--devices", "cpu", env={"GPUFAAS_DEPLOY_TIMEOUT_S": "8"})
    try:
        up.wait_ready()
        store_pid = http(f"{up.url}/v1/nodes")[1]["nodes"][0]["services"]["tensorstore"]["pid"]
        tensors = up.shm / "tensors" / "node-0"
        result: list[tuple[int, Any]] = []
        deploy = threading.Thread(
            target=lambda: result.append(
                http(
                    f"{up.url}/v1/functions",
                    {"name": "minilm", "model": {"builtin": "all-minilm-l6-v2"}},
                )
            )
        )
        deploy.start()
        deadline = time.monotonic() + 30
        while not any(p.name.endswith(".tmp") for p in tensors.glob(".*")) and deploy.is_alive():
            assert time.monotonic() < deadline
            time.sleep(0.001)
        os.kill(store_pid, signal.SIGKILL)  # mid-write, as a rule (the file is in flight)
        deploy.join(120)
        (status, body) = result[0]
        failed = status != 201  # the kill can land just after the store answered
        if failed:  # a typed error, and nothing was written to the registry
            assert status in (503, 504), body
            assert http(f"{up.url}/v1/functions")[1]["functions"] == []

        def store_back() -> bool:
            services = http(f"{up.url}/v1/nodes")[1]["nodes"][0]["services"]
            return bool(services.get("tensorstore", {}).get("pid", store_pid) != store_pid)

        wait_for(store_back, 60, "the tensor store to be restarted")
        files = sorted(p.name for p in tensors.iterdir() if p.is_file())
        assert not [f for f in files if f.startswith(".")]  # no half-written segment
        segments = [f for f in files if not f.endswith(".idx.json")]
        assert all(f"{s}.idx.json" in files for s in segments)  # none without its index
        if failed:
            status, body = http(
                f"{up.url}/v1/functions",
                {"name": "minilm", "model": {"builtin": "all-minilm-l6-v2"}},
            )
            assert status == 201, body
        store = http(f"{up.url}/v1/nodes")[1]["nodes"][0]["tensor_store"]["host"]
        assert store["bytes_stored"] == body["model_bytes"]  # stored once, nothing leaked
        assert store["leases"] <= 1
    finally:
        assert up.stop() == 0


def test_worker_killed_mid_load_leaks_nothing(tmp_path: Path) -> None:
    """SIGKILL the worker while the store registers for it: its lease lapses, bytes are freed."""
    fast = {
        "GPUFAAS_DEPLOY_TIMEOUT_S": "8",
        "GPUFAAS_NODE_TTL_S": "3",
        "GPUFAAS_TENSOR_KEEP_ALIVE_S": "1",
        "GPUFAAS_RECLAIM_INTERVAL_S": "0.5",
    }
    up = Up(tmp_path, "--devices", "cpu", env=fast)
    demo = {"name": "minilm", "model": {"builtin": "all-minilm-l6-v2"}}
    try:
        up.wait_ready()
        worker_pid = http(f"{up.url}/v1/nodes")[1]["nodes"][0]["services"]["worker"]["pid"]
        tensors = up.shm / "tensors" / "node-0"
        result: list[tuple[int, Any]] = []
        deploy = threading.Thread(
            target=lambda: result.append(http(f"{up.url}/v1/functions", demo))
        )
        deploy.start()
        deadline = time.monotonic() + 30
        while not any(p.name.endswith(".tmp") for p in tensors.glob(".*")) and deploy.is_alive():
            assert time.monotonic() < deadline
            time.sleep(0.001)
        os.kill(worker_pid, signal.SIGKILL)  # the store is writing the segment for it
        deploy.join(120)
        status, body = result[0]
        assert status in (201, 503, 504), body

        def store() -> dict[str, Any]:
            nodes = http(f"{up.url}/v1/nodes")[1]["nodes"]
            host: dict[str, Any] = (nodes[0].get("tensor_store") or {}).get("host") or {}
            return host

        # The dead worker's lease lapses and, after the keep-alive, its bytes are freed.
        wait_for(
            lambda: store().get("leases") == 0 and store().get("bytes_stored") == 0,
            60,
            "the dead worker's lease to lapse and its tensors to be reclaimed",
        )
        if status != 201:
            status, body = http(f"{up.url}/v1/functions", demo)
            assert status == 201, body
        status, res = http(
            f"{up.url}/v2/models/minilm/infer",
            {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["x"]}]},
        )
        assert status == 200, res
        assert store()["leases"] == 1
    finally:
        assert up.stop() == 0
