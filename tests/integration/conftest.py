"""An in-process platform (every service on one event loop) over a real nats-server."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats.errors
import pytest
from aiohttp.test_utils import TestClient, TestServer

from gpufaas.gateway.app import create_app
from gpufaas.memory.service import MemoryService
from gpufaas.scheduler.service import SchedulerService
from gpufaas.shared import subjects
from gpufaas.shared.config import Config
from gpufaas.shared.service import Service
from gpufaas.tensorstore.service import TensorStoreService
from gpufaas.transfer.service import TransferService
from gpufaas.worker.service import WorkerService
from tests.conftest import NatsServer

NODE_SERVICES = (MemoryService, TensorStoreService, TransferService, WorkerService)


@dataclass
class Platform:
    """Handles on a running in-process platform."""

    config: Config
    nats: NatsServer
    client: TestClient[Any, Any]
    services: dict[str, Service] = field(default_factory=dict)

    async def restart_control_plane(self) -> None:
        """Stop and start the scheduler and a fresh gateway (state must come from KV)."""
        await self.services["scheduler"].stop()
        await self.client.close()
        self.services["scheduler"] = SchedulerService(self.config)
        await self.services["scheduler"].start()
        self.client = TestClient(TestServer(create_app(self.config)))
        await self.client.start_server()

    async def stop(self) -> None:
        await self.client.close()
        for svc in reversed(list(self.services.values())):
            await svc.stop()


def make_config(nats: NatsServer, tmp_path: Path, **overrides: Any) -> Config:
    base = Config(
        nats_url=nats.url,
        node_id="node-t",
        devices="sim:2",
        shm_dir=tmp_path / "shm",
        data_dir=tmp_path / "data",
        heartbeat_s=0.2,
        node_ttl_s=2.0,
        connect_deadline_s=3.0,
        shutdown_deadline_s=5.0,
        profile_s=0.0,  # the batch-1 point only: a background sweep would slow every test
    )
    return base.replace(**overrides)


async def start_platform(config: Config, nats: NatsServer) -> Platform:
    services: dict[str, Service] = {}
    for cls in (*NODE_SERVICES, SchedulerService):
        svc = cls(config)
        await svc.start()
        services[svc.name] = svc
    client = TestClient(TestServer(create_app(config)))
    await client.start_server()
    return Platform(config, nats, client, services)


@pytest.fixture
def platform_config(nats_server: NatsServer, tmp_path: Path) -> Config:
    """Override in a test module to change settings."""
    return make_config(nats_server, tmp_path)


@pytest.fixture
async def platform(platform_config: Config, nats_server: NatsServer) -> AsyncIterator[Platform]:
    p = await start_platform(platform_config, nats_server)
    yield p
    await p.stop()


DEMO_BODY = {"name": "minilm", "model": {"builtin": "all-minilm-l6-v2"}}


def text_request(texts: list[str]) -> dict[str, Any]:
    return {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]}


async def read_events(p: Platform, kind: str) -> list[dict[str, Any]]:
    """Every event of ``kind`` so far (read from the EVENTS stream until it has no more)."""
    js = p.services["scheduler"].js
    sub = await js.subscribe(subjects.event_filter(kind), ordered_consumer=True)
    out: list[dict[str, Any]] = []
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=0.5)
            except nats.errors.TimeoutError:
                return out
            out.append(json.loads(msg.data))
    finally:
        await sub.unsubscribe()
