"""The SSE relay of the EVENTS stream, with replay and resume."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.integration.conftest import DEMO_BODY, Platform

pytestmark = pytest.mark.integration


async def read_events(resp: Any, until: str) -> list[tuple[int, str, dict[str, Any]]]:
    """(id, event, data) of each SSE message up to and including the first ``until``."""
    out: list[tuple[int, str, dict[str, Any]]] = []
    fields: dict[str, str] = {}
    async for raw in resp.content:
        line = raw.decode().rstrip("\n")
        if line.startswith(":"):
            continue
        if line:
            key, _, value = line.partition(": ")
            fields[key] = value
            continue
        if fields:
            out.append((int(fields["id"]), fields["event"], json.loads(fields["data"])))
            fields = {}
            if out[-1][1] == until:
                return out
    raise AssertionError("stream ended early")


async def test_sse_replays_filters_and_resumes(platform: Platform) -> None:
    c = platform.client
    assert (await c.post("/v1/functions", json=DEMO_BODY)).status == 201
    assert (await c.delete("/v1/functions/minilm")).status == 200

    async with c.get("/v1/events?replay=all&kinds=function.*") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events = await read_events(resp, until="function.deleted")
    assert [e[1] for e in events] == ["function.deployed", "function.deleted"]
    deployed = events[0][2]
    assert deployed["kind"] == "function.deployed"
    assert deployed["data"]["function"] == "minilm"
    assert deployed["data"]["model_bytes"] > 0

    # Resume after the first event: only what followed it arrives.
    headers = {"Last-Event-ID": str(events[0][0])}
    async with c.get("/v1/events?kinds=function.*", headers=headers) as resp:
        resumed = await read_events(resp, until="function.deleted")
    assert [e[1] for e in resumed] == ["function.deleted"]


async def test_last_event_id_is_checked_and_one_past_the_end_waits_for_new_events(
    platform: Platform,
) -> None:
    c = platform.client
    for bad in ["", "x1", "١٢", "1" * 21]:  # not ASCII digits, or past any uint64
        async with c.get("/v1/events", headers={"Last-Event-ID": bad}) as resp:
            body = await resp.json()
            assert resp.status == 400, body
            assert body["field"] == "Last-Event-ID"
    # An id past the stream's end (a client of a stream since recreated): new events only.
    assert (await c.post("/v1/functions", json=DEMO_BODY)).status == 201
    headers = {"Last-Event-ID": str(2**64 - 1)}
    async with c.get("/v1/events?kinds=function.*", headers=headers) as resp:
        assert resp.status == 200
        assert (await c.delete("/v1/functions/minilm")).status == 200
        events = await read_events(resp, until="function.deleted")
    assert [e[1] for e in events] == ["function.deleted"]
