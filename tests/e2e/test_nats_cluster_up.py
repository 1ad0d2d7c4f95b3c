"""``gpufaas up --nats-url`` on a 3-server NATS cluster: under load, SIGKILL of the server
that leads the most streams loses no request. The buckets and EVENTS have three replicas,
so a survivor takes each stream over; clients move to another server and a request in
flight at the kill is sent again (``rpc.request(resend=True)``)."""

from __future__ import annotations

import asyncio
import collections
import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import nats
import pytest

from gpufaas.launch import Up
from tests.nats_cluster import Cluster, nats_cluster

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CLIENTS = 4


async def stream_leaders(url: str) -> collections.Counter[str]:
    """How many of the platform's streams each server leads."""
    nc = await nats.connect(url.split(","))
    try:
        js = nc.jetstream()
        leaders: collections.Counter[str] = collections.Counter()
        for info in await js.streams_info():
            if info.cluster is not None and info.cluster.leader:
                leaders[info.cluster.leader] += 1
        return leaders
    finally:
        await nc.close()


class Load:
    """``CLIENTS`` threads invoking the demo in a loop until stopped; every outcome kept."""

    def __init__(self, up: Up) -> None:
        self.up = up
        self.stop = threading.Event()
        self.outcomes: list[tuple[float, int, str, float]] = []  # (sent, status, code, took)
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(CLIENTS)]

    def _run(self, client: int) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            text = f"client {client} request {n}"
            body = json.dumps(
                {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [text]}]}
            ).encode()
            req = urllib.request.Request(
                f"{self.up.url}/v2/models/minilm/infer", data=body, headers=self.up.headers
            )
            t0 = time.monotonic()
            try:
                with urllib.request.urlopen(req, timeout=60) as resp:
                    resp.read()
                    status, code = resp.status, ""
            except urllib.error.HTTPError as exc:
                answer = json.loads(exc.read() or b"{}")
                status, code = exc.code, f"{answer.get('code')}: {answer.get('error')}"
            except OSError as exc:
                status, code = 0, repr(exc)
            self.outcomes.append((t0, status, code, time.monotonic() - t0))

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(90)


@pytest.mark.timeout(240)
def test_killing_the_leading_nats_server_under_load_loses_nothing(tmp_path: Path) -> None:
    with nats_cluster(tmp_path / "nats") as cluster:
        run(cluster, tmp_path)


def run(cluster: Cluster, tmp_path: Path) -> None:
    with Up.start(tmp_path / "data", "--demo", "--devices", "cpu", "--nats-url", cluster.url) as up:
        up.wait_ready()
        leaders = asyncio.run(stream_leaders(cluster.url))
        assert leaders, "no stream reports a leader"
        victim = leaders.most_common(1)[0][0]
        with Load(up) as load:
            time.sleep(4)
            killed = time.monotonic()
            cluster.kill(victim)
            time.sleep(14)  # past the nodes' heartbeat TTL (10 s)
        after = [o for o in load.outcomes if o[0] + o[3] >= killed]
        failed = [o for o in load.outcomes if o[1] != 200]
        slowest = max((o[3] for o in after), default=0.0)
        print(
            f"killed {victim} (leader of {leaders[victim]} of {sum(leaders.values())} streams): "
            f"{len(load.outcomes)} requests, {len(after)} after the kill, {len(failed)} failed, "
            f"slowest after the kill {slowest:.2f} s"
        )
        assert not failed, (failed[:10], up.log()[-3000:])
        assert len(after) > CLIENTS  # requests kept being answered after the kill
        assert up.proc.poll() is None, up.log()[-3000:]
        survivor = asyncio.run(stream_leaders(cluster.url))
        assert victim not in survivor
