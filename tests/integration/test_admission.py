"""Admission control: full queues and tenants over their limits get 429 with Retry-After,
oversize requests 413 naming the field, expired requests are never computed."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gpufaas.gateway.admission import ADMISSION, Admission, check_input_sizes
from gpufaas.gateway.app import create_app
from gpufaas.gateway.bodies import InferInput
from gpufaas.scheduler.queues import Pending
from gpufaas.scheduler.service import SchedulerService
from gpufaas.shared import subjects
from gpufaas.shared.errors import DeadlineExceeded, InvalidArgument, PayloadTooLarge
from gpufaas.shared.identity import FunctionRef
from gpufaas.shared.messages import InvokeReply, InvokeRequest, TensorPayload
from gpufaas.shared.rpc import request as rpc_request
from gpufaas.shared.tensors import encode_bytes_elements
from gpufaas.worker.service import WorkerService
from tests.integration.conftest import (
    DEMO_BODY,
    Platform,
    PlatformFactory,
    bearer,
    text_request,
)
from tests.support import eventually

pytestmark = pytest.mark.integration


def admission_of(p: Platform) -> Admission:
    """The gateway's per-tenant limits and what each tenant uses now."""
    app = p.client.app
    assert app is not None
    admission: Admission = app[ADMISSION]
    return admission


async def expect(resp: Any, status: int, code: str, field: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = await resp.json()
    assert resp.status == status, body
    assert body["code"] == code, body
    if field is not None:
        assert body.get("field") == field, body
    return body


async def test_full_queue_is_429_with_retry_after(platform_factory: PlatformFactory) -> None:
    p = await platform_factory(max_queued=2, direct_route_ttl_s=0.0)  # the scheduler queue
    c = p.client
    assert (await c.post("/v1/functions", json=DEMO_BODY)).status == 201
    assert (await c.post("/v2/models/minilm/infer", json=text_request(["warm"]))).status == 200
    sched = p.services["scheduler"]
    assert isinstance(sched, SchedulerService)
    fq = sched.dispatcher.queue(FunctionRef("default", "minilm"))
    loop = asyncio.get_running_loop()
    # Two requests waiting (for an instance that never frees up, as under a burst).
    held = [Pending(time.time() + 30, f"held-{i}", loop.create_future()) for i in range(2)]
    for h in held:
        fq.push(h)
    try:
        resp = await c.post("/v2/models/minilm/infer", json=text_request(["more"]))
        body = await expect(resp, 429, "overloaded")
        assert "minilm" in body["error"]
        assert int(resp.headers["Retry-After"]) >= 1
    finally:
        for h in held:
            h.node.cancel()
    # Room again: served.
    assert (await c.post("/v2/models/minilm/infer", json=text_request(["again"]))).status == 200


async def test_tenant_in_flight_limit_is_429_while_another_tenant_is_served(
    platform_factory: PlatformFactory,
) -> None:
    p = await platform_factory(tenant_limits=json.dumps({"t1": {"max_inflight": 1}}))
    c = p.client
    k1, k2 = await p.key_for("t1"), await p.key_for("t2")
    for k in (k1, k2):
        assert (await c.post("/v1/functions", json=DEMO_BODY, headers=bearer(k))).status == 201
    admission = admission_of(p)
    with admission.request("t1"):  # t1's one place, held (a request of t1 in flight)
        resp = await c.post("/v2/models/minilm/infer", json=text_request(["x"]), headers=bearer(k1))
        body = await expect(resp, 429, "overloaded")
        assert "in flight" in body["error"]
        assert int(resp.headers["Retry-After"]) >= 1
        resp = await c.post("/v2/models/minilm/infer", json=text_request(["x"]), headers=bearer(k2))
        assert resp.status == 200, await resp.text()
    resp = await c.post("/v2/models/minilm/infer", json=text_request(["x"]), headers=bearer(k1))
    assert resp.status == 200, await resp.text()


async def test_tenant_rate_limit_is_429_while_another_tenant_is_served(
    platform_factory: PlatformFactory,
) -> None:
    p = await platform_factory(tenant_limits=json.dumps({"t1": {"rate": 0.01, "burst": 2}}))
    c = p.client
    k1, k2 = await p.key_for("t1"), await p.key_for("t2")
    for k in (k1, k2):
        assert (await c.post("/v1/functions", json=DEMO_BODY, headers=bearer(k))).status == 201

    async def infer(key: str) -> Any:
        return await c.post(
            "/v2/models/minilm/infer", json=text_request(["x"]), headers=bearer(key)
        )

    assert [(await infer(k1)).status for _ in range(2)] == [200, 200]  # the burst
    resp = await infer(k1)
    body = await expect(resp, 429, "overloaded")
    assert "rate" in body["error"]
    assert int(resp.headers["Retry-After"]) == 60  # 1/0.01 s, capped
    assert [(await infer(k2)).status for _ in range(5)] == [200] * 5  # t2: the defaults


async def test_malformed_tenant_limits_name_the_variable(platform: Platform) -> None:
    bad = platform.config.replace(tenant_limits='{"t1": {"rate": "fast"}}')
    with pytest.raises(InvalidArgument) as err:
        create_app(bad)
    assert err.value.field == "GPUFAAS_TENANT_LIMITS"


async def test_rows_over_the_functions_max_rows_is_413_naming_the_shape(
    platform: Platform,
) -> None:
    c = platform.client
    body = {**DEMO_BODY, "options": {"max_rows": 2}}
    resp = await c.post("/v1/functions", json=body)
    assert resp.status == 201, await resp.text()
    assert (await resp.json())["spec"]["options"]["max_rows"] == 2
    assert (await c.post("/v2/models/minilm/infer", json=text_request(["a", "b"]))).status == 200
    resp = await c.post("/v2/models/minilm/infer", json=text_request(["a", "b", "c"]))
    body = await expect(resp, 413, "payload_too_large", "inputs[0].shape")
    assert "max_rows" in body["error"]
    # A shape that lies about its size is refused before its data is looked at.
    lying = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [10**12], "data": ["a"]}]}
    resp = await c.post("/v2/models/minilm/infer", json=lying)
    await expect(resp, 413, "payload_too_large", "inputs[0].shape")


def test_input_bytes_cap_names_the_shape() -> None:
    inp = InferInput(name="x", shape=[4, 1000], datatype="FP32", data=[])
    check_input_sizes([inp], max_rows=4, max_bytes=16_000)
    with pytest.raises(PayloadTooLarge) as err:
        check_input_sizes([inp], max_rows=4, max_bytes=15_999)
    assert err.value.field == "inputs[0].shape"


async def test_chunked_oversize_body_is_413_without_reading_it_whole(
    platform_factory: PlatformFactory,
) -> None:
    p = await platform_factory(max_body_bytes=256 * 1024)
    c = p.client
    assert (await c.post("/v1/functions", json=DEMO_BODY)).status == 201
    sent = 0

    async def endless() -> AsyncIterator[bytes]:
        """A chunked body that never ends: only a cap while streaming can answer it."""
        nonlocal sent
        yield b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["'
        while True:
            sent += 64 * 1024
            yield b"a" * 64 * 1024

    resp = await c.post(
        "/v2/models/minilm/infer",
        data=endless(),
        headers={"Content-Type": "application/json"},
    )
    await expect(resp, 413, "payload_too_large", "body")
    assert sent < 64 * 1024 * 1024


def invoke(name: str, text: str, deadline: float) -> InvokeRequest:
    raw = encode_bytes_elements([text.encode()])
    payload = TensorPayload(name="text", datatype="BYTES", shape=[1], data=raw)
    return InvokeRequest(function=name, request_id=f"r-{text}", inputs=[payload], deadline=deadline)


async def test_expired_request_is_not_computed_and_holds_its_slot_until_answered(
    platform: Platform,
) -> None:
    c = platform.client
    assert (await c.post("/v1/functions", json=DEMO_BODY)).status == 201
    assert (await c.post("/v2/models/minilm/infer", json=text_request(["warm"]))).status == 200
    worker, sched = platform.services["worker"], platform.services["scheduler"]
    assert isinstance(worker, WorkerService)
    assert isinstance(sched, SchedulerService)
    fq = sched.dispatcher.queue(FunctionRef("default", "minilm"))
    device = worker.batcher.execute
    gate, entered = asyncio.Event(), asyncio.Event()

    async def held(infer: Any, inputs: Any) -> Any:
        """The device, held busy (a long batch) until the test lets it go."""
        entered.set()
        await gate.wait()
        return await device(infer, inputs)

    worker.batcher.execute = held
    computed = worker.batcher.computed

    async def send(text: str, deadline: float) -> Any:
        return await rpc_request(
            sched.nc,
            subjects.SCHED_INVOKE,
            invoke("minilm", text, deadline),
            InvokeReply,
            timeout=30,
        )

    first = asyncio.create_task(send("first", time.time() + 1.0))
    await eventually(entered.is_set, what="the first request computing")
    second = asyncio.create_task(send("second", time.time() + 1.0))
    await eventually(lambda: len(worker.batcher.ready) == 1, what="the second queued behind it")
    for task in (first, second):
        with pytest.raises(DeadlineExceeded):
            await task
    # Both callers have heard; the worker still holds both: their slots stay taken.
    assert sum(fq.in_flight.values()) == 2
    gate.set()
    await eventually(lambda: not fq.in_flight, what="the slots freed by the worker's answers")
    assert worker.batcher.computed == computed + 1  # the first only: the second expired
    assert worker.batcher.expired >= 1
    worker.batcher.execute = device
    assert (await c.post("/v2/models/minilm/infer", json=text_request(["after"]))).status == 200


async def test_event_streams_per_tenant_are_capped(platform_factory: PlatformFactory) -> None:
    p = await platform_factory(tenant_limits=json.dumps({"t1": {"max_streams": 1}}))
    c = p.client
    k1, k2 = await p.key_for("t1"), await p.key_for("t2")
    admission = admission_of(p)
    async with c.get("/v1/events", headers=bearer(k1)) as first:
        assert first.status == 200
        await first.content.readline()  # ": connected": the handler holds its place
        resp = await c.get("/v1/events", headers=bearer(k1))
        body = await expect(resp, 429, "overloaded")
        assert "event streams" in body["error"]
        assert int(resp.headers["Retry-After"]) >= 1
        async with c.get("/v1/events", headers=bearer(k2)) as other:
            assert other.status == 200
    # The first client gone, its place is free again (noticed within about a second).
    await eventually(lambda: admission.tenants["t1"].streams == 0, what="t1's place freed")
    async with c.get("/v1/events", headers=bearer(k1)) as again:
        assert again.status == 200


async def test_replay_all_sends_at_most_the_latest_events(
    platform_factory: PlatformFactory,
) -> None:
    p = await platform_factory(events_replay_max=2)
    c = p.client
    for name in ("a", "b", "c"):
        body = {"name": name, "model": {"builtin": "all-minilm-l6-v2"}}
        assert (await c.post("/v1/functions", json=body)).status == 201
    sched = p.services["scheduler"]
    last = (await sched.js.stream_info("EVENTS")).state.last_seq
    async with c.get("/v1/events?replay=all") as resp:
        assert resp.status == 200
        ids = await read_ids(resp, until=last)
    assert ids == [last - 1, last]  # not the whole history
    # Resuming from the very first event is bounded the same way.
    async with c.get("/v1/events", headers={"Last-Event-ID": "1"}) as resp:
        assert await read_ids(resp, until=last) == [last - 1, last]


async def read_ids(resp: Any, until: int) -> list[int]:
    """The ids of the SSE messages up to and including id ``until``."""
    ids: list[int] = []
    async for raw in resp.content:
        line = raw.decode().strip()
        if line.startswith("id: "):
            ids.append(int(line[4:]))
            if ids[-1] >= until:
                return ids
    raise AssertionError("stream ended early")
