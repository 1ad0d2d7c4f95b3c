"""`gpufaas up` as a user runs it: real processes, HTTP, signals, nothing left behind."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gpufaas.client import sse
from gpufaas.launch import Up
from gpufaas.shared.config import default_shm_dir
from tests.conftest import NatsServer, free_port
from tests.support import eventually_blocking

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

GPUFAAS = str(Path(sys.executable).parent / "gpufaas")


def http(up: Up, url: str, body: Any = None, method: str | None = None) -> tuple[int, Any]:
    """One JSON request to ``up``'s gateway with its admin key: (status, decoded body)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=up.headers)
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


def anonymous_nats(port: int) -> str:
    """What the NATS server answers a client that connects with no credentials."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s, s.makefile("rb") as f:
        f.readline()  # INFO
        s.sendall(b'CONNECT {"verbose":false}\r\nPING\r\n')
        return f.readline().decode()


def admin_key_shown(up: Up, text: str) -> str:
    """The admin key: shown in the banner with its curl line, kept 0600, and needed."""
    key = up.api_key
    assert key is not None
    assert key in text
    assert (up.data_dir / "admin.key").stat().st_mode & 0o777 == 0o600
    assert f'curl -s -H "Authorization: Bearer {key}" {up.url}/v2/models/minilm/infer' in text
    with pytest.raises(urllib.error.HTTPError) as anonymous:  # no key, no answer
        urllib.request.urlopen(f"{up.url}/v1/functions", timeout=60)
    anonymous.value.close()
    assert anonymous.value.code == 401
    return key


@pytest.fixture
def up_sim(tmp_path: Path) -> Iterator[Up]:
    with Up.start(tmp_path / "data", "--demo", "--devices", "sim:2", "--nodes", "2") as up:
        up.wait_ready()
        yield up


def test_up_demo_invoke_and_clean_stop(up_sim: Up) -> None:
    up = up_sim
    text = up.log()
    assert up.url in text
    assert f"nats://127.0.0.1:{up.nats_port}" in text
    key = admin_key_shown(up, text)

    status, nodes = http(up, f"{up.url}/v1/nodes")
    assert status == 200
    assert [n["node"] for n in nodes["nodes"]] == ["node-0", "node-1"]
    for n in nodes["nodes"]:
        assert [d["name"] for d in n["devices"]] == ["host", "gpu:0", "gpu:1"]

    # The curl line's request, as printed.
    curl_body = text.split(" -d '", 1)[1].split("'", 1)[0]
    status, res = http(up, f"{up.url}/v2/models/minilm/infer", json.loads(curl_body))
    assert status == 200, res
    vec = np.asarray(res["outputs"][0]["data"], dtype=np.float32)
    assert vec.shape == (384,)
    assert abs(float(np.linalg.norm(vec)) - 1) < 1e-4

    cli = subprocess.run(  # the key found in the data directory
        [GPUFAAS, "status", "--url", up.url],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200", "GPUFAAS_DATA_DIR": str(up.data_dir)},
        check=False,
    )
    assert cli.returncode == 0, cli.stderr
    assert "minilm" in cli.stdout
    assert "node-1" in cli.stdout
    assert "memory (per device" in cli.stdout  # the pools of every node's memory service
    assert all(n["memory"]["pools"].keys() == {"gpu:0", "gpu:1", "host"} for n in nodes["nodes"])
    cli = subprocess.run(  # the key from the environment
        [GPUFAAS, "invoke", "minilm", "hello", "--url", up.url],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "GPUFAAS_API_KEY": key},
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
        cli = subprocess.run(  # the key as a flag
            [GPUFAAS, *argv, "--url", up.url, "--api-key", key],
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
        env={**os.environ, "COLUMNS": "200", "GPUFAAS_API_KEY": key},
    )
    try:
        assert events.stdout is not None
        first = events.stdout.readline()
        assert "function.deployed" in first
        assert '"function": "minilm"' in first
    finally:
        events.kill()
        events.communicate()

    # Every process above used its own NATS user; no one may connect without one, and no
    # role's real traffic was refused (the server logs each permission violation).
    assert "Authorization Violation" in anonymous_nats(up.nats_port)
    nats_log = up.data_dir / "run" / f"up-{up.http_port}" / "logs" / "nats.log"
    assert "Violation - " not in nats_log.read_text()

    pids = pids_mentioning(str(up.data_dir))
    assert len(pids) >= 10  # nats + 2 x 4 node services + scheduler + gateway (+ the CLI)
    assert up.stop() == 0
    assert "nothing left running" in up.log()
    assert [p for p in pids if Path(f"/proc/{p}").exists()] == []
    assert not (default_shm_dir() / f"up-{up.http_port}").exists()


def test_state_survives_a_restart_of_up(tmp_path: Path) -> None:
    first = Up.start(tmp_path / "data", "--demo", "--devices", "cpu")
    first.wait_ready()
    assert first.stop(signal.SIGINT) == 0
    second = Up.start(first.data_dir, "--devices", "cpu", ports=(first.http_port, first.nats_port))
    try:
        second.wait_ready()
        assert second.api_key == first.api_key  # the admin key is kept across restarts
        status, listed = http(second, f"{second.url}/v1/functions")
        assert status == 200
        assert [f["spec"]["name"] for f in listed["functions"]] == ["minilm"]
        status, res = http(
            second,
            f"{second.url}/v2/models/minilm/infer",
            {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["x"]}]},
        )
        assert status == 200, res
    finally:
        assert second.stop() == 0


def test_taken_port_fails_at_once_naming_the_flag(tmp_path: Path) -> None:
    def up(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [GPUFAAS, "up", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        t0 = time.monotonic()
        res = up("--http-port", str(port), "--data-dir", str(tmp_path))
        assert res.returncode == 2
        assert f"port {port}" in res.stdout
        assert "--http-port" in res.stdout
        assert time.monotonic() - t0 < 20
        res = up(
            "--nats-port", str(port), "--http-port", str(free_port()), "--data-dir", str(tmp_path)
        )
        assert res.returncode == 2
        assert f"port {port}" in res.stdout
        assert "--nats-port" in res.stdout
        res = up("--grpc-port", str(port), "--http-port", str(free_port()))
        assert res.returncode == 2
        assert f"port {port}" in res.stdout
        assert "--grpc-port" in res.stdout


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
    up = Up.start(tmp_path / "data", "--devices", "cpu")
    up.wait_ready()
    pids = pids_mentioning(str(up.data_dir))
    assert up.stop(signal.SIGKILL) == -signal.SIGKILL
    eventually_blocking(
        lambda: not [p for p in pids if Path(f"/proc/{p}").exists() and _alive(p)],
        30,
        "the children of a SIGKILLed supervisor to exit",
    )


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def ready_or_exited(proc: subprocess.Popen[bytes], ready: Path) -> bool:
    return ready.exists() or proc.poll() is not None


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
        eventually_blocking(partial(ready_or_exited, proc, ready), 60, f"{svc} to be ready")
        assert proc.poll() is None, f"{svc} exited early"
    for proc, _ in procs.values():
        proc.send_signal(signal.SIGTERM)
    assert [proc.wait(30) for proc, _ in procs.values()] == [0, 0]


def test_up_with_an_existing_nats(tmp_path: Path, nats_server: NatsServer) -> None:
    up = Up.start(tmp_path / "data", "--devices", "cpu", "--nats-url", nats_server.url)
    try:
        up.wait_ready()
        assert nats_server.url in up.log()
        assert not (up.data_dir / "run" / f"up-{up.http_port}" / "logs" / "nats.log").exists()
        assert http(up, f"{up.url}/v2/health/ready")[0] == 200
    finally:
        assert up.stop() == 0
    assert nats_server.proc.poll() is None  # ours to start, not to stop


def test_crashed_services_are_restarted_and_recover(tmp_path: Path) -> None:
    up = Up.start(tmp_path / "data", "--demo", "--devices", "cpu")
    try:
        up.wait_ready()
        before = http(up, f"{up.url}/v1/nodes")[1]["nodes"][0]["services"]
        for svc in ("worker", "tensorstore"):
            os.kill(before[svc]["pid"], signal.SIGKILL)

        def restarted() -> bool:
            nodes = http(up, f"{up.url}/v1/nodes")[1]["nodes"]
            now = nodes[0]["services"] if nodes else {}
            return all(
                svc in now and now[svc]["pid"] != before[svc]["pid"]
                for svc in ("worker", "tensorstore")
            )

        eventually_blocking(restarted, 60, "the killed services to come back")
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
            headers=up.headers,
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert resp.status == 200
            assert resp.headers["Gpufaas-Cold"] == "1"  # the new worker built the instance
        assert "node-0.worker exited with status -9; restarted" in up.log()
        # The restarted tensor store recovered its index from shared memory: the cold
        # start re-registered the model without storing a byte.
        events = f"{up.url}/v1/events?replay=all&kinds=tensor.deduplicated"
        for kind, data in sse(events, up.api_key):
            assert kind == "tensor.deduplicated"
            assert json.loads(data)["data"]["bytes_saved"] > 80 * 2**20
            break
    finally:
        assert up.stop() == 0


def test_store_killed_mid_load_loses_nothing(tmp_path: Path) -> None:
    """SIGKILL the tensor store while it writes a model's segment: no orphan, no leak."""
    # A short deploy deadline: the worker waits that long for the dead store to answer.
    up = Up.start(tmp_path / "data", "--devices", "cpu", env={"GPUFAAS_DEPLOY_TIMEOUT_S": "8"})
    try:
        up.wait_ready()
        store_pid = http(up, f"{up.url}/v1/nodes")[1]["nodes"][0]["services"]["tensorstore"]["pid"]
        tensors = up.shm_dir / "tensors" / "node-0"
        result: list[tuple[int, Any]] = []
        deploy = threading.Thread(
            target=lambda: result.append(
                http(
                    up,
                    f"{up.url}/v1/functions",
                    {"name": "minilm", "model": {"builtin": "all-minilm-l6-v2"}},
                )
            )
        )
        deploy.start()
        eventually_blocking(
            lambda: (
                any(p.name.endswith(".tmp") for p in tensors.glob(".*")) or not deploy.is_alive()
            ),
            30,
            "the store to write the segment (or the deploy to end)",
            interval=0.001,  # the write is brief: look often to catch it in flight
        )
        os.kill(store_pid, signal.SIGKILL)  # mid-write, as a rule (the file is in flight)
        deploy.join(120)
        (status, body) = result[0]
        failed = status != 201  # the kill can land just after the store answered
        if failed:  # a typed error, and nothing was written to the registry
            assert status in (503, 504), body
            assert http(up, f"{up.url}/v1/functions")[1]["functions"] == []

        def store_back() -> bool:
            services = http(up, f"{up.url}/v1/nodes")[1]["nodes"][0]["services"]
            return bool(services.get("tensorstore", {}).get("pid", store_pid) != store_pid)

        eventually_blocking(store_back, 60, "the tensor store to be restarted")
        files = sorted(p.name for p in tensors.iterdir() if p.is_file())
        assert not [f for f in files if f.startswith(".")]  # no half-written segment
        segments = [f for f in files if not f.endswith(".idx.json")]
        assert all(f"{s}.idx.json" in files for s in segments)  # none without its index
        if failed:
            status, body = http(
                up,
                f"{up.url}/v1/functions",
                {"name": "minilm", "model": {"builtin": "all-minilm-l6-v2"}},
            )
            assert status == 201, body
        store = http(up, f"{up.url}/v1/nodes")[1]["nodes"][0]["tensor_store"]["host"]
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
    up = Up.start(tmp_path / "data", "--devices", "cpu", env=fast)
    demo = {"name": "minilm", "model": {"builtin": "all-minilm-l6-v2"}}
    try:
        up.wait_ready()
        worker_pid = http(up, f"{up.url}/v1/nodes")[1]["nodes"][0]["services"]["worker"]["pid"]
        tensors = up.shm_dir / "tensors" / "node-0"
        result: list[tuple[int, Any]] = []
        deploy = threading.Thread(
            target=lambda: result.append(http(up, f"{up.url}/v1/functions", demo))
        )
        deploy.start()
        eventually_blocking(
            lambda: (
                any(p.name.endswith(".tmp") for p in tensors.glob(".*")) or not deploy.is_alive()
            ),
            30,
            "the store to write the segment (or the deploy to end)",
            interval=0.001,  # the write is brief: look often to catch it in flight
        )
        os.kill(worker_pid, signal.SIGKILL)  # the store is writing the segment for it
        deploy.join(120)
        status, body = result[0]
        assert status in (201, 503, 504), body

        def store() -> dict[str, Any]:
            nodes = http(up, f"{up.url}/v1/nodes")[1]["nodes"]
            host: dict[str, Any] = (nodes[0].get("tensor_store") or {}).get("host") or {}
            return host

        # The dead worker's lease lapses and, after the keep-alive, its bytes are freed.
        eventually_blocking(
            lambda: store().get("leases") == 0 and store().get("bytes_stored") == 0,
            60,
            "the dead worker's lease to lapse and its tensors to be reclaimed",
        )
        if status != 201:  # deployed again once the killed worker is back (a 503 until then)
            tries: list[tuple[int, Any]] = []

            def redeployed() -> bool:
                tries.append(http(up, f"{up.url}/v1/functions", demo))
                assert tries[-1][0] in (201, 503), tries[-1]
                return tries[-1][0] == 201

            eventually_blocking(redeployed, 60, "a deploy once the worker is back", interval=1)
        status, res = http(
            up,
            f"{up.url}/v2/models/minilm/infer",
            {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["x"]}]},
        )
        assert status == 200, res
        assert store()["leases"] == 1
    finally:
        assert up.stop() == 0
