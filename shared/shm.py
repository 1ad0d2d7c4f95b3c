"""Host shared-memory segments and host tubes.

A segment is a file under the node's shared-memory directory (``/dev/shm/...``),
written once (to a temporary name, then renamed, so a reader never sees half a
segment) and mapped ``MAP_SHARED`` by every process that reads it; the mapping is
cached per process. Tensor views over it are zero-copy.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Final

import structlog

from gpufaas.shared.errors import InvalidArgument, NotFound
from gpufaas.shared.messages import Placement, Tube
from gpufaas.shared.paths import DIR_MODE, open_fd, read_file, regular_size, under, write_private

TUBES_DIR: Final = "tubes"
TENSORS_DIR: Final = "tensors"
HOST_POOL_DIR: Final = "hostpool"  # the memory manager's host-tier segments: <dir>/<node>/

log = structlog.get_logger()


def host_pool_segment(node: str, segment: str) -> str:
    """The path (under the shared-memory root) of a segment of ``node``'s host pool."""
    return f"{HOST_POOL_DIR}/{node}/{segment}"


def new_id(nbytes: int = 18) -> str:
    """An unguessable identifier, safe in file names and subject tokens."""
    return secrets.token_urlsafe(nbytes)


def write_segment(root: Path, relpath: str, chunks: Iterable[bytes | memoryview]) -> int:
    """Write a whole segment atomically (a new 0600 file, renamed); returns its size."""
    return write_private(under(root, relpath), chunks)


class SegmentCache:
    """Per-process cache of mapped segments (opened once, reused by every view).

    ``private=True`` (the workers' weights) maps copy-on-write (``MAP_PRIVATE``) from a
    read-only descriptor: pages are the shared file's until written, and a write, by a
    bug or a hostile program, copies the page into this process alone and never reaches
    the file or any other process's view. Writers (tubes, the store's copies) map shared.
    """

    def __init__(self, root: Path, *, private: bool = False) -> None:
        self.root = root
        self.private = private
        self._maps: dict[str, mmap.mmap] = {}

    def map(self, relpath: str) -> mmap.mmap:
        """The mapping of a segment: read-write pages, shared or copy-on-write (``private``)."""
        m = self._maps.get(relpath)
        if m is None:
            path = under(self.root, relpath)  # a segment named on the wire: checked
            try:
                fd = open_fd(path, os.O_RDONLY if self.private else os.O_RDWR)
            except FileNotFoundError:
                raise NotFound(f"segment {relpath} is not on this node") from None
            flags = mmap.MAP_PRIVATE if self.private else mmap.MAP_SHARED
            try:
                m = mmap.mmap(fd, 0, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            finally:
                os.close(fd)
            self._maps[relpath] = m
        return m

    def forget(self, relpath: str) -> None:
        """Drop a cached mapping (views that still hold it keep it alive)."""
        self._maps.pop(relpath, None)

    def forget_missing(self) -> list[str]:
        """Drop the mappings of segments whose file is gone (deleted by their owner: a
        mapping would keep its pages alive); returns their paths."""
        gone = [r for r in self._maps if not (self.root / r).exists()]
        for relpath in gone:
            del self._maps[relpath]
        return gone

    def __len__(self) -> int:
        return len(self._maps)


# Released tube files are kept for reuse: writing into pages tmpfs already holds is a
# plain copy, while a new file first has every page allocated and zeroed by the kernel
# (25-30 ms for 64 MiB on the 2-core box, against ~7 ms for the copy; bench/handoff.py).
POOL_DIR: Final = ".pool"  # under TUBES_DIR
POOL_MIN_BYTES: Final = 1 << 20  # smaller tubes are cheap to allocate
POOL_MAX_FILES: Final = 16
POOL_MAX_SLACK: Final = 2  # reuse a file at most this many times the tube's size


def _reuse_pooled(root: Path, relpath: str, nbytes: int) -> bool:
    """Claim a released file of a fitting size as ``relpath`` (atomic rename: one claimant)."""
    pool = root / TUBES_DIR / POOL_DIR
    try:
        names = os.listdir(pool)
    except FileNotFoundError:
        return False
    sizes: list[tuple[int, str]] = []
    for name in names:
        size = regular_size(pool / name)  # a link is never claimed
        if size is not None and nbytes <= size <= POOL_MAX_SLACK * nbytes:
            sizes.append((size, name))
    for _, name in sorted(sizes):
        try:
            os.rename(pool / name, root / relpath)
        except FileNotFoundError:  # another process claimed it first
            continue
        # Cut the file to this tube: nothing of an earlier tube stays readable after it.
        # Every page left was written whole before (pooled files are tube files written
        # in full), so the mapped write allocates nothing: no fallocate, no SIGBUS.
        fd = open_fd(root / relpath, os.O_RDWR)
        try:
            os.ftruncate(fd, nbytes)
        finally:
            os.close(fd)
        return True
    return False


def release_file(path: Path) -> None:
    """Give a tube file back: into the pool when it is worth keeping, else delete it (a
    symbolic link in its place is removed, never followed)."""
    size = regular_size(path)
    if size is None:
        if path.is_symlink():
            path.unlink(missing_ok=True)
        return
    pool = path.parent / POOL_DIR if path.parent.name == TUBES_DIR else None
    if pool is not None and size >= POOL_MIN_BYTES:
        pool.mkdir(mode=DIR_MODE, exist_ok=True)
        if len(os.listdir(pool)) < POOL_MAX_FILES:
            with contextlib.suppress(FileNotFoundError):
                os.rename(path, pool / new_id(9))
                return
    path.unlink(missing_ok=True)


# This process's mappings of pooled files, by inode: a file claimed again is written
# through page tables already in place, a plain memcpy (as fast as Ray's object store).
# Each keeps its descriptor, to notice a file deleted meanwhile and let its pages go.
_POOL_MAPS: dict[int, tuple[int, mmap.mmap]] = {}


def _forget_deleted() -> None:
    """Drop mappings of pooled files deleted since: do not keep their pages alive."""
    for inode, (fd, m) in list(_POOL_MAPS.items()):
        if os.fstat(fd).st_nlink == 0:
            del _POOL_MAPS[inode]
            m.close()
            os.close(fd)


def _write_mapped(path: Path, data: memoryview) -> None:
    fd = open_fd(path, os.O_RDWR)
    inode = os.fstat(fd).st_ino
    cached = _POOL_MAPS.get(inode)
    if cached is not None and len(cached[1]) >= len(data):
        os.close(fd)
        m = cached[1]
    else:
        if cached is not None:
            cached[1].close()
            os.close(cached[0])
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        m = mmap.mmap(fd, len(data), flags=flags)
        _POOL_MAPS[inode] = (fd, m)
    m[: len(data)] = data  # within the file: it was cut to exactly this length


def write_tube(
    root: Path, node: str, tenant: str, *, datatype: str, shape: list[int], data: bytes | memoryview
) -> Tube:
    """Store bytes as a host tube on this machine and return its reference.

    A large tube reuses a released tube file when one fits (see POOL_DIR); it is written in
    place and only then named in a reference, so a reader never sees half of it.
    """
    tube_id = new_id()
    relpath = f"{TUBES_DIR}/{tube_id}"
    if len(data) >= POOL_MIN_BYTES:
        _forget_deleted()
    if len(data) >= POOL_MIN_BYTES and _reuse_pooled(root, relpath, len(data)):
        _write_mapped(root / relpath, memoryview(data).cast("B"))
    else:
        write_segment(root, relpath, [data])
    return Tube(
        id=tube_id,
        tenant=tenant,
        datatype=datatype,  # type: ignore[arg-type]
        shape=shape,
        nbytes=len(data),
        placements=[Placement(node=node, tier="host", segment=relpath, offset=0)],
        created_at=time.time(),
    )


# The directories a placement's file may lie in, by tier (docs/architecture.md's table).
_TIER_DIRS: Final = {"host": (f"{TUBES_DIR}/", f"{HOST_POOL_DIR}/"), "gpu": ("gpu/",)}


def placement_file(root: Path, p: Placement, tube_id: str) -> Path | None:
    """The file a placement of tube ``tube_id`` names on this machine, checked to lie in
    its tier's directory under ``root`` and, but in the host pool, to be named after the
    tube (``InvalidArgument`` otherwise: a forged record never reaches another tube's
    file); None for copies that are not files here (the object tier, a real GPU's
    ``ipc:`` allocation)."""
    if p.tier == "object" or p.segment.startswith("ipc:"):
        return None
    dirs = _TIER_DIRS["host" if p.tier == "host" else "gpu"]
    name = p.segment.rpartition("/")[2]
    if not p.segment.startswith(dirs):
        why = f"is outside the directory of tier {p.tier}"
    elif not p.segment.startswith(f"{HOST_POOL_DIR}/") and name.partition(".")[0] != tube_id:
        why = "is the file of another tube"
    else:
        return under(root, p.segment)
    raise InvalidArgument(f"segment {p.segment[:120]!r} {why}", field="segment")


def _host_copy(root: Path, tube: Tube) -> tuple[Path, Placement]:
    for p in tube.placements:
        if p.tier == "host":
            path = placement_file(root, p, tube.id)
            if path is not None and regular_size(path) is not None:
                return path, p
    raise NotFound(f"tube {tube.id} has no host copy on this node", field="tube")


def host_path(root: Path, tube: Tube) -> Path:
    """The file of a tube's host placement, or ``NotFound``."""
    return _host_copy(root, tube)[0]


def read_tube(root: Path, tube: Tube) -> bytes:
    """The bytes of a host tube (at its placement's offset; never through a link)."""
    path, p = _host_copy(root, tube)
    data = read_file(path, tube.nbytes, p.offset)
    if len(data) != tube.nbytes:
        raise NotFound(f"tube {tube.id} is truncated", field="tube")
    return data


def delete_tube(root: Path, tube: Tube) -> None:
    """Remove every file-backed copy of a tube on this machine: host copies, and the
    copies on simulated GPUs, which are host segments too (idempotent). A placement
    outside its tier's directory is skipped: nothing but a tube's own file is removed."""
    for p in tube.placements:
        # A block of the host pool lies in a segment shared with other blocks: the transfer
        # service's sweeper gives it back once the tube is gone, never a file delete.
        if p.segment.startswith(f"{HOST_POOL_DIR}/"):
            continue
        try:
            path = placement_file(root, p, tube.id)
        except InvalidArgument as exc:
            log.warning("tube.placement_refused", tube=tube.id, error=exc.message)
            continue
        if path is not None:
            release_file(path)
