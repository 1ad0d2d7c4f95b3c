"""The supervisor's give-up rule: for a process's own crash loop, not for NATS outages."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from gpufaas.platform import NatsWatch
from gpufaas.supervisor import Supervisor

pytestmark = [pytest.mark.unit]


def test_exits_put_down_to_an_outage_do_not_count(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path)
    child = sup.spawn("svc", [sys.executable, "-c", "pass"], {}, ready=False)
    try:
        for _ in range(10):  # an outage: restarted every time
            child.proc.wait()
            assert sup.restart(child, limit=3, window_s=60, counted=False)
        assert child.restarts == []
        for _ in range(3):  # its own crash loop: three restarts, then give up
            child.proc.wait()
            assert sup.restart(child, limit=3, window_s=60)
        child.proc.wait()
        assert not sup.restart(child, limit=3, window_s=60)
    finally:
        sup.stop()


def test_nats_watch_sees_an_outage_and_remembers_it() -> None:
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        watch = NatsWatch(f"nats://127.0.0.1:{port}")
        assert not watch.outage_within(60)
        watch.went_down()  # the embedded server exited
        assert watch.outage_within(60)
        assert not watch.outage_within(0)
    # Nothing accepts any more: unreachable now.
    assert NatsWatch(f"nats://127.0.0.1:{port},nats://127.0.0.1:{port}").outage_within(0)
