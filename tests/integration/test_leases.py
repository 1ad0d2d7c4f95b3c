"""Leases between workers and the tensor store, and the reclaimer, over a real NATS."""

from __future__ import annotations

import json
import time

import pytest

from gpufaas.shared import subjects
from gpufaas.shared.identity import FunctionRef
from gpufaas.shared.messages import StoreStats, StoreStatsRequest
from gpufaas.shared.rpc import request
from gpufaas.tensorstore.service import TensorStoreService
from gpufaas.worker.service import WorkerService
from tests.integration.conftest import DEMO_BODY, Platform, text_request

pytestmark = pytest.mark.integration


def parts(p: Platform) -> tuple[TensorStoreService, WorkerService]:
    store, worker = p.services["tensorstore"], p.services["worker"]
    assert isinstance(store, TensorStoreService)
    assert isinstance(worker, WorkerService)
    return store, worker


async def stats(p: Platform) -> StoreStats:
    subject = subjects.node(p.config.node_id, "tensorstore", subjects.TENSORSTORE_STATS)
    return await request(
        p.services["scheduler"].nc, subject, StoreStatsRequest(), StoreStats, timeout=5
    )


async def test_instance_holds_a_lease_and_delete_releases_it(platform: Platform) -> None:
    store, _ = parts(platform)
    assert (await platform.client.post("/v1/functions", json=DEMO_BODY)).status == 201
    s = await stats(platform)
    assert s.leases == 1
    assert s.bytes_referenced == s.bytes_stored > 80 * 2**20
    # Referenced: not even idle (the unit tests push keep-alive and capacity to the limit).
    assert await store.reclaim_once(time.time()) == []
    assert store.store.idle_since == {}

    assert (await platform.client.delete("/v1/functions/minilm")).status == 200
    assert (await stats(platform)).leases == 0
    now = store.store.recovered_at + platform.config.node_ttl_s  # past the start-up grace
    assert await store.reclaim_once(now) == []  # idle from now: kept for the keep-alive
    freed = await store.reclaim_once(now + platform.config.tensor_keep_alive_s)
    assert sum(n for tier, _, n, _ in freed if tier == "host") == s.bytes_stored
    assert (await stats(platform)).bytes_stored == 0

    sub = await store.js.subscribe(subjects.event("tensor.reclaimed"), ordered_consumer=True)
    ev = json.loads((await sub.next_msg(timeout=5)).data)
    await sub.unsubscribe()
    assert ev["data"]["reason"] == "keep-alive expired"


async def test_a_crashed_workers_lease_lapses(platform: Platform) -> None:
    store, worker = parts(platform)
    assert (await platform.client.post("/v1/functions", json=DEMO_BODY)).status == 201
    await worker.nc.close()  # the worker dies: it stops renewing, releases nothing
    ttl = platform.config.node_ttl_s
    keep = platform.config.tensor_keep_alive_s
    now = store.store.recovered_at + ttl  # past the start-up grace
    assert await store.reclaim_once(now) == []  # lease still valid
    assert await store.reclaim_once(now + ttl + 1) == []  # lapsed: idle from here
    assert await store.reclaim_once(now + ttl + 1 + keep) != []


async def test_a_restarted_store_rebuilds_leases_from_renewals(platform: Platform) -> None:
    store, worker = parts(platform)
    assert (await platform.client.post("/v1/functions", json=DEMO_BODY)).status == 201
    await store.stop()
    restarted = TensorStoreService(platform.config)
    await restarted.start()
    platform.services["tensorstore"] = restarted
    assert (await stats(platform)).leases == 0  # the table is not on disk ...
    await worker.renew_leases()  # ... workers re-announce within a heartbeat
    # The host tensors are all there again, but the GPU copies died with the old store
    # (their room in the GPU's budget lapses with its memory lease): the lease is reported
    # lost, and the worker drops the instance, to rebuild it when next used.
    assert ("default", "minilm") not in worker.instances
    resp = await platform.client.post("/v2/models/minilm/infer", json=text_request(["ok"]))
    assert resp.status == 200
    s = await stats(platform)
    assert s.leases == 1
    assert s.bytes_referenced == s.bytes_stored
    assert [(d.device, d.leases) for d in s.devices] == [("gpu:0", 1), ("gpu:1", 0)]
    assert s.devices[0].bytes_referenced == s.bytes_stored
    assert await restarted.reclaim_once(time.time()) == []
    assert restarted.store.idle_since == {}  # referenced again, not idle


async def test_locality_theta_follows_residency(platform: Platform) -> None:
    from gpufaas.shared.messages import LocalityReply, LocalityRequest, ModelSource  # noqa: PLC0415

    store, _ = parts(platform)
    nc = platform.services["scheduler"].nc
    subject = subjects.node(platform.config.node_id, "tensorstore", subjects.TENSORSTORE_LOCALITY)
    ask = LocalityRequest(source=ModelSource(builtin="all-minilm-l6-v2"))

    before = await request(nc, subject, ask, LocalityReply, timeout=5)
    assert (before.known, before.theta, before.resident_bytes) == (False, 0.0, 0)
    assert before.bytes_to_load > 80 * 2**20

    assert (await platform.client.post("/v1/functions", json=DEMO_BODY)).status == 201
    loaded = await request(nc, subject, ask, LocalityReply, timeout=5)
    assert (loaded.known, loaded.theta, loaded.bytes_to_load) == (True, 1.0, 0)

    assert (await platform.client.delete("/v1/functions/minilm")).status == 200
    now = store.store.recovered_at + platform.config.node_ttl_s
    await store.reclaim_once(now)
    await store.reclaim_once(now + platform.config.tensor_keep_alive_s)
    gone = await request(nc, subject, ask, LocalityReply, timeout=5)
    assert (gone.known, gone.theta, gone.resident_bytes) == (True, 0.0, 0)
    assert gone.bytes_to_load == loaded.model_bytes


async def test_a_stale_remembered_manifest_is_rebuilt_from_the_stores_answer(
    platform: Platform,
) -> None:
    store, worker = parts(platform)
    c = platform.client
    assert (await c.post("/v1/functions", json=DEMO_BODY)).status == 201
    first = worker.instances[FunctionRef("default", "minilm")].held
    assert (await c.delete("/v1/functions/minilm")).status == 200
    now = store.store.recovered_at + platform.config.node_ttl_s
    await store.reclaim_once(now)
    await store.reclaim_once(now + platform.config.tensor_keep_alive_s)  # segments gone
    # The worker remembers the old manifest and builds over it while the store answers;
    # the store stored the tensors anew, so that build is dropped for one over the new ones.
    assert (await c.post("/v1/functions", json=DEMO_BODY)).status == 201
    held = worker.instances[FunctionRef("default", "minilm")].held
    assert held.isdisjoint(first)
    assert held == {ref.segment for ref in store.store.index.values()}
    assert worker.tensors.segments_mapped == len(held)
    resp = await c.post("/v2/models/minilm/infer", json=text_request(["rebuilt"]))
    assert resp.status == 200
