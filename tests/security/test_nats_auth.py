"""The authenticated mesh (issue 15, deliverable 2): a real nats-server with the config
`gpufaas up` writes, each role connecting with its own generated credentials.

An anonymous or wrong-password client is refused; a worker's credentials are refused
(permission violation) on the scheduler's subjects, another node's heartbeat key, another
user's inbox and a reply it was not asked for; each role's own traffic still works.
"""

from __future__ import annotations

import stat
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
import nats.errors
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg as NatsMsg

from gpufaas.embedded import MeshSecrets, accepting, nats_server_binary, write_config
from gpufaas.shared import constants as c
from gpufaas.shared import subjects
from gpufaas.shared.config import Config
from gpufaas.shared.errors import InvalidArgument
from gpufaas.shared.jetstream import ensure_jetstream
from gpufaas.shared.nats_auth import connect_options, inbox_prefix, worker_identity
from tests.conftest import free_port
from tests.support import eventually, eventually_blocking

pytestmark = pytest.mark.integration

NODES = ["node-0", "node-1"]


@dataclass
class Mesh:
    url: str
    secrets: MeshSecrets
    conf: Path

    def config(self, role: str, node: str = "") -> Config:
        env = self.secrets.settings(role, node)
        return Config(
            nats_url=self.url,
            nats_user=env["GPUFAAS_NATS_USER"],
            nats_password_file=env["GPUFAAS_NATS_PASSWORD_FILE"],
        )


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    """A nats-server with the users and permissions of a two-node `gpufaas up`."""
    port = free_port()
    secrets = MeshSecrets.generate(tmp_path / "run" / "secrets", NODES)
    conf = write_config(tmp_path / "data", "127.0.0.1", port, mesh=secrets)
    proc = subprocess.Popen(
        [str(nats_server_binary()), "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        eventually_blocking(lambda: accepting("127.0.0.1", port), 10, "nats-server")
        yield Mesh(f"nats://127.0.0.1:{port}", secrets, conf)
    finally:
        proc.terminate()
        proc.wait(10)


class Client:
    """A connection as one role, collecting the server's asynchronous errors."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.nc: NATS | None = None

    async def connect(self, config: Config) -> NATS:
        async def on_error(exc: Exception) -> None:
            self.errors.append(str(exc))

        self.nc = await nats.connect(
            config.nats_url, error_cb=on_error, allow_reconnect=False, **connect_options(config)
        )
        return self.nc

    @property
    def conn(self) -> NATS:
        assert self.nc is not None, "not connected"
        return self.nc

    async def refused(self, what: str) -> None:
        """Wait for the server's permission violation naming ``what``."""
        assert self.nc is not None
        await self.nc.flush()
        await eventually(
            lambda: any("permissions violation" in e and what.lower() in e for e in self.errors),
            5,
            f"a permissions violation for {what}",
        )


@pytest.fixture
async def roles(mesh: Mesh) -> AsyncIterator[dict[str, Client]]:
    """Connections as admin (JetStream resources made), a worker and a node of node-0,
    the scheduler and the gateway, each collecting its server errors."""
    clients: dict[str, Client] = {}
    for role, node in [
        ("admin", ""),
        ("worker", "node-0"),
        ("node", "node-0"),
        ("scheduler", ""),
        ("gateway", ""),
    ]:
        clients[role] = Client()
        await clients[role].connect(mesh.config(role, node))
    await ensure_jetstream(clients["admin"].conn.jetstream(), node_ttl_s=10, tube_ttl_s=60)
    yield clients
    for each in clients.values():
        await each.conn.close()


async def refused_connect(url: str, **options: object) -> str:
    """The error a connection attempt ends with (its socket closed: no leak)."""
    nc = NATS()
    try:
        await nc.connect(url, allow_reconnect=False, connect_timeout=2, **options)  # type: ignore[arg-type]
    except nats.errors.Error as exc:
        return str(exc)
    finally:
        await nc.close()
    return "connected"


async def test_a_connection_without_credentials_is_refused(mesh: Mesh) -> None:
    assert "Authorization Violation" in await refused_connect(mesh.url)
    wrong = mesh.config("gateway").nats_password_file
    other = mesh.config("admin").replace(nats_password_file=wrong)  # admin with gateway's
    assert "Authorization Violation" in await refused_connect(mesh.url, **connect_options(other))


def test_secrets_and_server_config_are_owner_only(mesh: Mesh) -> None:
    assert stat.S_IMODE(mesh.conf.stat().st_mode) == 0o600
    assert stat.S_IMODE(mesh.secrets.directory.stat().st_mode) == 0o700
    for f in mesh.secrets.directory.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f


async def test_a_worker_cannot_act_as_the_scheduler_or_another_node(
    roles: dict[str, Client],
) -> None:
    worker, admin = roles["worker"].conn, roles["admin"].conn
    await worker.publish(subjects.SCHED_INVOKE, b"{}")
    await roles["worker"].refused(f'publish to "{subjects.SCHED_INVOKE}"')
    await worker.subscribe(subjects.SCHED_INVOKE, queue=c.SCHEDULER_QUEUE)
    await roles["worker"].refused(f'subscription to "{subjects.SCHED_INVOKE}"')

    other_beat = subjects.kv_key(c.KV_NODES, "node-1.memory")
    await worker.publish(other_beat, b"{}")
    await roles["worker"].refused(f'publish to "{other_beat}"')
    nodes = await admin.jetstream().key_value(c.KV_NODES)
    with pytest.raises(nats.js.errors.KeyNotFoundError):
        await nodes.get("node-1.memory")  # nothing was written

    gateway_inbox = f"{inbox_prefix('gateway')}.>"
    await worker.subscribe(gateway_inbox)
    await roles["worker"].refused(f'subscription to "{gateway_inbox}"')
    forged = f"{inbox_prefix('gateway')}.abc.1"  # a scheduler reply nobody asked it for
    await worker.publish(forged, b"{}")
    await roles["worker"].refused(f'publish to "{forged}"')


async def test_a_node_writes_only_its_own_heartbeats(roles: dict[str, Client]) -> None:
    js = roles["node"].conn.jetstream()
    nodes = await js.key_value(c.KV_NODES)
    await nodes.put("node-0.memory", b"{}")  # its own: acknowledged
    await roles["node"].conn.publish(subjects.kv_key(c.KV_NODES, "node-1.memory"), b"{}")
    await roles["node"].refused("node-1.memory")
    await roles["node"].conn.publish(subjects.SCHED_DEPLOY, b"{}")
    await roles["node"].refused(subjects.SCHED_DEPLOY)


async def test_each_role_keeps_its_own_traffic(roles: dict[str, Client]) -> None:
    """The scheduler asks a tenant's worker, which answers (allow_responses); the worker
    reads ``functions`` and writes ``tubes``; the gateway follows EVENTS; nothing refused."""
    worker, scheduler = roles["worker"].conn, roles["scheduler"].conn
    run = subjects.worker("node-0", "acme", subjects.WORKER_RUN)

    async def answer(msg: NatsMsg) -> None:
        await msg.respond(b"done")

    await worker.subscribe(run, cb=answer)
    await worker.flush()
    assert (await scheduler.request(run, b"go", timeout=5)).data == b"done"

    wjs = worker.jetstream()
    await (await wjs.key_value(c.KV_TUBES)).put("t1", b"{}")
    await (await roles["admin"].conn.jetstream().key_value(c.KV_FUNCTIONS)).put("acme.f", b"{}")
    assert (await (await wjs.key_value(c.KV_FUNCTIONS)).get("acme.f")).value == b"{}"
    await worker.publish(subjects.node("node-0", "memory", subjects.MEMORY_OBSERVE), b"{}")

    sub = (
        await roles["gateway"]
        .conn.jetstream()
        .subscribe(subjects.EVENTS_ALL, ordered_consumer=True)
    )
    await roles["scheduler"].conn.jetstream().publish(subjects.event("function.deployed"), b"{}")
    assert (await sub.next_msg(timeout=5)).subject == subjects.event("function.deployed")
    await sub.unsubscribe()
    for role in ("worker", "scheduler", "gateway"):
        await roles[role].conn.flush()
        assert roles[role].errors == [], role


def test_client_settings_come_in_pairs_and_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="GPUFAAS_NATS_USER"):
        connect_options(Config(nats_user="gateway"))
    with pytest.raises(InvalidArgument, match="cannot be read"):
        connect_options(Config(nats_user="gateway", nats_password_file=str(tmp_path / "x")))
    assert connect_options(Config()) == {}  # none configured: anonymous, as before


def test_the_pool_gives_its_workers_the_worker_identity(tmp_path: Path) -> None:
    secrets = MeshSecrets.generate(tmp_path, ["n"])
    env = secrets.node_env("n")
    pool = Config(
        nats_user=env["GPUFAAS_NATS_USER"],
        nats_password_file=env["GPUFAAS_NATS_PASSWORD_FILE"],
        worker_nats_user=env["GPUFAAS_WORKER_NATS_USER"],
        worker_nats_password_file=env["GPUFAAS_WORKER_NATS_PASSWORD_FILE"],
    )
    child = pool.to_env() | worker_identity(pool)
    assert child["GPUFAAS_NATS_USER"] == "worker_n"
    assert child["GPUFAAS_NATS_PASSWORD_FILE"].endswith("worker_n.password")
    assert child["GPUFAAS_WORKER_NATS_PASSWORD_FILE"] == ""  # nothing more to pass on
