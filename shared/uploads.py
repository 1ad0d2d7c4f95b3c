"""Uploaded models: the archive a tenant sends, checked member by member, and its unpacking
on a node.

A tenant uploads a model directory as one archive (tar, gzipped tar, or zip). Its id is
the SHA-256 of the archive's bytes; the archive is kept whole in the object bucket
``models`` as ``<tenant>/<id>``, and a node that builds the model unpacks it once into
``<data-dir>/models/<tenant>/<id>/`` (``catalog.upload_dir``), checked against its id,
then reads it like any model directory. The same member checks run at upload and at
unpacking: what the node writes never depends on trusting the bus.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Annotated, Final, Literal

import msgspec
from nats.js import JetStreamContext

from gpufaas.shared.catalog import MODEL_FILES, upload_dir
from gpufaas.shared.constants import MODELS_OBJECT_BUCKET
from gpufaas.shared.errors import Internal, InvalidArgument, ModelInvalid, NotFound
from gpufaas.shared.messages import Bytes, Msg, Tenant, UploadId
from gpufaas.shared.objects import get_object

# The files a model directory may hold: what the runners read (weights, config, tokenizer)
# and the tokenizer's usual companions. Flat names only: nothing else is ever unpacked.
WEIGHT_FILES: Final = frozenset(MODEL_FILES.values())
ALLOWED_FILES: Final = WEIGHT_FILES | {
    "config.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "modules.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "merges.txt",
}
MAX_MEMBERS: Final = 32  # archive entries of any kind, the root directory's included
MAX_SMALL_FILE_BYTES: Final = 64 * 1024 * 1024  # each file but the weights
COPY_CHUNK: Final = 1024 * 1024

ArchiveFormat = Literal["tar", "zip"]


class UploadFile(Msg, frozen=True, tag="upload_file.v1"):
    """One file of an uploaded model, as unpacked."""

    name: str
    bytes: Bytes


class ModelUpload(Msg, frozen=True, tag="model_upload.v1"):
    """An uploaded model, as recorded in the ``gpufaas_models`` bucket (``<tenant>.<id>``)."""

    id: UploadId
    tenant: Tenant
    bytes: Bytes  # of the archive: what the object tier holds and the quota counts
    format: ArchiveFormat
    files: Annotated[list[UploadFile], msgspec.Meta(max_length=MAX_MEMBERS)]
    created_at: float


def record_key(tenant: str, upload: str) -> str:
    """The record's key: ``<tenant>.<id>``."""
    return f"{tenant}.{upload}"


def object_name(tenant: str, upload: str) -> str:
    """The archive's name in the ``models`` object bucket: ``<tenant>/<id>``."""
    return f"{tenant}/{upload}"


# --- archives --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Limits:
    """How large an archive's contents may be, in all and per file."""

    total_bytes: int
    small_file_bytes: int = MAX_SMALL_FILE_BYTES
    members: int = MAX_MEMBERS


# Called with each accepted file's name, a reader of its bytes and its declared size.
Sink = Callable[[str, IO[bytes], int], None]


def archive_format(path: Path) -> ArchiveFormat:
    """``zip`` or ``tar`` (plain or compressed) by content; 400 for anything else."""
    with path.open("rb") as f:
        head = f.read(4)
    if head in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if tarfile.is_tarfile(path):
        return "tar"
    raise InvalidArgument("the body is not a tar or zip archive of a model directory", field="body")


def sha256_file(path: Path) -> str:
    """The hex SHA-256 of a file, read in chunks (run it off the event loop)."""
    sha = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(COPY_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def _bad(member: str, why: str) -> InvalidArgument:
    return InvalidArgument(f"archive member {member!r} {why}", field=f"archive[{member}]")


def member_name(raw: str, *, is_dir: bool) -> str | None:
    """The file name an archive member unpacks to, or None for the root directory entry
    (``.``, ``./``); 400 naming the member for anything that is not an allowed file."""
    if "\x00" in raw or "\\" in raw:
        raise _bad(raw, "has a NUL or a backslash in its name")
    if raw.startswith("/"):
        raise _bad(raw, "has an absolute name")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in raw.split("/"):
        raise _bad(raw, "leads out of the model directory ('..')")
    if not parts and is_dir:
        return None
    if is_dir:
        raise _bad(raw, "is a directory; a model archive holds its files at the top level")
    name = "/".join(parts)
    if name not in ALLOWED_FILES:
        raise _bad(raw, f"is not a model file; allowed: {', '.join(sorted(ALLOWED_FILES))}")
    return name


class _Tally:
    """The running checks over an archive's members: count, duplicates, sizes."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.entries = 0
        self.total = 0
        self.files: dict[str, int] = {}

    def entry(self, raw: str) -> None:
        self.entries += 1
        if self.entries > self.limits.members:
            raise _bad(raw, f"is one entry too many (at most {self.limits.members})")

    def file(self, raw: str, name: str, size: int) -> None:
        if name in self.files:
            raise _bad(raw, f"repeats {name!r}")
        cap = self.limits.total_bytes if name in WEIGHT_FILES else self.limits.small_file_bytes
        if size < 0 or size > cap:
            raise _bad(raw, f"holds {size} bytes; at most {cap} are accepted")
        self.total += size
        if self.total > self.limits.total_bytes:
            raise _bad(raw, f"takes the contents past {self.limits.total_bytes} bytes")
        self.files[name] = size

    def result(self) -> list[UploadFile]:
        if not WEIGHT_FILES & self.files.keys():
            raise InvalidArgument(
                f"the archive has no weights file ({' or '.join(sorted(WEIGHT_FILES))})",
                field="archive",
            )
        return [UploadFile(name=n, bytes=s) for n, s in sorted(self.files.items())]


def walk_archive(path: Path, limits: Limits, sink: Sink | None = None) -> list[UploadFile]:
    """Check every member of the archive at ``path`` (400 naming the first bad one) and,
    with ``sink``, hand each file's bytes to it as it comes; the files, sorted by name."""
    tally = _Tally(limits)
    try:
        if archive_format(path) == "zip":
            _walk_zip(path, tally, sink)
        else:
            _walk_tar(path, tally, sink)
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as exc:
        raise InvalidArgument(f"the archive cannot be read: {exc}", field="body") from None
    return tally.result()


def _walk_tar(path: Path, tally: _Tally, sink: Sink | None) -> None:
    # Stream mode: one pass, members in order, even through gzip (no seeking back).
    with tarfile.open(path, mode="r|*") as tar:
        for m in tar:
            tally.entry(m.name)
            if not (m.isdir() or m.type in (tarfile.REGTYPE, tarfile.AREGTYPE)):
                raise _bad(m.name, "is not a regular file (links, devices, sparse files refused)")
            name = member_name(m.name, is_dir=m.isdir())
            if name is None:
                continue
            tally.file(m.name, name, m.size)
            if sink is not None:
                reader = tar.extractfile(m)
                assert reader is not None  # a regular file always has one
                sink(name, reader, m.size)


def _walk_zip(path: Path, tally: _Tally, sink: Sink | None) -> None:
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            tally.entry(info.filename)
            kind = stat.S_IFMT(info.external_attr >> 16)  # 0: made where files have no type
            if kind not in (0, stat.S_IFREG, stat.S_IFDIR) or info.flag_bits & 1:
                raise _bad(info.filename, "is not a regular file (links and encryption refused)")
            name = member_name(info.filename, is_dir=info.is_dir())
            if name is None:
                continue
            tally.file(info.filename, name, info.file_size)
            if sink is not None:
                with zf.open(info) as reader:
                    sink(name, reader, info.file_size)


@contextlib.contextmanager
def _writing(name: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise Internal(f"cannot write {name} of an uploaded model: {exc.strerror}") from None


def unpack_to(directory: Path) -> Sink:
    """A sink writing each file under ``directory`` (0600, created exclusively, never
    through a link), refusing a member whose bytes are not its declared size."""

    def write(name: str, reader: IO[bytes], size: int) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
        written = 0
        with _writing(name):
            fd = os.open(directory / name, flags, 0o600)
        with os.fdopen(fd, "wb") as out:
            # A read error is the archive's (400); a write error is this node's disk's.
            while chunk := reader.read(min(COPY_CHUNK, size - written + 1)):
                written += len(chunk)
                if written > size:
                    break
                with _writing(name):
                    out.write(chunk)
        if written != size:
            raise _bad(name, f"holds other than its declared {size} bytes")

    return write


# --- on a node -----------------------------------------------------------------------------

_LOCKS: dict[Path, asyncio.Lock] = {}


def _private_dirs(tenant_dir: Path) -> None:
    """``<data-dir>/models/<tenant>``, each made 0700 if new."""
    tenant_dir.parent.parent.mkdir(parents=True, exist_ok=True)
    for d in (tenant_dir.parent, tenant_dir):
        with contextlib.suppress(FileExistsError):
            d.mkdir(mode=0o700)


async def materialize(
    js: JetStreamContext, data_dir: Path, tenant: str, upload: str, *, max_bytes: int
) -> Path:
    """The directory of a tenant's uploaded model on this node, unpacked from the object
    tier the first time (checked against its id, written aside and renamed into place)."""
    final = upload_dir(data_dir, tenant, upload)
    if final.is_dir():
        return final
    lock = _LOCKS.setdefault(final, asyncio.Lock())
    async with lock:
        if final.is_dir():
            return final
        await asyncio.to_thread(_private_dirs, final.parent)
        work = Path(await asyncio.to_thread(tempfile.mkdtemp, f".{upload[:12]}.", "", final.parent))
        try:
            archive = work / "archive"
            try:
                name = object_name(tenant, upload)
                await get_object(js, MODELS_OBJECT_BUCKET, name, archive, tier="disk")
            except NotFound:
                raise NotFound(f"uploaded model {upload} not found", field="model.upload") from None
            await asyncio.to_thread(_unpack, archive, work / "files", final, upload, max_bytes)
        finally:
            await asyncio.to_thread(shutil.rmtree, work, True)
            _LOCKS.pop(final, None)
    return final


def _unpack(archive: Path, files: Path, final: Path, upload: str, max_bytes: int) -> None:
    """Check the archive's hash, unpack it into ``files`` and rename that to ``final``."""
    if sha256_file(archive) != upload:
        raise ModelInvalid(
            f"uploaded model {upload}: the stored archive does not match its id",
            field="model.upload",
        )
    files.mkdir(mode=0o700)
    walk_archive(archive, Limits(total_bytes=max_bytes), unpack_to(files))
    archive.unlink()
    try:
        files.rename(final)
    except OSError as exc:  # another process of this machine unpacked it first
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not final.is_dir():
            raise


@contextlib.contextmanager
def spool_file(directory: Path) -> Iterator[tuple[Path, IO[bytes]]]:
    """A private temporary file under ``directory`` (0600), removed on the way out."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".upload.", dir=directory)
    path = Path(name)
    try:
        with os.fdopen(fd, "w+b") as f:
            yield path, f
    finally:
        path.unlink(missing_ok=True)
