"""JetStream replicas on a 3-server NATS cluster on loopback: every bucket, object store
and the EVENTS stream get 3 replicas, and killing the server that leads a bucket loses
no acknowledged KV write. A single server gets 1 replica."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import StorageType

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
from tests.nats_cluster import Cluster, nats_cluster
from tests.support import eventually

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


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with nats_cluster(tmp_path) as started:
        yield started


async def connect(url: str) -> NATS:
    return await nats.connect(url.split(","), max_reconnect_attempts=-1, reconnect_time_wait=0.2)


@pytest.fixture
async def nc(cluster: Cluster) -> AsyncIterator[NATS]:
    # Routes gossip: once every server is listed, the cluster's size is known (generous:
    # three servers electing on a loaded 2-core box). nats-py keeps only the INFO of the
    # connect, so a connection made while one route was still forming would count two
    # servers for ever: each try connects afresh.
    conns: list[NATS] = []

    async def formed() -> bool:
        if conns:
            await conns.pop().close()
        conns.append(await connect(cluster.url))
        return cluster_replicas(conns[0], 3) == 3

    try:
        await eventually(formed, 30, "the cluster to form", interval=0.2)
        yield conns[0]
    finally:
        for conn in conns:
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
    # So is an object store, when the admin's start opens it again.
    await ensure_object_bucket(js, "older_objects", replicas=1)
    await ensure_object_bucket(js, "older_objects", replicas=3, reshape=True)
    assert await replicas_of(nc, "OBJ_older_objects") == 3

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
