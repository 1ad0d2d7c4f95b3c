"""The scheduler's queues, profiles and autoscaling, one reconcile step at a time.

The autoscaling loop is slowed to an hour so that the tests drive ``autoscale_once(now)``
themselves with a fake clock; requests, workers and KV are real.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from gpufaas.scheduler.profiles import batch_sizes
from gpufaas.scheduler.service import SchedulerService
from gpufaas.shared import subjects
from gpufaas.shared.config import Config
from gpufaas.shared.constants import KV_REPLICAS
from gpufaas.shared.identity import FunctionRef
from gpufaas.shared.jetstream import bucket_keys
from gpufaas.shared.kv import Codec
from gpufaas.shared.messages import (
    CachedModel,
    FunctionRecord,
    ModelCache,
    ModelSource,
    ProfileRecord,
    decode_json,
    encode_json,
    new_event,
)
from gpufaas.shared.registry import instance_count
from gpufaas.worker.service import WorkerService
from tests.conftest import NatsServer
from tests.integration.conftest import (
    DEMO_BODY,
    Platform,
    PlatformFactory,
    make_config,
    read_events,
    text_request,
)
from tests.support import eventually

pytestmark = pytest.mark.integration

HOUR = 3600.0


@pytest.fixture
def platform_config(nats_server: NatsServer, tmp_path: Path) -> Config:
    return make_config(nats_server, tmp_path, autoscale_interval_s=HOUR, instance_keep_alive_s=10.0)


def scheduler(p: Platform) -> SchedulerService:
    svc = p.services["scheduler"]
    assert isinstance(svc, SchedulerService)
    return svc


async def record_of(sched: SchedulerService, name: str) -> FunctionRecord:
    record = await sched.kv.functions.value(FunctionRef("default", name).key)
    assert record is not None
    return record


async def test_an_slo_that_no_configuration_meets_is_refused_at_deploy(platform: Platform) -> None:
    c = platform.client
    body = {**DEMO_BODY, "options": {"slo_ms": 0.001}}
    resp = await c.post("/v1/functions", json=body)
    assert resp.status == 400
    err = await resp.json()
    assert err["field"] == "options.slo_ms"
    assert "no configuration meets slo_ms=0.001" in err["error"]
    assert (await c.get("/v1/functions/minilm")).status == 404  # nothing written
    worker = platform.services["worker"]
    assert isinstance(worker, WorkerService)
    assert not worker.instances  # nothing left loaded


async def test_a_function_scales_to_zero_after_keep_alive_and_comes_back(
    platform: Platform,
) -> None:
    c, sched = platform.client, scheduler(platform)
    worker = platform.services["worker"]
    assert isinstance(worker, WorkerService)
    assert (await c.post("/v1/functions", json=DEMO_BODY)).status == 201
    assert (await c.post("/v2/models/minilm/infer", json=text_request(["hi"]))).status == 200
    now = time.time()
    await sched.autoscale_once(now)  # leader now; the arrival seen; warm
    assert (await record_of(sched, "minilm")).nodes == ["node-t"]
    await sched.autoscale_once(now + 5)  # idle 5 s < keep-alive 10 s: stays
    assert (await record_of(sched, "minilm")).nodes == ["node-t"]
    await sched.autoscale_once(now + 11)  # idle past keep-alive: out of the record first
    assert (await record_of(sched, "minilm")).nodes == []
    assert worker.instances  # unloaded a tick later, once requests already sent are in
    await sched.autoscale_once(now + 11 + HOUR)
    assert not worker.instances
    # Back from zero: the request waits in the queue while an instance is built.
    resp = await c.post("/v2/models/minilm/infer", json=text_request(["back"]))
    assert resp.status == 200
    assert resp.headers["Gpufaas-Cold"] == "1"
    assert (await record_of(sched, "minilm")).nodes == ["node-t"]
    scaled = [
        (e["data"]["from"], e["data"]["to"]) for e in await read_events(platform, "function.scaled")
    ]
    assert scaled == [(1, 0), (0, 1)]


async def test_requests_wait_in_the_queue_for_room_on_the_instance(platform: Platform) -> None:
    c, sched = platform.client, scheduler(platform)
    body = {**DEMO_BODY, "options": {"max_batch_size": 1}}  # room for 2 at once
    assert (await c.post("/v1/functions", json=body)).status == 201
    long = text_request(["a longer sentence for the encoder to chew on " * 8] * 16)
    tasks = [asyncio.create_task(c.post("/v2/models/minilm/infer", json=long)) for _ in range(6)]
    key = FunctionRef("default", "minilm").key
    await eventually(
        lambda: key in sched.queues and sched.queues[key].queued() > 0,
        20,
        "the scheduler to hold some requests back",
    )
    assert sum(sched.queues[key].in_flight.values()) <= 2
    for resp in await asyncio.gather(*tasks):
        assert resp.status == 200


@pytest.fixture
async def two_nodes(platform_factory: PlatformFactory) -> Platform:
    return await platform_factory(["node-a", "node-b"], autoscale_interval_s=HOUR)


async def test_a_queue_longer_than_an_instance_holds_scales_out_within_then_across_nodes(
    two_nodes: Platform,
) -> None:
    c, sched = two_nodes.client, scheduler(two_nodes)
    body = {**DEMO_BODY, "options": {"max_batch_size": 1}}
    assert (await c.post("/v1/functions", json=body)).status == 201
    (first,) = (await record_of(sched, "minilm")).nodes
    long = text_request(["a longer sentence for the encoder to chew on " * 8] * 16)
    tasks = [asyncio.create_task(c.post("/v2/models/minilm/infer", json=long)) for _ in range(8)]
    key = FunctionRef("default", "minilm").key
    await eventually(
        lambda: key in sched.queues and sched.queues[key].queued() > 2,
        20,
        "the scheduler to hold more than 2 requests back",
    )
    await sched.autoscale_once(time.time())  # 8 waiting, room for 2: more instances
    # First on the other GPU of its node, which holds the model's tensors already.
    record = await record_of(sched, "minilm")
    assert (record.nodes, record.gpus) == ([first], {first: ["gpu:0", "gpu:1"]})
    # Every GPU of that node holds one: the next goes to the other node.
    await sched.leadership.scale(record, 3, "test", time.time())
    record = await record_of(sched, "minilm")
    assert sorted(record.nodes) == ["node-a", "node-b"]
    assert record.nodes[0] == first
    assert instance_count(record) == 3
    responses = await asyncio.gather(*tasks)
    for resp in responses:
        assert resp.status == 200
    served = [r.headers.get("Gpufaas-Node") for r in responses]
    assert all(node in {"node-a", "node-b"} for node in served), served


async def test_a_node_whose_gpu_holds_the_model_is_chosen(two_nodes: Platform) -> None:
    """The memory managers' model caches count in placement: node-b's GPU holds the model
    (and node-a is first by name and load), so the function goes to node-b."""
    from gpufaas.shared.catalog import model_file  # noqa: PLC0415

    file = str(model_file(ModelSource(builtin="all-minilm-l6-v2")))
    sched = scheduler(two_nodes)
    other = CachedModel(item="x", nbytes=1, leased=False, file="/elsewhere/model.safetensors")
    mine = CachedModel(item="m", nbytes=90_000_000, leased=False, file=file)
    caches = sched.kv.view(sched.kv.memory, Codec.json(ModelCache))
    for node, models in (("node-a", [other]), ("node-b", [other, mine])):
        # Written over the manager's own first cache of its GPU (it rewrites only on change).
        key = f"{node}.gpu0.m"
        await eventually(functools.partial(caches.value, key), 10, f"{node}'s cache")
        cache = ModelCache(node=node, device="gpu:0", at=time.time(), models=models)
        await sched.buckets.memory.put(f"{node}.gpu0.m", encode_json(cache))
    assert (await two_nodes.client.post("/v1/functions", json=DEMO_BODY)).status == 201
    record = await record_of(sched, "minilm")
    assert (record.nodes, record.gpus) == (["node-b"], {"node-b": ["gpu:0"]})
    # And node-b's own memory manager now publishes the model on its GPU, under the file
    # name the scheduler matches.

    async def listed() -> bool:
        cache = await caches.value("node-b.gpu0.m")
        return cache is not None and file in {m.file for m in cache.models}

    await eventually(listed, 10, "node-b's model cache to list the model")
    # Copies are per scope: node-b's public copies are nothing to a tenant's private
    # registration of the same file, nor is one tenant's private copy to another tenant.
    private = msgspec.structs.replace(ModelSource(builtin="all-minilm-l6-v2"), private=True)
    record_spec = (await record_of(sched, "minilm")).spec
    spec = msgspec.structs.replace(record_spec, tenant="t2", model=private)
    assert await sched.placer.gpu_cached(record_spec) == {("node-b", "gpu:0")}
    assert await sched.placer.gpu_cached(spec) == set()
    t3_copy = msgspec.structs.replace(mine, tenant="t3")
    cache = ModelCache(node="node-a", device="gpu:9", at=time.time(), models=[t3_copy])
    await sched.buckets.memory.put("node-a.gpu9.m", encode_json(cache))
    assert await sched.placer.gpu_cached(spec) == set()
    t3 = msgspec.structs.replace(spec, tenant="t3")
    assert await sched.placer.gpu_cached(t3) == {("node-a", "gpu:9")}


async def test_a_background_profile_chooses_the_batch(platform_factory: PlatformFactory) -> None:
    p = await platform_factory(profile_s=20.0, autoscale_interval_s=HOUR)
    body = {**DEMO_BODY, "options": {"max_batch_size": 8}}
    assert (await p.client.post("/v1/functions", json=body)).status == 201
    sched = scheduler(p)

    async def complete() -> ProfileRecord | None:
        entry = await sched.buckets.profiles.get(FunctionRef("default", "minilm").key)
        assert entry.value is not None
        record = decode_json(entry.value, ProfileRecord)
        return record if record.complete else None

    record = await eventually(complete, 60, "the background profile to complete", interval=0.1)
    assert record is not None
    assert record.batch in batch_sizes(8)
    assert {pt.batch for pt in record.points} <= set(batch_sizes(8))
    assert record.reason
    resp = await p.client.post("/v2/models/minilm/infer", json=text_request(["x", "y"]))
    assert resp.status == 200


async def test_a_replica_that_dies_mid_request_is_taken_over_without_running_it_twice(
    platform_factory: PlatformFactory,
) -> None:
    # The first replica dies before its first tick (its ticks are an hour apart): it must
    # have made itself known when it started, or no survivor would find its requests. Its
    # liveness key would last a minute: the survivor finds it dead by its silent subject.
    p = await platform_factory(autoscale_interval_s=HOUR, node_ttl_s=60.0)
    survivor: SchedulerService | None = None
    try:
        c, first = p.client, scheduler(p)
        worker = p.services["worker"]
        assert isinstance(worker, WorkerService)
        assert (await c.post("/v1/functions", json=DEMO_BODY)).status == 201
        long = text_request(["a longer sentence for the encoder to chew on " * 8] * 64)
        call = asyncio.create_task(c.post("/v2/models/minilm/infer", json=long))
        await eventually(lambda: worker._answering, 20, "the worker to run the request")
        # The replica dies: no reply, no clean-up; its liveness key is still there.
        await first.nc.close()
        for task in [*first._background, *first._inflight]:
            task.cancel()
        survivor = SchedulerService(p.config.replace(autoscale_interval_s=0.2))
        await survivor.start()
        done, _ = await asyncio.wait([call], timeout=30)
        assert done, (  # what the survivor knew, if it never answered
            f"workers={survivor.workers} adopted={survivor.failover.adopted} "
            f"inflight={[k async for k in keys(survivor)]} "
            f"replicas={await bucket_keys(survivor.js, KV_REPLICAS)} "
            f"worker answering={list(worker._answering)} answered={len(worker._answered)}"
        )
        resp = call.result()
        assert resp.status == 200, await resp.text()
        assert len((await resp.json())["outputs"][0]["data"]) == 64 * 384
        assert worker.repeats == 1  # sent twice, run once
        assert [k async for k in keys(survivor)] == []  # answered: forgotten
        js = survivor.js

        async def one_replica() -> bool:
            return len(await bucket_keys(js, KV_REPLICAS)) == 1

        await eventually(one_replica, 5, "the dead replica's prefix to be purged on a later tick")
        assert await bucket_keys(survivor.js, KV_REPLICAS) == [
            survivor.failover.inflight_key("x").removesuffix(".x")
        ]
    finally:
        if survivor is not None:
            p.services["scheduler"] = survivor  # stopped with the platform


async def test_an_invocation_waits_for_a_scheduler_while_none_runs(
    platform_factory: PlatformFactory,
) -> None:
    # ``gpufaas up`` restarting its only scheduler: for a moment nothing subscribes to
    # the invoke subject. The gateway waits for a replica rather than answer 503.
    p = await platform_factory()
    assert (await p.client.post("/v1/functions", json=DEMO_BODY)).status == 201
    await scheduler(p).stop()
    call = asyncio.create_task(p.client.post("/v2/models/minilm/infer", json=text_request(["x"])))
    await asyncio.sleep(0.5)  # the outage itself, not a wait for something
    assert not call.done()
    p.services["scheduler"] = restarted = SchedulerService(p.config)  # stopped with it
    await restarted.start()
    resp = await asyncio.wait_for(call, 30)
    assert resp.status == 200, await resp.text()


async def keys(svc: SchedulerService) -> AsyncIterator[str]:
    for entry in await svc.kv.inflight.items():
        if entry.value:
            yield entry.key


async def test_waiting_requests_fail_with_the_reason_when_the_memory_manager_rejects(
    platform: Platform,
) -> None:
    c, sched = platform.client, scheduler(platform)
    body = {**DEMO_BODY, "options": {"max_batch_size": 1}}  # room for 2 at once
    assert (await c.post("/v1/functions", json=body)).status == 201
    long = text_request(["a longer sentence for the encoder to chew on " * 8] * 16)
    tasks = [asyncio.create_task(c.post("/v2/models/minilm/infer", json=long)) for _ in range(6)]
    key = FunctionRef("default", "minilm").key
    await eventually(
        lambda: key in sched.queues and sched.queues[key].queued() > 0,
        20,
        "the scheduler to hold some requests back",
    )
    event = new_event(
        "memory.rejected",
        "memory@node-t",
        {
            "node": "node-t",
            "device": "gpu:0",
            "function": "default/minilm",
            "reason": "working set 99 GiB > gpu:0 capacity 16 GiB",
        },
    )
    await sched.nc.publish(subjects.event("memory.rejected"), encode_json(event))
    statuses = []
    for resp in await asyncio.gather(*tasks):
        statuses.append(resp.status)
        if resp.status == 507:
            err = await resp.json()
            assert err["code"] == "resource_exhausted"
            assert "working set 99 GiB" in err["error"]
    assert 507 in statuses  # those still waiting
    assert 200 in statuses  # those already running finish
