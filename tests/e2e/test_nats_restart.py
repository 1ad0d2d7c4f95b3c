"""SIGKILL of the embedded nats-server: `gpufaas up` restarts it with its config and
store, the platform keeps running, requests in the gap fail fast with 503, and then
succeed again with the deployed function still there."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from gpufaas.launch import Up
from tests.support import eventually_blocking

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BODY = json.dumps(
    {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["nats restart"]}]}
).encode()


def nats_pids(up: Up) -> list[int]:
    """The embedded nats-server's pid (its command line names its config under the port)."""
    conf = f"nats/{up.nats_port}/nats.conf"
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "nats-server" in cmdline and conf in cmdline:
            found.append(int(entry.name))
    return found


def infer(up: Up) -> tuple[int, str, float]:
    """(status, error code or "", seconds) of one invocation of the demo."""
    req = urllib.request.Request(f"{up.url}/v2/models/minilm/infer", data=BODY, headers=up.headers)
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            resp.read()
            return resp.status, "", time.monotonic() - t0
    except urllib.error.HTTPError as exc:
        body = json.loads(exc.read() or b"{}")
        return exc.code, str(body.get("code", body)), time.monotonic() - t0


def test_killed_nats_is_restarted_and_the_platform_recovers(tmp_path: Path) -> None:
    with Up.start(tmp_path / "data", "--demo", "--devices", "cpu") as up:
        up.wait_ready()
        assert infer(up)[0] == 200
        [pid] = nats_pids(up)
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        seen: list[tuple[int, str, float]] = []

        def answered() -> bool:
            seen.append(infer(up))
            return seen[-1][0] == 200

        try:  # generous: a 2-core CI box under the rest of the suite can be slow to recover
            eventually_blocking(answered, 90, "an invocation to succeed after NATS restarted")
        except BaseException:
            print(f"seen (last 5): {seen[-5:]}\n{up.log()[-3000:]}")
            raise
        recovered = time.monotonic() - killed
        assert up.proc.poll() is None, up.log()
        assert "nats exited with status -9; restarted" in up.log()
        assert nats_pids(up) not in ([], [pid])
        # In the gap: fast 503 unavailable, never a hang to the request deadline. A request
        # sent before the gateway saw the connection drop is sent again once it is back
        # (``rpc.request(resend=True)``) and answered: no 504.
        gap = seen[:-1]
        for status, code, took in gap:
            assert (status, code) == (503, "unavailable"), seen
            assert took < 5, seen
        slowest = max((took for _, _, took in gap), default=0.0)
        print(
            f"recovered {recovered:.2f} s after the kill; {len(seen) - 1} fast 503s (max {slowest:.3f} s)"
        )
        # The services rode the outage out: none exited.
        assert up.log().count("exited with status") == 1, up.log()
        assert recovered < 60, seen
        # Every following request succeeds, and the function is still deployed.
        assert [infer(up)[0] for _ in range(5)] == [200] * 5
