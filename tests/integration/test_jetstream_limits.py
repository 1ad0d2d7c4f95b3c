"""JetStream's limits: every bucket, object store and EVENTS carries its ``max_bytes`` (and
``max_age`` where records lapse); existing streams are brought up to date at start; a full
bucket is a 507 naming it."""

from __future__ import annotations

import json
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import DiscardPolicy

from gpufaas.embedded import accepting, nats_server_binary
from gpufaas.shared import constants as c
from gpufaas.shared.config import Config
from gpufaas.shared.errors import InvalidArgument, ResourceExhausted, http_status
from gpufaas.shared.jetstream import ensure_jetstream, stream_max_bytes, wait_for_jetstream
from gpufaas.shared.kv import Bucket, Codec
from gpufaas.shared.objects import ensure_object_bucket
from tests.conftest import NatsServer, free_port
from tests.support import eventually_blocking

pytestmark = pytest.mark.integration


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[NATS]:
    conn = await nats.connect(nats_server.url)
    yield conn
    await conn.close()


async def test_every_stream_carries_its_limits(nats_server: NatsServer, nc: NATS) -> None:
    config = Config(nats_url=nats_server.url, node_ttl_s=7.0, tube_ttl_s=60.0)
    await wait_for_jetstream(nc, config)
    js = nc.jetstream()
    await ensure_object_bucket(js, "tubes", max_bytes=c.DEFAULT_STREAM_MAX_BYTES["OBJ_tubes"])
    kv_streams = [s for s in c.DEFAULT_STREAM_MAX_BYTES if s.startswith("KV_")]
    for stream in [*kv_streams, c.EVENTS_STREAM, "OBJ_tubes"]:
        if stream == f"KV_{c.KV_MODELS}":
            continue  # the gateway's (test_uploads covers it)
        info = (await js.stream_info(stream)).config
        assert info.max_bytes == c.DEFAULT_STREAM_MAX_BYTES[stream], stream
    ages = {
        f"KV_{c.KV_TUBES}": 60.0,
        f"KV_{c.KV_NODES}": 7.0,
        f"KV_{c.KV_INFLIGHT}": c.KV_INFLIGHT_MAX_AGE_S,
        c.EVENTS_STREAM: c.EVENTS_MAX_AGE_S,
    }
    for stream, age in ages.items():
        assert (await js.stream_info(stream)).config.max_age == pytest.approx(age), stream
    inflight = (await js.stream_info(f"KV_{c.KV_INFLIGHT}")).config
    assert inflight.discard == DiscardPolicy.OLD  # old markers make room for new records
    tubes = (await js.stream_info(f"KV_{c.KV_TUBES}")).config
    assert tubes.discard == DiscardPolicy.NEW  # a full bucket refuses: nothing lost silently


async def test_existing_streams_are_updated_at_start(nats_server: NatsServer, nc: NATS) -> None:
    js = nc.jetstream()
    await js.create_key_value(bucket=c.KV_TUBES, ttl=600.0)  # as made before limits
    await ensure_object_bucket(js, "tubes", ttl_s=600.0)
    config = Config(
        nats_url=nats_server.url,
        tube_ttl_s=30.0,
        jetstream_max_bytes=json.dumps({f"KV_{c.KV_TUBES}": 1 << 20, "OBJ_tubes": 2 << 20}),
    )
    await wait_for_jetstream(nc, config)
    await ensure_object_bucket(js, "tubes", ttl_s=30.0, max_bytes=2 << 20, reshape=True)
    tubes = (await js.stream_info(f"KV_{c.KV_TUBES}")).config
    assert tubes.max_bytes == 1 << 20
    assert tubes.max_age == pytest.approx(30.0)
    objects = (await js.stream_info("OBJ_tubes")).config
    assert objects.max_bytes == 2 << 20
    assert objects.max_age == pytest.approx(30.0)


async def test_a_full_bucket_is_a_507_naming_it(nc: NATS) -> None:
    js = nc.jetstream()
    limits = dict(c.DEFAULT_STREAM_MAX_BYTES) | {f"KV_{c.KV_PROFILES}": 4096}
    buckets = await ensure_jetstream(js, node_ttl_s=5, tube_ttl_s=5, limits=limits)
    profiles: Bucket[bytes] = Bucket(js, buckets.profiles, c.KV_PROFILES, Codec(bytes, bytes))
    refused: ResourceExhausted | None = None
    stored = 0
    while refused is None and stored < 100:  # 200 bytes each: about 20 fit in 4 KiB
        try:
            await profiles.put(f"k{stored}", b"x" * 200)
            stored += 1
        except ResourceExhausted as exc:
            refused = exc
    assert refused is not None
    assert c.KV_PROFILES in refused.message
    assert http_status(refused) == 507
    assert stored > 5  # what fitted was stored, then a typed refusal


def test_a_malformed_setting_is_refused_naming_it() -> None:
    for bad in ("{", "[1]", '{"KV_nope": 1}', '{"EVENTS": 0}', '{"EVENTS": "1"}'):
        with pytest.raises(InvalidArgument, match="GPUFAAS_JETSTREAM_MAX_BYTES"):
            stream_max_bytes(Config(jetstream_max_bytes=bad))
    assert stream_max_bytes(Config(jetstream_max_bytes='{"EVENTS": 5}'))["EVENTS"] == 5


@pytest.fixture
def small_store(tmp_path: Path) -> Iterator[str]:
    """A nats-server whose JetStream store (64 MB) is smaller than the streams' limits."""
    port = free_port()
    conf = tmp_path / "small.conf"
    conf.write_text(
        f'listen: "127.0.0.1:{port}"\njetstream {{ store_dir: "{tmp_path}", '
        "max_file_store: 64MB, max_memory_store: 8MB }\n"
    )
    proc = subprocess.Popen(
        [str(nats_server_binary()), "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        eventually_blocking(lambda: accepting("127.0.0.1", port), 10, "nats-server")
        yield f"nats://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait(10)


async def test_a_store_too_small_for_the_limits_is_a_clear_error(small_store: str) -> None:
    """A server whose JetStream store cannot reserve the streams' ``max_bytes`` is named,
    with the setting that lowers them, instead of a raw ``ServerError`` at start."""
    conn = await nats.connect(small_store)
    try:
        config = Config(nats_url=small_store, connect_deadline_s=5)
        with pytest.raises(ResourceExhausted, match="GPUFAAS_JETSTREAM_MAX_BYTES") as err:
            await wait_for_jetstream(conn, config)
        assert err.value.field == "GPUFAAS_JETSTREAM_MAX_BYTES"
        assert "max_file_store" in err.value.message
    finally:
        await conn.close()
