"""JetStream replicas on a 3-server NATS cluster on loopback: every bucket, object store
and the EVENTS stream get 3 replicas, and killing the server that leads a bucket loses
no acknowledged KV write. A single server gets 1 replica."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import StorageType

from gpufaas.embedded import accepting, nats_server_binary
from gpufaas.launch import free_ports
from gpufaas.shared import constants as c
from gpufaas.shared import nats_auth
from gpufaas.shared.config import Config
from gpufaas.shared.jetstream import (
    ADMIN_USER,
    cluster_replicas,
    raise_replicas,
    wait_for_jetstream,
)
from gpufaas.shared.objects import ensure_object_bucket
from tests.conftest import NatsServer
from tests.support import eventually, eventually_blocking

pytestmark = [pytest.mark.integration]

BUCKETS = [
    c.KV_FUNCTIONS,
    c.KV_NODES,
    c.KV_TUBES,
    c.KV_TENSORS,
    c.KV_MEMORY,
    c.KV_PROFILES,
    c.KV_WORKFLOWS,
    c.KV_LEASES,
    c.KV_INFLIGHT,
    c.KV_REPLICAS,
    c.KV_KEYS,
]


@dataclass
class Cluster:
    """Three nats-servers routed to each other, each with its own JetStream store."""

    names: list[str]
    ports: list[int]
    procs: list[subprocess.Popen[bytes]]

    @property
    def url(self) -> str:
        return ",".join(f"nats://127.0.0.1:{p}" for p in self.ports)

    def url_of(self, name: str) -> str:
        return f"nats://127.0.0.1:{self.ports[self.names.index(name)]}"

    def kill(self, name: str) -> None:
        proc = self.procs[self.names.index(name)]
        proc.kill()
        proc.wait(10)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    ports = free_ports(6)
    clients, routes = ports[:3], ports[3:]
    names = [f"n{i}" for i in range(3)]
    procs = []
    for i, name in enumerate(names):
        store = tmp_path / name
        store.mkdir()
        peers = ", ".join(f'"nats://127.0.0.1:{r}"' for j, r in enumerate(routes) if j != i)
        conf = store / "nats.conf"
        conf.write_text(
            f'listen: "127.0.0.1:{clients[i]}"\nserver_name: {name}\n'
            f'jetstream {{ store_dir: "{store / "js"}" }}\n'
            f'cluster {{ name: gpufaas-test\n  listen: "127.0.0.1:{routes[i]}"\n'
            f"  routes: [{peers}] }}\n"
        )
        with (store / "nats.log").open("wb") as log:
            procs.append(
                subprocess.Popen(
                    [str(nats_server_binary()), "-c", str(conf)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
    try:
        listening = lambda: all(accepting("127.0.0.1", p) for p in clients)  # noqa: E731
        eventually_blocking(listening, 10, "the nats-servers to listen")
        yield Cluster(names, clients, procs)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


async def connect(url: str) -> NATS:
    return await nats.connect(url.split(","), max_reconnect_attempts=-1, reconnect_time_wait=0.2)


@pytest.fixture
async def nc(cluster: Cluster) -> AsyncIterator[NATS]:
    conn = await connect(cluster.url)
    # Routes gossip: once every server is listed, the cluster's size is known.
    await eventually(lambda: cluster_replicas(conn, 3) == 3, 10, "the cluster to form")
    yield conn
    await conn.close()


async def replicas_of(nc: NATS, stream: str) -> int:
    return (await nc.jetstream().stream_info(stream)).config.num_replicas or 1


@pytest.mark.slow
async def test_every_bucket_gets_three_replicas_and_survives_its_leader(
    cluster: Cluster, nc: NATS
) -> None:
    js = nc.jetstream()
    # Just formed: the start waits for JetStream (its meta leader) instead of failing.
    config = Config(nats_url=cluster.url, connect_deadline_s=15)
    buckets = await wait_for_jetstream(nc, config)
    for bucket in BUCKETS:
        assert await replicas_of(nc, f"KV_{bucket}") == 3, bucket
    assert await replicas_of(nc, c.EVENTS_STREAM) == 3
    await ensure_object_bucket(js, "replicated", replicas=3)
    assert await replicas_of(nc, "OBJ_replicated") == 3
    # A bucket an older start made with one replica is raised to three.
    await js.create_key_value(bucket="older", storage=StorageType.FILE)
    await raise_replicas(js, "KV_older", 3)
    assert await replicas_of(nc, "KV_older") == 3

    # Acknowledged writes, then SIGKILL the server that leads the bucket's stream.
    for i in range(20):
        await buckets.functions.put(f"acme.fn{i}", f"v{i}".encode())
    leader = (await js.stream_info(f"KV_{c.KV_FUNCTIONS}")).cluster
    assert leader is not None
    assert leader.leader is not None
    cluster.kill(leader.leader)
    survivor = next(n for n in cluster.names if n != leader.leader)
    other = await connect(cluster.url_of(survivor))
    try:

        async def all_read() -> bool:
            try:
                kv = await other.jetstream().key_value(c.KV_FUNCTIONS)
                got = [(await kv.get(f"acme.fn{i}")).value for i in range(20)]
            except (nats.errors.Error, TimeoutError):
                return False  # a new leader is being elected
            assert got == [f"v{i}".encode() for i in range(20)]
            return True

        async def written() -> bool:
            try:
                await buckets.functions.put("acme.after", b"x")
            except (nats.errors.Error, TimeoutError):
                return False
            return True

        await eventually(all_read, 15, "the writes read back from a survivor")
        # And the bucket takes writes again under its new leader.
        await eventually(written, 15, "a write after the leader's death")
    finally:
        await other.close()


async def test_a_single_server_gets_one_replica(nats_server: NatsServer) -> None:
    conn = await connect(nats_server.url)
    try:
        assert cluster_replicas(conn, 3) == 1
        assert nats_auth.user_name("admin") == ADMIN_USER  # who may raise replicas
        await wait_for_jetstream(conn, Config(nats_url=nats_server.url))
        assert await replicas_of(conn, f"KV_{c.KV_FUNCTIONS}") == 1
        assert await replicas_of(conn, c.EVENTS_STREAM) == 1
    finally:
        await conn.close()
