"""This node's copies of tubes, on real files without NATS: which placement is readable
here, where new copies go, which files the sweeper looks at, and the SLO verdict."""

from __future__ import annotations

from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from gpufaas.shared.config import Config
from gpufaas.shared.errors import InvalidArgument
from gpufaas.shared.memory_client import MemoryClient
from gpufaas.shared.messages import EnsureRequest, Placement, Tube
from gpufaas.shared.shm import SegmentCache
from gpufaas.transfer.copies import deadline_met
from gpufaas.transfer.directory import TubeDirectory
from gpufaas.transfer.residency import LocalCopies, gpu_block, gpu_index, staging
from gpufaas.transfer.sweeper import Sweeper

pytestmark = pytest.mark.unit

NBYTES = 16


def no_nats() -> NATS:
    raise AssertionError("these tests never reach the memory service")


@pytest.fixture
def local(tmp_path: Path) -> LocalCopies:
    config = Config(node_id="node-a", shm_dir=tmp_path, devices="sim:2")
    memory = MemoryClient(no_nats, "node-a", "transfer@node-a", timeout_s=1)
    return LocalCopies(
        config, {"host", "gpu:1", "gpu:0", "object"}, memory, SegmentCache(tmp_path), cuda=False
    )


def write(local: LocalCopies, relpath: str, nbytes: int = NBYTES) -> None:
    path = local.config.shm_dir / relpath  # stray files too (hidden, not a tube's name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * nbytes)


def tube(*placements: Placement) -> Tube:
    return Tube(
        id="t1",
        tenant="acme",
        datatype="UINT8",
        shape=[NBYTES],
        nbytes=NBYTES,
        placements=list(placements),
    )


def test_a_copy_is_found_only_when_all_its_bytes_are_there(local: LocalCopies) -> None:
    here = Placement(node="node-a", tier="host", segment=local.host_relpath("t1"))
    assert local.find(tube(here), "host") is None  # no file yet
    write(local, here.segment, NBYTES - 1)
    assert local.find(tube(here), "host") is None  # half written
    write(local, here.segment)
    assert local.find(tube(here), "host") == here
    at = Placement(node="node-a", tier="host", segment=here.segment, offset=1)
    assert local.find(tube(at), "host") is None  # offset + nbytes runs past the end


def test_another_nodes_host_copy_on_this_machine_is_read_in_place(local: LocalCopies) -> None:
    theirs = Placement(node="node-b", tier="host", segment="tubes/node-b/t1")
    write(local, theirs.segment)
    assert local.find(tube(theirs), "host") == theirs
    gpu = Placement(node="node-b", tier="gpu:0", segment="gpu/node-b/gpu0/t1.1")
    write(local, gpu.segment)
    assert local.find(tube(gpu), "gpu:0") is None  # another node's GPU is not ours


def test_the_first_gpu_holding_a_copy_is_the_source_of_gpu_copies(local: LocalCopies) -> None:
    on1 = Placement(node="node-a", tier="gpu:1", segment=local.gpu_relpath("gpu:1", "t1", 7))
    on0 = Placement(node="node-a", tier="gpu:0", segment=local.gpu_relpath("gpu:0", "t1", 3))
    assert (on1.segment, on0.segment) == ("gpu/node-a/gpu1/t1.7", "gpu/node-a/gpu0/t1.3")
    write(local, on1.segment)
    assert local.on_gpu(tube(on1, on0)) == on1
    write(local, on0.segment)
    assert local.on_gpu(tube(on1, on0)) == on0
    assert local.swap_bytes(tube(on0)) == NBYTES  # its only copy: a swap copies it all


def test_the_object_tier_needs_no_file(local: LocalCopies) -> None:
    stored = Placement(node="*", tier="object", segment="t1")
    assert local.find(tube(stored), "object") == stored
    assert local.find(tube(), "object") is None


def test_gpu_copies_are_named_after_their_block() -> None:
    assert gpu_block(Path("shm/gpu/node-a/gpu3/t1.42")) == ("gpu:3", 42)
    assert gpu_block(Path("shm/tubes/node-a/t1")) is None
    assert gpu_block(Path("shm/tubes/node-a/t1.42")) is None  # not a GPU's directory
    assert gpu_block(Path("shm/gpu/node-a/host/t1.42")) is None
    assert gpu_block(Path("shm/gpu/node-a/gpu0/t1.tmp")) is None


def test_gpu_index_and_staging_names() -> None:
    assert gpu_index("gpu:12") == 12
    with pytest.raises(InvalidArgument):
        gpu_index("gpu0")
    tmp = staging(Path("shm/tubes/node-a/t1"))
    assert tmp.parent == Path("shm/tubes/node-a")
    assert tmp.name.startswith(".t1.")  # hidden: the sweeper never looks at it


def test_the_sweeper_looks_at_this_nodes_files_only(local: LocalCopies) -> None:
    for relpath in (
        "tubes/shared1",
        "tubes/node-a/t1",
        "tubes/node-a/.t2.123.tmp",
        "tubes/node-b/t3",
        "gpu/node-a/gpu0/t4.5",
        "gpu/node-b/gpu0/t6.7",
    ):
        write(local, relpath)
    sweeper = Sweeper(TubeDirectory(lambda: pytest.fail("no KV here")), local, None)
    names = sorted(str(f.relative_to(local.config.shm_dir)) for f in sweeper.tube_files())
    assert names == ["gpu/node-a/gpu0/t4.5", "tubes/node-a/t1", "tubes/shared1"]


async def test_dropping_a_host_file_deletes_it(local: LocalCopies) -> None:
    write(local, "tubes/node-a/t1")
    await local.drop_file(local.path("tubes/node-a/t1"))
    assert not local.path("tubes/node-a/t1").exists()


@pytest.mark.parametrize(
    ("slo_ms", "took_s", "met"),
    [(None, 1.0, None), (10.0, 0.004, True), (10.0, 0.006, False), (10.0, 0.005, True)],
)
def test_a_copy_meets_its_deadline_if_it_leaves_the_inference_time(
    slo_ms: float | None, took_s: float, met: bool | None
) -> None:
    req = EnsureRequest(tube_id="t1", tenant="acme", tier="gpu:0", slo_ms=slo_ms, inference_ms=5)
    assert deadline_met(req, took_s) is met
