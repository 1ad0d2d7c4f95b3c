"""Shared memory (issue 15, deliverable 6): private to the platform's user.

The shm root and every directory under it are 0700, every file 0600 and made with
``O_EXCL`` (then renamed into place); a root that another user owns, that others can
read or write, or that is a link, is refused at start with an error naming the path (a
service exits 2 with one line); the tensor store's tenant secret is 0600 from its first
byte and never replaced.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from gpufaas.memory.pool import HostBackend
from gpufaas.shared.catalog import resolve_model_dir
from gpufaas.shared.errors import InvalidArgument
from gpufaas.shared.messages import ModelSource
from gpufaas.shared.paths import check_root
from gpufaas.shared.shm import POOL_MIN_BYTES, delete_tube, write_segment, write_tube
from gpufaas.tensorstore.store import KEYS_DIR, HostStore
from tests.integration.conftest import DEMO_BODY, PlatformFactory, text_request


def modes(root: Path) -> dict[str, int]:
    """The permission bits of ``root`` and of everything under it, by relative path."""
    out = {".": stat.S_IMODE(os.lstat(root).st_mode)}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            out[str(path.relative_to(root))] = stat.S_IMODE(os.lstat(path).st_mode)
    return out


def assert_private(root: Path) -> None:
    """Directories 0700 and files 0600, nothing else (no links)."""
    for rel, mode in modes(root).items():
        st = os.lstat(root / rel)
        assert stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode), rel
        assert mode == (0o700 if stat.S_ISDIR(st.st_mode) else 0o600), (rel, oct(mode))


@pytest.mark.unit
def test_the_root_and_its_missing_parents_are_made_private(tmp_path: Path) -> None:
    root = tmp_path / "a" / "b" / "shm"
    assert check_root(root) == root
    assert modes(tmp_path / "a") == {".": 0o700, "b": 0o700, "b/shm": 0o700}
    assert check_root(root) == root  # idempotent


@pytest.mark.unit
@pytest.mark.parametrize("mode", [0o755, 0o750, 0o707, 0o777, 0o1777])
def test_a_root_open_to_others_is_refused_naming_it(tmp_path: Path, mode: int) -> None:
    root = tmp_path / "shm"
    root.mkdir()
    root.chmod(mode)
    with pytest.raises(InvalidArgument) as err:
        check_root(root)
    assert err.value.field == "shm_dir"
    assert str(root) in err.value.message
    assert "chmod 700" in err.value.message
    assert list(root.iterdir()) == []  # nothing made in it


@pytest.mark.unit
def test_a_root_that_is_a_link_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "shm").symlink_to(real, target_is_directory=True)
    with pytest.raises(InvalidArgument, match="not a directory"):
        check_root(tmp_path / "shm")


@pytest.mark.unit
@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user needs root")
def test_a_root_of_another_user_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "shm"
    root.mkdir(mode=0o700)
    os.chown(root, 4321, 4321)
    with pytest.raises(InvalidArgument, match="belongs to uid 4321"):
        check_root(root)


@pytest.mark.unit
def test_a_parent_others_can_change_is_refused_unless_sticky(tmp_path: Path) -> None:
    parent = tmp_path / "open"
    parent.mkdir()
    parent.chmod(0o777)  # anyone could rename our root away and put theirs in its place
    with pytest.raises(InvalidArgument, match="another user can change"):
        check_root(parent / "shm")
    parent.chmod(0o1777)  # like /dev/shm and /tmp: sticky, so only we can rename ours
    check_root(parent / "shm")


@pytest.mark.unit
def test_files_and_directories_are_private(tmp_path: Path) -> None:
    root = check_root(tmp_path / "shm")
    small = write_tube(root, "n1", "t1", datatype="UINT8", shape=[3], data=b"abc")
    big = b"x" * POOL_MIN_BYTES
    pooled = write_tube(root, "n1", "t1", datatype="UINT8", shape=[len(big)], data=big)
    delete_tube(root, pooled)  # into the pool of tube files
    write_tube(root, "n1", "t1", datatype="UINT8", shape=[len(big)], data=big)  # reused
    write_segment(root, "tensors/n1/seg", [b"weights"])
    HostBackend(root / "hostpool" / "n1", preallocate=False).create("s1", 4096)
    store = HostStore(root, "n1")
    store.recover()
    store.register_file(
        resolve_model_dir(ModelSource(builtin="all-minilm-l6-v2")) / "model.safetensors"
    )
    store.tenant_key("acme")
    assert small.placements[0].segment in modes(root)
    assert_private(root)


@pytest.mark.unit
def test_the_tenant_secret_is_private_from_its_first_byte_and_never_replaced(
    tmp_path: Path,
) -> None:
    root = check_root(tmp_path / "shm")
    store = HostStore(root, "n1")
    key = store.tenant_key("acme")
    secret = store.dir / KEYS_DIR / "tenant-secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert len(secret.read_bytes()) == 32
    again = HostStore(root, "n1")  # a restarted store reads it, never writes a new one
    assert again.tenant_key("acme") == key
    assert [p.name for p in secret.parent.iterdir()] == ["tenant-secret"]  # no staging left


@pytest.mark.integration
async def test_a_running_node_keeps_its_shared_memory_private(
    platform_factory: PlatformFactory,
) -> None:
    """Deploy and invoke with tubes for inputs and outputs; then walk the whole shm root."""
    p = await platform_factory(inline_threshold=16)
    resp = await p.client.post("/v1/functions", json=DEMO_BODY)
    assert resp.status == 201, await resp.text()
    resp = await p.client.post("/v2/models/minilm/infer", json=text_request(["a b c d e"] * 4))
    assert resp.status == 200, await resp.text()
    assert (p.config.shm_dir / "tubes").is_dir()  # its tubes were written (and dropped)
    assert any((p.config.shm_dir / "tensors").iterdir())
    assert_private(p.config.shm_dir)


@pytest.mark.integration
@pytest.mark.parametrize("service", ["transfer", "tensorstore"])
def test_a_service_refuses_a_world_writable_root_with_one_line(
    tmp_path: Path, service: str
) -> None:
    root = tmp_path / "shm"
    root.mkdir()
    root.chmod(0o777)
    env = {**os.environ, "GPUFAAS_SHM_DIR": str(root), "GPUFAAS_DEVICES": "cpu"}
    done = subprocess.run(
        [sys.executable, "-m", f"gpufaas.{service}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert str(root) in lines[0]
    assert "0777" in lines[0]
