"""Zero-trust content (issue 15, deliverable 3): nothing read from NATS or KV is a path.

Every id, name, offset and path a message or record carries is checked on decode (a typed
``invalid_argument`` naming the field), a record is read only under its own key, and every
path from the wire is joined under its root (``shared/paths.py``): a forged tube record
(``../`` in its id, an absolute segment, a segment outside its tier's directory, a symbolic
link in the tubes directory) gets ``invalid_argument``/``not_found`` and the file it aims
at is untouched. A malformed record in ``gpufaas_functions`` or ``gpufaas_tubes`` (the
issue's measured attack: ``{}`` under ``evil.x``) is skipped while serving goes on.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest

from gpufaas.memory.service import MemoryService
from gpufaas.shared import subjects
from gpufaas.shared.config import Config
from gpufaas.shared.errors import InvalidArgument, NotFound, PlatformError
from gpufaas.shared.kv import MALFORMED
from gpufaas.shared.messages import (
    AdoptReply,
    AdoptRequest,
    Breakdown,
    DeviceRef,
    EnsureReply,
    EnsureRequest,
    FetchReply,
    FetchRequest,
    Heartbeat,
    InvokeReply,
    MemAllocation,
    Msg,
    Placement,
    QueuedTube,
    RegisterReply,
    ResolveReply,
    ResolveRequest,
    TensorRef,
    Tube,
    TubeReleaseRequest,
    decode,
    encode,
    encode_json,
)
from gpufaas.shared.paths import open_fd, read_file, under
from gpufaas.shared.rpc import request
from gpufaas.shared.shm import delete_tube, new_id, read_tube, write_tube
from gpufaas.shared.workflows import StepReport
from gpufaas.transfer.service import TransferService
from tests.conftest import NatsServer
from tests.integration.conftest import DEMO_BODY, Platform, make_config, text_request
from tests.support import eventually

TUBE = "T" * 24  # the shape of shm.new_id()
TENSOR = "ab" * 32  # a blake3 hex digest


def tube(segment: str = f"tubes/{TUBE}", tier: str = "host", **kw: Any) -> Tube:
    fields: dict[str, Any] = {
        "id": TUBE,
        "tenant": "t1",
        "datatype": "UINT8",
        "shape": [6],
        "nbytes": 6,
        "placements": [Placement(node="node-a", tier=tier, segment=segment)],
    }
    return Tube(**(fields | kw))


# --- every constraint refuses a bad value, naming the field --------------------------------

VALID: dict[str, Msg] = {
    "tube": tube(),
    "ensure": EnsureRequest(tube_id=TUBE, tenant="t1"),
    "resolve": ResolveRequest(tube_id=TUBE),
    "release": TubeReleaseRequest(tube_id=TUBE, tier="gpu:0"),
    "fetch": FetchRequest(tube_id=TUBE, tenant="t1", offset=0, nbytes=6),
    "queued": QueuedTube(id=TUBE, tenant="t1", nbytes=6, position=0),
    "ref": TensorRef(
        id=TENSOR, dtype="float32", shape=[4], nbytes=16, segment="tensors/n1/s1", offset=0
    ),
    "register": RegisterReply(
        model_dir="/m",
        manifest={},
        model_bytes=0,
        bytes_stored=0,
        bytes_deduplicated=0,
        register_us=1,
        program=f"tensors/n1/models/{'0' * 32}.program",
    ),
    "alloc": MemAllocation(id=1, device="host", segment="abc", offset=0, nbytes=8, owner="o"),
    "device_ref": DeviceRef(segment="abc", offset=0),
    "heartbeat": Heartbeat(node="n1", service="worker", pid=1, started_at=0, updated_at=0),
}

# (sample, path of the field, a bad value, the field the error names)
BAD: list[tuple[str, list[str | int], Any, str]] = [
    ("tube", ["id"], "../../etc/passwd", "id"),
    ("tube", ["id"], "A" * 23, "id"),
    ("tube", ["placements", 0, "segment"], "/etc/passwd", "placements[0].segment"),
    ("tube", ["placements", 0, "segment"], f"tubes/../../{TUBE}", "placements[0].segment"),
    ("tube", ["placements", 0, "segment"], "tensors/n1/s1", "placements[0].segment"),
    ("tube", ["placements", 0, "segment"], f"tubes/.pool/{TUBE}", "placements[0].segment"),
    ("tube", ["placements", 0, "node"], "../n", "placements[0].node"),
    ("tube", ["placements", 0, "offset"], -1, "placements[0].offset"),
    ("tube", ["nbytes"], 1 << 60, "nbytes"),
    ("tube", ["tenant"], "Evil/..", "tenant"),
    ("ensure", ["tube_id"], f"../{TUBE}", "tube_id"),
    ("resolve", ["tube_id"], "bad key!", "tube_id"),
    ("release", ["tube_id"], "", "tube_id"),
    ("fetch", ["offset"], -4, "offset"),
    ("fetch", ["nbytes"], 1 << 62, "nbytes"),
    ("queued", ["id"], "x", "id"),
    ("ref", ["segment"], "/dev/shm/x", "segment"),
    ("ref", ["segment"], "tensors/n1/../../x", "segment"),
    ("ref", ["id"], "not-hex", "id"),
    ("ref", ["dtype"], "load(", "dtype"),
    ("ref", ["offset"], -1, "offset"),
    ("register", ["program"], "../../../site-packages/x.pth", "program"),
    ("alloc", ["segment"], "../../etc", "segment"),
    ("device_ref", ["segment"], "a/b", "segment"),
    ("heartbeat", ["node"], "n1.evil", "node"),
]


def _forged(sample: Msg, path: list[str | int], value: Any) -> bytes:
    body = msgspec.to_builtins(sample)
    at = body
    for step in path[:-1]:
        at = at[step]
    at[path[-1]] = value
    return msgspec.msgpack.encode(body)


@pytest.mark.unit
@pytest.mark.parametrize(("sample", "path", "value", "field"), BAD)
def test_every_constraint_refuses_a_bad_value_naming_the_field(
    sample: str, path: list[str | int], value: Any, field: str
) -> None:
    good = VALID[sample]
    assert decode(encode(good), type(good)) == good  # the sample itself is valid
    with pytest.raises(InvalidArgument) as err:
        decode(_forged(good, path, value), type(good))
    assert err.value.field == field


@pytest.mark.unit
def test_node_ids_in_replies_and_records_are_checked() -> None:
    """A node id ends up in subjects, headers and file names: never a newline or a dot."""
    reply = InvokeReply(
        function="f", request_id="r", outputs=[], node="n1", device="gpu:0", breakdown=Breakdown()
    )
    with pytest.raises(InvalidArgument) as err:
        decode(_forged(reply, ["node"], "n1\r\nSet-Cookie: x"), InvokeReply)
    assert err.value.field == "node"
    step = StepReport(step="s", function="f", node="n1", device="cpu", breakdown=Breakdown())
    with pytest.raises(InvalidArgument) as err:
        decode(_forged(step, ["node"], "a.b"), StepReport)
    assert err.value.field == "node"


# --- paths from the wire are joined under their root ---------------------------------------


@pytest.mark.unit
def test_under_keeps_a_wire_path_under_its_root(tmp_path: Path) -> None:
    root = tmp_path / "shm"
    (root / "tubes").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "tubes" / "out").symlink_to(outside)
    assert under(root, f"tubes/{TUBE}") == root / "tubes" / TUBE
    for bad in ("/etc/passwd", "../x", "tubes/../../x", "tubes//x", ".hidden", "", "a\x00b"):
        with pytest.raises(InvalidArgument) as err:
            under(root, bad)
        assert err.value.field == "segment"
    with pytest.raises(InvalidArgument, match="outside"):
        under(root, "tubes/out/secret")  # a link on the way leads out
    (root / "tubes" / "link").symlink_to(root / "tubes" / "real")
    (root / "tubes" / "real").write_bytes(b"x")
    with pytest.raises(InvalidArgument, match="symbolic link"):
        open_fd(root / "tubes" / "link", os.O_RDONLY)  # never through a link, even inside
    with pytest.raises(InvalidArgument, match="symbolic link"):
        read_file(root / "tubes" / "link")


def _target(tmp_path: Path) -> tuple[Path, Callable[[], None]]:
    """A file outside the shm root, and a check that it is exactly as it was."""
    target = tmp_path / "outside" / "victim.pth"
    target.parent.mkdir(exist_ok=True)
    target.write_bytes(b"import os; os.system('boom')\n")
    before = (target.read_bytes(), target.stat().st_mtime_ns, target.stat().st_mode)

    def untouched() -> None:
        assert target.is_file()
        assert not target.is_symlink()
        st = target.stat()
        assert (target.read_bytes(), st.st_mtime_ns, st.st_mode) == before

    return target, untouched


@pytest.mark.unit
def test_the_gateways_tube_files_never_follow_a_forged_placement(tmp_path: Path) -> None:
    target, untouched = _target(tmp_path)
    root = tmp_path / "shm"
    real = write_tube(root, "n1", "t1", datatype="UINT8", shape=[3], data=b"abc")
    link = root / "tubes" / TUBE
    link.symlink_to(target)
    linked = tube(nbytes=target.stat().st_size)
    with pytest.raises(InvalidArgument):
        read_tube(root, linked)  # resolved outside the root
    os.replace(root / real.placements[0].segment, root / "tubes" / "victim")
    (root / real.placements[0].segment).symlink_to(root / "tubes" / "victim")
    with pytest.raises(NotFound):
        read_tube(root, real)  # a link is no copy, even one to a file inside the root
    wrong_dir = tube(segment=f"gpu/n1/gpu0/{TUBE}.1")  # a host copy outside tubes/
    with pytest.raises(InvalidArgument) as err:
        read_tube(root, wrong_dir)
    assert err.value.field == "segment"
    delete_tube(root, linked)  # refused: nothing is removed through a link
    delete_tube(root, wrong_dir)
    untouched()


class Node:
    """node-a's memory and transfer services, and node-b's transfer service (to fetch)."""

    def __init__(self, a: TransferService, b: TransferService) -> None:
        self.a, self.b = a, b

    @property
    def shm(self) -> Path:
        return self.a.config.shm_dir

    async def put(self, key: str, record: bytes) -> None:
        await self.a.buckets.tubes.put(key, record)

    async def ask(self, verb: str, req: Msg, reply: type[Msg], node: str = "node-a") -> Any:
        subject = subjects.node(node, "transfer", verb)
        return await request(self.b.nc, subject, req, reply, timeout=10)


@pytest.fixture
async def node(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[Node]:
    def config(name: str) -> Config:
        return make_config(nats_server, tmp_path, node_id=name, shm_dir=tmp_path / name)

    services = [
        MemoryService(config("node-a")),
        TransferService(config("node-a")),
        TransferService(config("node-b")),
    ]
    for s in services:
        await s.start()
    yield Node(services[1], services[2])  # type: ignore[arg-type]
    for s in reversed(services):
        await s.stop()


async def _refused(node: Node, tube_id: str = TUBE) -> list[PlatformError]:
    """Every way a tube's bytes are reached over NATS, each of which must fail typed."""
    calls: list[tuple[str, Msg, type[Msg], str]] = [
        (subjects.TRANSFER_ENSURE, EnsureRequest(tube_id=tube_id, tenant="t1"), EnsureReply, "a"),
        (
            subjects.TRANSFER_RESOLVE,
            ResolveRequest(tube_id=tube_id, tenant="t1"),
            ResolveReply,
            "a",
        ),
        (
            subjects.TRANSFER_ENSURE,
            EnsureRequest(tube_id=tube_id, tenant="t1", tier="gpu:0"),
            EnsureReply,
            "a",
        ),
        (
            subjects.TRANSFER_FETCH,
            FetchRequest(tube_id=tube_id, tenant="t1", offset=0, nbytes=6),
            FetchReply,
            "a",
        ),
        # node-b copies it from node-a: node-a refuses to serve the chunks
        (subjects.TRANSFER_ENSURE, EnsureRequest(tube_id=tube_id, tenant="t1"), EnsureReply, "b"),
    ]
    errors = []
    for verb, req, reply, at in calls:
        with pytest.raises(PlatformError) as err:
            await node.ask(verb, req, reply, node=f"node-{at}")
        errors.append(err.value)
    return errors


def _in_tubes(node: Node) -> Path:
    tubes = node.shm / "tubes"
    tubes.mkdir(mode=0o700, exist_ok=True)
    return tubes


def _absolute(node: Node, target: Path) -> bytes:
    return _json(tube(), placements=[{"node": "node-a", "tier": "host", "segment": str(target)}])


def _dotdot_id(node: Node, target: Path) -> bytes:
    return _json(tube(), id=f"../../{target.parent.name}/{target.name}")


def _dotdot_segment(node: Node, target: Path) -> bytes:
    segment = f"tubes/../../outside/{target.name}"
    return _json(tube(), placements=[{"node": "node-a", "tier": "host", "segment": segment}])


def _another_tubes_record(node: Node, target: Path) -> bytes:
    return encode_json(tube(id="O" * 24))  # well-formed, but not the record of its key


def _linked_file(node: Node, target: Path) -> bytes:
    (_in_tubes(node) / TUBE).symlink_to(target)
    return encode_json(tube(nbytes=6))


def _linked_dir(node: Node, target: Path) -> bytes:
    (_in_tubes(node) / "node-a").symlink_to(target.parent, target_is_directory=True)
    os.link(target, target.with_name(TUBE))  # the same file, under the tube's name
    return encode_json(tube(segment=f"tubes/node-a/{TUBE}", nbytes=6))


def _another_tubes_file(node: Node, target: Path) -> bytes:
    """t1's record naming tenant t2's tube file (here the victim's inode itself)."""
    other = write_tube(node.shm, "node-a", "t2", datatype="UINT8", shape=[1], data=b"x")
    theirs = node.shm / other.placements[0].segment
    theirs.unlink()
    os.link(target, theirs)
    return encode_json(tube(segment=other.placements[0].segment, nbytes=6))


def _outside_its_tier(node: Node, target: Path) -> bytes:
    return encode_json(tube(segment=f"gpu/node-a/gpu0/{TUBE}.1"))  # a host copy in gpu/


def _gpu_copy_in_tubes(node: Node, target: Path) -> bytes:
    (_in_tubes(node) / TUBE).symlink_to(target)
    return encode_json(tube(tier="gpu:0"))


@pytest.mark.integration
@pytest.mark.parametrize(
    "forge",
    [
        _absolute,
        _dotdot_id,
        _dotdot_segment,
        _another_tubes_record,
        _linked_file,
        _linked_dir,
        _another_tubes_file,
        _outside_its_tier,
        _gpu_copy_in_tubes,
    ],
)
async def test_a_forged_tube_record_is_refused_and_its_target_untouched(
    node: Node, tmp_path: Path, forge: Callable[[Node, Path], bytes]
) -> None:
    target, untouched = _target(tmp_path)
    await node.put(TUBE, forge(node, target))
    errors = await _refused(node)
    assert all(isinstance(e, InvalidArgument | NotFound) for e in errors), errors
    untouched()
    # The gateway's and the worker's own readers refuse it too (O_NOFOLLOW, under the root).
    forged = await node.a.kv.tubes.value(TUBE)
    if forged is not None:
        with pytest.raises((InvalidArgument, NotFound)):
            read_tube(node.shm, forged)
        await asyncio.to_thread(delete_tube, node.shm, forged)
    untouched()


def _json(t: Tube, **override: Any) -> bytes:
    body = msgspec.to_builtins(t) | override
    return msgspec.json.encode(body)


@pytest.mark.integration
async def test_a_forged_ensure_or_fetch_request_is_a_typed_error(node: Node) -> None:
    for bad in (f"../{TUBE}", "/etc/passwd", "x" * 25):
        with pytest.raises(InvalidArgument) as err:
            await node.ask(subjects.TRANSFER_ENSURE, _raw_ensure(bad), EnsureReply)
        assert err.value.field == "tube_id"
    fetch = msgspec.to_builtins(FetchRequest(tube_id=TUBE, tenant="t1", offset=0, nbytes=1))
    fetch["offset"] = -1
    subject = subjects.node("node-a", "transfer", subjects.TRANSFER_FETCH)
    reply = await node.b.nc.request(subject, msgspec.msgpack.encode(fetch), timeout=10)
    assert reply.headers is not None
    assert reply.headers["Gpufaas-Error-Code"] == "invalid_argument"


class _RawEnsure(msgspec.Struct, tag="ensure_request.v1", tag_field="type"):
    tube_id: str
    tenant: str = "t1"
    tier: str = "host"


def _raw_ensure(tube_id: str) -> Any:
    """An ensure request with any id (the real struct would be refused on decode only)."""
    return _RawEnsure(tube_id=tube_id)


@pytest.mark.integration
async def test_adopt_takes_only_the_tubes_own_file(node: Node, tmp_path: Path) -> None:
    target, untouched = _target(tmp_path)
    shm = node.shm
    own = await asyncio.to_thread(
        write_tube, shm, "node-a", "t1", datatype="UINT8", shape=[3], data=b"abc"
    )
    not_its_own = msgspec.structs.replace(own, id=new_id())  # names another tube's file
    link_id = new_id()
    (shm / "tubes" / link_id).symlink_to(target)
    linked = msgspec.structs.replace(
        own,
        id=link_id,
        nbytes=target.stat().st_size,
        placements=[Placement(node="node-a", tier="host", segment=f"tubes/{link_id}")],
    )
    two = msgspec.structs.replace(own, placements=[*own.placements, *own.placements])
    for forged in (not_its_own, linked, two):
        with pytest.raises(InvalidArgument):
            await node.ask(
                subjects.TRANSFER_ADOPT, AdoptRequest(tube=forged, tier="gpu:0"), AdoptReply
            )
    untouched()
    assert (shm / own.placements[0].segment).read_bytes() == b"abc"  # nothing moved
    adopted = await node.ask(
        subjects.TRANSFER_ADOPT, AdoptRequest(tube=own, tier="gpu:0"), AdoptReply
    )
    assert adopted.tube.placements[0].tier == "gpu:0"


# --- a malformed record is skipped while serving goes on -----------------------------------


@pytest.mark.integration
async def test_malformed_records_are_skipped_while_serving_continues(platform: Platform) -> None:
    """The issue's attack: one client puts ``{}`` under ``evil.x`` in ``gpufaas_functions``
    (and forged records beside it); the platform keeps serving, also after a restart."""
    c = platform.client
    resp = await c.post("/v1/functions", json=DEMO_BODY)
    assert resp.status == 201, await resp.text()
    record = await resp.read()
    before = dict(MALFORMED)
    nc = await nats.connect(platform.nats.url)  # a raw client, as an attacker would use
    try:
        js = nc.jetstream()
        functions = await js.key_value("gpufaas_functions")
        await functions.put("evil.x", b"{}")
        await functions.put("evil.y", record)  # minilm's record, under another key
        await functions.put("default.ghost", b'{"type": "function.v1", "spec": 1}')
        tubes = await js.key_value("gpufaas_tubes")
        await tubes.put("evil", b"{}")
        await tubes.put(TUBE, _json(tube(), id=f"../../{TUBE}"))

        def skipped() -> bool:
            return MALFORMED.get("gpufaas_functions", 0) >= before.get("gpufaas_functions", 0) + 3

        await eventually(skipped, what="the functions watches to skip the records")
        await _serves(platform)
        await platform.restart_control_plane()  # the records are replayed at start
        await _serves(platform)
    finally:
        await nc.close()
    assert all(s.fatal is None for s in platform.services.values())


async def _serves(platform: Platform) -> None:
    c = platform.client
    resp = await c.post("/v2/models/minilm/infer", json=text_request(["hello world"]))
    assert resp.status == 200, await resp.text()
    resp = await c.get("/v1/functions")
    assert resp.status == 200, await resp.text()
    names = [f["spec"]["name"] for f in (await resp.json())["functions"]]
    assert names == ["minilm"]  # none of the forged records
    for path in ("/v1/functions/x", "/v1/nodes"):
        resp = await c.get(path)
        assert resp.status in (200, 404), await resp.text()
