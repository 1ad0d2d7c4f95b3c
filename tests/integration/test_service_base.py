"""The Service base over a real nats-server: endpoint tables and their statistics,
supervised loops and watches, and the typed KV layer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import nats.errors
import pytest

from gpufaas.shared import subjects
from gpufaas.shared.errors import InvalidArgument, NotFound
from gpufaas.shared.kv import MALFORMED, Bucket, Codec, Conflict
from gpufaas.shared.messages import (
    FunctionRecord,
    FunctionSpec,
    ModelSource,
    Ping,
    Pong,
    ServiceStatsReply,
    ServiceStatsRequest,
)
from gpufaas.shared.rpc import request
from gpufaas.shared.service import Endpoint, Service, endpoint
from tests.conftest import NatsServer
from tests.integration.conftest import make_config
from tests.support import eventually

pytestmark = pytest.mark.integration


class Echo(Service):
    """A minimal service: one endpoint, and whatever loops a test gives it."""

    name = "echo"
    node_scoped = False

    async def echo(self, req: Ping) -> Pong:
        return Pong(service=self.name, node=self.config.node_id, pid=0)

    async def refuse(self, req: Ping) -> Pong:
        raise NotFound("nothing here", field="thing")

    def endpoints(self) -> list[Endpoint]:
        return [
            endpoint(subjects.cluster("echo", "echo"), Ping, self.echo),
            endpoint(subjects.cluster("echo", "refuse"), Ping, self.refuse),
        ]


@pytest.fixture
async def echo(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[Echo]:
    config = make_config(nats_server, tmp_path, devices="cpu")
    svc = Echo(config)
    await svc.start()
    yield svc
    await svc.stop()


async def test_endpoints_answer_with_typed_errors_and_are_counted(echo: Echo) -> None:
    nc = echo.nc
    reply = await request(nc, subjects.cluster("echo", "echo"), Ping(), Pong, timeout=2)
    assert reply.service == "echo"
    with pytest.raises(NotFound):
        await request(nc, subjects.cluster("echo", "refuse"), Ping(), Pong, timeout=2)
    # A request that is not the endpoint's type is a typed error, not silence.
    with pytest.raises(InvalidArgument):
        await request(nc, subjects.cluster("echo", "echo"), ServiceStatsRequest(), Pong, timeout=2)
    stats = await request(
        nc,
        subjects.cluster("echo", subjects.SERVICE_STATS),
        ServiceStatsRequest(),
        ServiceStatsReply,
        timeout=2,
    )
    by_name = {e.name: e for e in stats.endpoints}
    assert (by_name["echo"].requests, by_name["echo"].errors) == (2, 1)
    assert (by_name["refuse"].requests, by_name["refuse"].errors) == (1, 1)
    assert by_name["echo"].p99_us >= by_name["echo"].p50_us > 0
    assert {"ping", "service_stats", "stats_all"} <= set(by_name)


async def test_the_stats_broadcast_is_answered_by_every_service(echo: Echo) -> None:
    reply = await request(
        echo.nc, subjects.STATS_ALL, ServiceStatsRequest(), ServiceStatsReply, timeout=2
    )
    assert (reply.service, reply.node) == ("echo", "node-t")


def failing(errors: list[BaseException]) -> Callable[[], Awaitable[None]]:
    """A loop step that raises each of ``errors`` in turn, then succeeds."""

    async def step() -> None:
        if errors:
            raise errors.pop(0)

    return step


async def test_a_transient_failure_never_stops_a_loop(echo: Echo) -> None:
    errors: list[BaseException] = [
        nats.errors.TimeoutError(),
        nats.errors.NoRespondersError(),
        nats.errors.ConnectionClosedError(),
        InvalidArgument("a platform error"),
    ]
    echo.every(0.01, failing(errors), "flaky")
    stats = echo.loop_stats["flaky"]
    await eventually(lambda: stats.runs >= 6, 10, "the loop to run on after four failures")
    assert stats.failures == 4
    assert stats.streak == 0  # the backoff reset after a success
    assert echo.running
    assert echo.fatal is None


async def test_a_programming_error_stops_the_service(echo: Echo) -> None:
    echo.every(0.01, failing([KeyError("bug")]), "buggy")
    await asyncio.wait_for(echo.wait_stopped(), 10)
    assert isinstance(echo.fatal, KeyError)


def record(name: str) -> FunctionRecord:
    spec = FunctionSpec(name=name, model=ModelSource(builtin="all-minilm-l6-v2"))
    return FunctionRecord(
        spec=spec, inputs=[], outputs=[], model_bytes=0, tensor_count=0, nodes=[], created_at=0.0
    )


async def test_a_watch_skips_malformed_records(echo: Echo) -> None:
    seen: dict[str, FunctionRecord | None] = {}

    def on_change(key: str, value: FunctionRecord | None) -> None:
        seen[key] = value

    functions = echo.kv.functions
    await echo.kv.raw.functions.put("default.broken", b"{not json")
    await functions.put("default.a", record("a"))
    echo.watch(functions, on_change, "functions")
    await eventually(lambda: "default.a" in seen, 5, "the watch to deliver the good record")
    await functions.delete("default.a")
    await eventually(lambda: seen.get("default.a", 1) is None, 5, "the watch to deliver the delete")
    assert "default.broken" not in seen
    assert echo.loop_stats["functions"].skipped >= 1
    assert echo.running


async def test_bucket_reads_writes_and_compare_and_set(echo: Echo) -> None:
    b: Bucket[str] = echo.kv.view(echo.kv.leases, Codec(str.encode, bytes.decode))
    assert await b.get("missing") is None
    assert await b.value("not a valid key!") is None
    first = await b.create("k", "1")
    assert first is not None
    assert await b.create("k", "2") is None  # exists: nothing written
    entry = await b.get("k")
    assert entry is not None
    assert (entry.value, entry.revision) == ("1", first)
    await b.put("k", "5")
    with pytest.raises(Conflict):
        await b.put_if("k", "6", first)  # stale revision

    async def bump() -> None:
        await b.update("n", lambda v: str(int(v or "0") + 1), attempts=50)

    await asyncio.gather(*(bump() for _ in range(10)))  # racing writers, none lost
    assert await b.value("n") == "10"
    assert await b.update("n", lambda v: None) is not None  # None: left as it is
    assert await b.value("n") == "10"
    assert await b.delete("n")
    assert await b.get("n") is None
    assert [e.key for e in await b.items()] == ["k"]


async def test_a_malformed_record_reads_as_absent_and_update_repairs_it(echo: Echo) -> None:
    functions = echo.kv.functions
    await echo.kv.raw.functions.put("default.bad", b"\x00garbage")
    before = MALFORMED.get(functions.name, 0)
    assert await functions.get("default.bad") is None
    assert MALFORMED[functions.name] == before + 1
    fixed = await functions.update("default.bad", lambda cur: cur or record("bad"))
    assert fixed is not None
    assert fixed.value.spec.name == "bad"


async def test_a_bounded_step_fails_alone(echo: Echo) -> None:
    ran: list[str] = []

    async def broken() -> int:
        raise nats.errors.TimeoutError

    async def fine() -> int:
        ran.append("fine")
        return 7

    assert await echo.bounded("tick.a", broken, -1) == -1
    assert await echo.bounded("tick.b", fine, -1) == 7
    assert ran == ["fine"]
    assert (echo.loop_stats["tick.a"].failures, echo.loop_stats["tick.b"].runs) == (1, 1)

    async def bug() -> int:
        raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        await echo.bounded("tick.c", bug, -1)
