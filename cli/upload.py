"""``gpufaas deploy --path DIR``: a local model directory uploaded as a tar, built on the fly.

The tar is deterministic (fixed order, times, owners and modes), so the same directory
always has the same id (the archive's SHA-256) and is never uploaded twice: its hash is
computed first (one read of the files), and the upload is skipped when the gateway
already holds it. The body streams from the files with its exact ``Content-Length``,
under a progress bar; nothing is built in memory or on disk.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from gpufaas.client import ApiError, api_error, auth_headers, call
from gpufaas.shared.uploads import ALLOWED_FILES

BLOCK: Final = tarfile.BLOCKSIZE
RECORD: Final = tarfile.RECORDSIZE
CHUNK: Final = 1024 * 1024


@dataclass(frozen=True, slots=True)
class ModelDir:
    """The files of a local model directory that an upload carries, and those it leaves."""

    files: list[Path]
    skipped: list[str]

    @property
    def tar_bytes(self) -> int:
        """The exact size of the tar :func:`tar_chunks` writes."""
        size = sum(BLOCK + -(-f.stat().st_size // BLOCK) * BLOCK for f in self.files)
        size += 2 * BLOCK  # the end-of-archive marker
        return -(-size // RECORD) * RECORD


def model_dir(directory: Path) -> ModelDir:
    """The model files at the top of ``directory`` (the names the platform accepts)."""
    if not directory.is_dir():
        raise ApiError(0, {"code": "invalid_argument", "error": f"{directory} is not a directory"})
    files, skipped = [], []
    for entry in sorted(directory.iterdir()):
        if entry.name in ALLOWED_FILES and entry.is_file() and not entry.is_symlink():
            files.append(entry)
        else:
            skipped.append(entry.name)
    return ModelDir(files, skipped)


def _header(path: Path) -> bytes:
    info = tarfile.TarInfo(path.name)
    info.size = path.stat().st_size
    info.mode = 0o644
    info.mtime = 0  # owners and names are empty by default: the same bytes anywhere
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def tar_chunks(model: ModelDir) -> Iterator[bytes]:
    """The tar of ``model``'s files, a chunk at a time."""
    written = 0
    for path in model.files:
        header = _header(path)
        yield header
        written += len(header)
        with path.open("rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk
                written += len(chunk)
        pad = -written % BLOCK
        yield bytes(pad)
        written += pad
    end = 2 * BLOCK
    yield bytes(end + -(written + end) % RECORD)


def tar_sha256(model: ModelDir) -> str:
    """The id the gateway will give this directory's archive."""
    sha = hashlib.sha256()
    for chunk in tar_chunks(model):
        sha.update(chunk)
    return sha.hexdigest()


def _counted(chunks: Iterator[bytes], advance: Callable[[int], None]) -> Iterator[bytes]:
    for chunk in chunks:
        yield chunk
        advance(len(chunk))


def _post(url: str, model: ModelDir, key: str | None, advance: Callable[[int], None]) -> Any:
    headers = {
        "Content-Type": "application/x-tar",
        "Content-Length": str(model.tar_bytes),
        **auth_headers(key),
    }
    body = _counted(tar_chunks(model), advance)
    req = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=600) as resp:
            return json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        raise api_error(exc) from None
    except (urllib.error.URLError, OSError) as exc:
        raise ApiError(
            0, {"code": "unavailable", "error": f"upload to {url} failed: {exc}"}
        ) from None


def upload_directory(gateway: str, directory: Path, key: str | None, console: Console) -> str:
    """Upload ``directory`` (unless the gateway holds it already); the model's id."""
    model = model_dir(directory)
    if model.skipped:
        console.print(f"[dim]not uploaded (not model files): {', '.join(model.skipped)}[/dim]")
    size = model.tar_bytes
    with console.status(f"Hashing {directory} ({size / 2**20:.1f} MiB)…"):
        upload = tar_sha256(model)
    held = call(f"{gateway}/v1/models", key=key)
    if any(m["model"] == upload for m in held["models"]):
        console.print(f"model {upload[:12]} already uploaded")
        return upload
    room = held["quota_bytes"] - held["used_bytes"]
    limit = held.get("max_model_bytes", size)
    if size > min(room, limit):
        raise ApiError(
            413,
            {
                "code": "payload_too_large",
                "error": f"the archive has {size} bytes; the gateway takes at most {limit} "
                f"per upload and this tenant has {room} of its quota left",
            },
        )
    columns = (
        TextColumn("uploading {task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(directory.name, total=size)
        reply = _post(f"{gateway}/v1/models", model, key, lambda n: progress.advance(task, n))
    console.print(f"uploaded model {reply['model'][:12]} ({size / 2**20:.1f} MiB)")
    return str(reply["model"])
