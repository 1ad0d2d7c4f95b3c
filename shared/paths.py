"""Paths that come from the wire, joined under their root; private files and directories.

Every relative path a service reads from NATS or KV (a tube's segment, a tensor's segment,
an exported program) is joined here: it must be relative, made of plain names (no ``..``,
no hidden or empty component), and, resolved, still lie under its root, so that neither an
absolute segment nor a symbolic link leads anywhere else. Files are opened with
``O_NOFOLLOW``; what the platform creates is private: directories 0700, files 0600 made
with ``O_EXCL`` (then renamed into place). A shared-memory root that another user owns, or
that others can read, is refused at start (:func:`check_root`).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import secrets
import stat
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Final

import structlog

from gpufaas.shared import constants as c
from gpufaas.shared.errors import InvalidArgument, NotFound, ResourceExhausted

log = structlog.get_logger()

DIR_MODE: Final = 0o700
FILE_MODE: Final = 0o600
_NOFOLLOW: Final = os.O_NOFOLLOW | os.O_CLOEXEC

# One component of a path from the wire: a plain name, never ``.``, ``..`` or hidden.
_NAME: Final = r"[A-Za-z0-9_=-][A-Za-z0-9_.=-]{0,199}"
_RELPATH: Final = re.compile(rf"^{_NAME}(/{_NAME}){{0,15}}\Z")  # \Z: no trailing newline


def _bad(what: str, relpath: str, why: str) -> InvalidArgument:
    return InvalidArgument(f"{what} {relpath[:120]!r} {why}", field=what)


def under(root: Path, relpath: str, what: str = "segment") -> Path:
    """``root / relpath`` for a path read from NATS or KV, or ``InvalidArgument`` naming
    ``what``: it must be relative and plain (no ``..``, no absolute or hidden part) and,
    with every symbolic link on the way resolved, still lie under ``root``."""
    if not isinstance(relpath, str) or not _RELPATH.match(relpath):
        raise _bad(what, str(relpath), "is not a relative path of plain names")
    real_root = _real(str(root))
    at = real_root
    for part in relpath.split("/"):  # an lstat a component: cheap, and links are rare
        at = os.path.join(at, part)
        try:
            mode = os.lstat(at).st_mode
        except OSError:  # nothing there (yet): nothing further to follow
            break
        if stat.S_ISLNK(mode):
            real = os.path.realpath(os.path.join(real_root, relpath))
            if os.path.commonpath([real_root, real]) != real_root:
                raise _bad(what, relpath, "leads outside its directory")
            break
    return root / relpath


@functools.lru_cache(maxsize=64)
def _real(root: str) -> str:
    """A root's real path (checked at start; computed once)."""
    return os.path.realpath(root)


def name_under(root: Path, name: str, what: str = "segment") -> Path:
    """``root / name`` for a single file name from the wire (no ``/``); see :func:`under`."""
    if "/" in name:
        raise _bad(what, name, "is not a plain file name")
    return under(root, name, what)


def open_fd(path: Path, flags: int, mode: int = FILE_MODE) -> int:
    """``os.open`` that never follows a symbolic link at ``path`` (an ``InvalidArgument``
    then, like a missing file's ``FileNotFoundError``)."""
    try:
        return os.open(path, flags | _NOFOLLOW, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InvalidArgument(f"{path.name!r} is a symbolic link", field="segment") from None
        raise


def regular_size(path: Path) -> int | None:
    """The size of ``path`` if it is a regular file itself (a link to one is not); else None."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def read_file(path: Path, nbytes: int = -1, offset: int = 0) -> bytes:
    """Read a file without following a link at its name (all of it when ``nbytes`` < 0)."""
    fd = open_fd(path, os.O_RDONLY)
    try:
        if nbytes < 0:
            nbytes = os.fstat(fd).st_size - offset
        parts, done = [], 0
        while done < nbytes:  # one read returns at most ~2 GiB on Linux
            part = os.pread(fd, min(nbytes - done, 1 << 30), offset + done)
            if not part:
                break
            parts.append(part)
            done += len(part)
        return b"".join(parts)
    finally:
        os.close(fd)


def make_dirs(path: Path) -> None:
    """``mkdir -p`` where every directory made is 0700 (``Path.mkdir(parents=True)`` makes
    the parents with the default mode)."""
    missing: list[Path] = []
    p = path
    while not p.is_dir():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(d, DIR_MODE)


def staging_name(final: Path) -> Path:
    """A fresh hidden name beside ``final`` to write it under before the rename."""
    return final.with_name(f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


# A staging file: ``.<final name>.<pid of its writer>.<8 hex digits>.tmp``.
_STAGING: Final = re.compile(r"^\..+\.([0-9]+)\.[0-9a-f]{8}\.tmp\Z")
# Out of room: on tmpfs ``ENOSPC``; a quota; a size over the file system's limit.
_NO_ROOM: Final = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def no_room(
    exc: OSError, path: Path, tier: str, nbytes: int | None = None
) -> ResourceExhausted | None:
    """The 507 of a write that found ``tier`` full (``None``: ``exc`` is another failure)."""
    if exc.errno not in _NO_ROOM:
        return None
    what = "the file" if nbytes is None else f"{nbytes} bytes"
    return ResourceExhausted(
        f"tier {tier} is full: no room for {what} under {path.parent} ({exc.strerror})",
        field="tier",
    )


def allocate(fd: int, nbytes: int, path: Path, tier: str) -> None:
    """Commit the pages of a new file before it is mapped and written, so that a full tmpfs
    is a ``ResourceExhausted`` naming ``tier`` here, never a SIGBUS on first touch. The
    caller removes the file on failure (it is still under its staging name)."""
    if nbytes <= 0:
        return
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as exc:
        full = no_room(exc, path, tier, nbytes)
        if full is None:
            raise
        raise full from None


def _writer_alive(pid: int) -> bool:
    """Whether the process named in a staging file may still be writing it (this machine)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def sweep_staging(
    root: Path,
    now: float | None = None,
    *,
    grace_s: float = c.STAGING_GRACE_S,
    max_age_s: float = c.STAGING_MAX_AGE_S,
    recursive: bool = True,
) -> list[Path]:
    """Remove staging files under ``root`` left by crashed copies: older than ``grace_s``
    whose writer is gone, or older than ``max_age_s`` whatever the pid says (it may have
    been reused). A file still being written is younger, or its writer is alive."""
    now = time.time() if now is None else now
    removed: list[Path] = []
    for top, dirs, files in os.walk(root):  # never follows a link to a directory
        dirs[:] = [] if not recursive else [d for d in dirs if not os.path.islink(Path(top, d))]
        for name in files:
            m = _STAGING.match(name)
            if m is None:
                continue
            path = Path(top, name)
            try:
                st = os.lstat(path)
            except FileNotFoundError:  # renamed into place or removed meanwhile
                continue
            age = now - st.st_mtime
            if not stat.S_ISREG(st.st_mode) or age < grace_s:
                continue
            if age < max_age_s and _writer_alive(int(m.group(1))):
                continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    if removed:
        log.info("staging.swept", root=str(root), files=len(removed))
    return removed


def create_new(path: Path, flags: int = os.O_RDWR) -> int:
    """A new private file (0600, ``O_EXCL``: never an existing file or link); its descriptor."""
    return open_fd(path, flags | os.O_CREAT | os.O_EXCL, FILE_MODE)


def write_private(
    path: Path,
    chunks: Iterable[bytes | memoryview],
    *,
    replace: bool = True,
    tier: str = "host",
    sync: bool = False,
) -> int:
    """Write a private file atomically: a new 0600 file under a staging name, then renamed
    into place (``replace=False``: linked, so an existing file is kept and
    ``FileExistsError`` raised; ``sync``: on disk before the rename). Returns its size; a
    full ``tier`` is ``ResourceExhausted``."""
    make_dirs(path.parent)
    tmp = staging_name(path)
    size = 0
    fd = create_new(tmp, os.O_WRONLY)
    try:
        try:
            with os.fdopen(fd, "wb", closefd=True) as f:
                for chunk in chunks:
                    size += f.write(chunk)
                if sync:
                    f.flush()
                    os.fsync(f.fileno())
        except OSError as exc:
            full = no_room(exc, path, tier)
            if full is None:
                raise
            raise full from None
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return size


def check_root(root: Path, what: str = "shm_dir") -> Path:
    """Make the shared-memory root (0700, with any missing parent) or check the one there:
    a directory (not a link) of this user, closed to everyone else, under parents that
    nobody else can change. Anything else is refused with an error naming the path."""
    root = Path(os.path.abspath(root))
    make_dirs(root)
    st = os.lstat(root)
    fix = f"remove it or make it yours with mode 0700 (chmod 700 {root})"
    if not stat.S_ISDIR(st.st_mode):
        raise InvalidArgument(f"{what} {root} is not a directory (a link?); {fix}", field=what)
    if st.st_uid != os.geteuid():
        raise InvalidArgument(
            f"{what} {root} belongs to uid {st.st_uid}, not this user ({os.geteuid()}); {fix}",
            field=what,
        )
    if st.st_mode & 0o077:
        raise InvalidArgument(
            f"{what} {root} has mode {stat.S_IMODE(st.st_mode):04o}, open to other users; {fix}",
            field=what,
        )
    _check_parents(Path(os.path.realpath(root)).parent, what)
    return root


def _check_parents(parent: Path, what: str) -> None:
    """Every parent is this user's or root's, and writable by others only when sticky."""
    for d in [parent, *parent.parents]:
        st = os.stat(d)
        writable = st.st_mode & 0o022
        if st.st_uid not in (0, os.geteuid()) or (writable and not st.st_mode & stat.S_ISVTX):
            raise InvalidArgument(
                f"{what} lies under {d}, which another user can change "
                f"(uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o})",
                field=what,
            )


def missing(path: Path, what: str = "segment") -> NotFound:
    """The error of a file that is not there."""
    return NotFound(f"{what} {path.name!r} is not on this node", field=what)
