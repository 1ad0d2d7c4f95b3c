"""An in-process platform (every service on one event loop) over a real nats-server."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
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
from gpufaas.shared.apikeys import create_key
from gpufaas.shared.config import Config
from gpufaas.shared.service import Service
from gpufaas.tensorstore.service import TensorStoreService
from gpufaas.transfer.service import TransferService
from gpufaas.worker.service import WorkerService
from tests.conftest import NatsServer, free_port

NODE_SERVICES = (MemoryService, TensorStoreService, TransferService, WorkerService)


@dataclass
class Platform:
    """Handles on a running in-process platform."""

    config: Config
    nats: NatsServer
    client: TestClient[Any, Any]
    services: dict[str, Service] = field(default_factory=dict)
    api_key: str = ""  # the client's default key: an admin key of tenant "default"
    keys: dict[str, str] = field(default_factory=dict)

    async def key_for(self, tenant: str, *, admin: bool = False) -> str:
        """An API key of ``tenant`` (made once per tenant and kind, then reused)."""
        name = f"{tenant}{'/admin' if admin else ''}"
        if name not in self.keys:
            bucket = self.services["scheduler"].kv.keys
            self.keys[name], _ = await create_key(bucket, tenant, admin, label="tests")
        return self.keys[name]

    async def restart_control_plane(self) -> None:
        """Stop and start the scheduler and a fresh gateway (state must come from KV)."""
        await self.services["scheduler"].stop()
        await self.client.close()
        self.services["scheduler"] = SchedulerService(self.config)
        await self.services["scheduler"].start()
        self.client = gateway_client(self.config, self.api_key)
        await self.client.start_server()

    async def stop(self) -> None:
        await self.client.close()
        for svc in reversed(list(self.services.values())):
            await svc.stop()


def bearer(key: str) -> dict[str, str]:
    """The header that authenticates a request with ``key``."""
    return {"Authorization": f"Bearer {key}"}


def gateway_client(config: Config, key: str) -> TestClient[Any, Any]:
    """A test client of a fresh gateway that sends ``key`` with every request."""
    return TestClient(TestServer(create_app(config)), headers=bearer(key))


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
        # Server paths (admin keys): the test's and its session's temporary directories.
        model_roots=(str(tmp_path.parent),),
        grpc_port=free_port(),  # the gateway's gRPC server (tests/integration/test_grpc.py)
    )
    return base.replace(**overrides)


async def start_platform(
    config: Config,
    nats: NatsServer,
    nodes: Sequence[str] = (),
    *,
    control: str | None = None,
    node_services: Sequence[type[Service]] = NODE_SERVICES,
) -> Platform:
    """Each node's services, then the scheduler and a gateway, all on this event loop.

    With no ``nodes``: one node, ``config.node_id``, its services named as they are
    ("worker", "scheduler"). With ``nodes``: each has its own shm directory and its services
    are named ``"<service>@<node>"``; the scheduler and the gateway run with the config of
    ``control`` (the first node unless named).
    """
    services: dict[str, Service] = {}
    if nodes:
        configs = {n: config.replace(node_id=n, shm_dir=config.shm_dir / n) for n in nodes}
        base = configs[control or nodes[0]]
        for node, node_config in configs.items():
            services |= {f"{cls.name}@{node}": cls(node_config) for cls in node_services}
    else:
        base = config
        services |= {cls.name: cls(config) for cls in node_services}
    services["scheduler"] = SchedulerService(base)
    started: list[Service] = []
    try:
        for svc in services.values():
            await svc.start()
            started.append(svc)
        key, _ = await create_key(services["scheduler"].kv.keys, "default", True, label="tests")
        client = gateway_client(base, key)
        await client.start_server()
    except BaseException:
        for svc in reversed(started):
            await svc.stop()
        raise
    return Platform(base, nats, client, services, api_key=key, keys={"default/admin": key})


PlatformFactory = Callable[..., Awaitable[Platform]]


@pytest.fixture
async def platform_factory(
    nats_server: NatsServer, tmp_path: Path
) -> AsyncIterator[PlatformFactory]:
    """``await platform_factory(nodes=[...], control=..., node_services=..., **settings)``
    starts a platform (``start_platform``) with ``config`` (``make_config`` by default) and
    ``settings`` on top; each is stopped after the test."""
    started: list[Platform] = []

    async def make(
        nodes: Sequence[str] = (),
        *,
        control: str | None = None,
        node_services: Sequence[type[Service]] = NODE_SERVICES,
        config: Config | None = None,
        **settings: Any,
    ) -> Platform:
        config = (config or make_config(nats_server, tmp_path)).replace(**settings)
        p = await start_platform(
            config, nats_server, nodes, control=control, node_services=node_services
        )
        started.append(p)
        return p

    yield make
    for p in reversed(started):
        await p.stop()


@pytest.fixture
def platform_config(nats_server: NatsServer, tmp_path: Path) -> Config:
    """Override in a test module to change settings."""
    return make_config(nats_server, tmp_path)


@pytest.fixture
async def platform(platform_factory: PlatformFactory, platform_config: Config) -> Platform:
    """One node, ``node-t``, with every service (``platform_config``'s settings)."""
    return await platform_factory(config=platform_config)


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
