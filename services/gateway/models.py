"""Uploaded models: ``POST /v1/models`` (an archive of a model directory), list, delete.

The body is spooled to a private file under the data directory (never held in memory),
hashed as it arrives (the SHA-256 is the model's id), capped per upload
(``GPUFAAS_MAX_MODEL_BYTES``) and per tenant (``GPUFAAS_MODEL_QUOTA_BYTES``), checked
member by member (``shared/uploads.py``), then stored whole in the object bucket
``models`` as ``<tenant>/<id>`` and recorded in the ``gpufaas_models`` bucket. A refused
upload leaves nothing behind. Nodes unpack it when a function deployed from it is built.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import AsyncIterator
from typing import IO, Any, Final

import nats.errors
import nats.js.errors
import structlog
from aiohttp import web
from nats.js import JetStreamContext

from gpufaas.gateway import app as gw
from gpufaas.gateway.auth import Handler
from gpufaas.gateway.openapi import Param, RouteDoc
from gpufaas.shared import constants as c
from gpufaas.shared.errors import (
    AlreadyExists,
    NotFound,
    PayloadTooLarge,
    PlatformError,
    QuotaExceeded,
    UnsupportedMediaType,
)
from gpufaas.shared.jetstream import cluster_replicas, ensure_kv, may_reshape, stream_max_bytes
from gpufaas.shared.kv import Bucket, Codec
from gpufaas.shared.messages import UPLOAD_ID_PATTERN, ModelSource
from gpufaas.shared.objects import delete_object, ensure_object_bucket, put_object
from gpufaas.shared.registry import records
from gpufaas.shared.uploads import (
    COPY_CHUNK,
    Limits,
    ModelUpload,
    archive_format,
    object_name,
    record_key,
    spool_file,
    walk_archive,
)

log = structlog.get_logger()

UPLOADS = web.AppKey("uploads", Bucket[ModelUpload])
ARCHIVE_TYPES: Final = (
    "application/x-tar",
    "application/gzip",
    "application/x-gzip",
    "application/zip",
    "application/octet-stream",
)
SPOOL_DIR: Final = "uploads"  # under the gateway's data directory
_ID: Final = re.compile(UPLOAD_ID_PATTERN)


def _json(upload: ModelUpload) -> dict[str, Any]:
    return {
        "model": upload.id,
        "bytes": upload.bytes,
        "format": upload.format,
        "files": [f.name for f in upload.files],
        "file_bytes": {f.name: f.bytes for f in upload.files},
        "created_at": upload.created_at,
    }


async def _used_bytes(bucket: Bucket[ModelUpload], tenant: str) -> int:
    return sum(e.value.bytes for e in await bucket.items(f"{tenant}."))


def _over_quota(quota: int, used: int, adding: int) -> QuotaExceeded:
    return QuotaExceeded(
        f"the tenant's uploads would hold {used + adding} bytes; its quota "
        f"(GPUFAAS_MODEL_QUOTA_BYTES) is {quota} ({used} in use): delete an upload "
        "or have the quota raised",
        field="GPUFAAS_MODEL_QUOTA_BYTES",
    )


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"the model archive exceeds {limit} bytes (GPUFAAS_MAX_MODEL_BYTES)", field="body"
    )


async def _spool(request: web.Request, out: IO[bytes], limit: int) -> tuple[int, str]:
    """Copy the body into ``out`` as it arrives, hashing it; (bytes, hex SHA-256)."""
    sha = hashlib.sha256()
    size = 0

    def write(chunk: bytes) -> None:
        sha.update(chunk)
        out.write(chunk)

    async for chunk in request.content.iter_chunked(COPY_CHUNK):
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        await asyncio.to_thread(write, chunk)
    await asyncio.to_thread(out.flush)
    return size, sha.hexdigest()


async def models_post(request: web.Request) -> web.Response:
    """Upload a model directory as one tar or zip archive; its id is the archive's SHA-256."""
    config = request.app[gw.CONFIG]
    tenant = gw.tenant_of(request)
    bucket = request.app[UPLOADS]
    if request.content_type not in (*ARCHIVE_TYPES, ""):
        raise UnsupportedMediaType(
            f"expected a tar or zip archive ({', '.join(ARCHIVE_TYPES)}), got "
            f"{request.content_type}",
            field="Content-Type",
        )
    declared = request.content_length
    if declared is not None and declared > config.max_model_bytes:
        raise _too_large(config.max_model_bytes)
    if declared is not None:  # refused before a byte is read, when the size is known
        used = await _used_bytes(bucket, tenant)
        if used + declared > config.model_quota_bytes:
            raise _over_quota(config.model_quota_bytes, used, declared)
    with spool_file(config.data_dir / SPOOL_DIR) as (path, out):
        size, upload = await _spool(request, out, config.max_model_bytes)
        key = record_key(tenant, upload)
        existing = await bucket.value(key)
        if existing is not None:
            return gw.json_response({**_json(existing), "created": False})
        used = await _used_bytes(bucket, tenant)
        if used + size > config.model_quota_bytes:
            raise _over_quota(config.model_quota_bytes, used, size)
        limits = Limits(total_bytes=config.max_model_bytes)
        files = await asyncio.to_thread(walk_archive, path, limits)
        record = ModelUpload(
            id=upload,
            tenant=tenant,
            bytes=size,
            format=await asyncio.to_thread(archive_format, path),
            files=files,
            created_at=time.time(),
        )
        js = gw.nats_of(request).jetstream()
        await put_object(js, c.MODELS_OBJECT_BUCKET, object_name(tenant, upload), path)
    created = await _record(bucket, js, record, config.model_quota_bytes)
    if created:
        data = {"tenant": tenant, "model": upload, "bytes": size}
        await gw.publish_event(request, "model.uploaded", data)
    return gw.json_response({**_json(record), "created": created}, 201 if created else 200)


async def _record(
    bucket: Bucket[ModelUpload], js: JetStreamContext, record: ModelUpload, quota: int
) -> bool:
    """Record a stored upload (False: an identical upload recorded it first). Concurrent
    uploads are counted again once recorded: the one that took the tenant past its quota
    is undone, object and record, and refused."""
    key = record_key(record.tenant, record.id)
    name = object_name(record.tenant, record.id)
    try:
        created = await bucket.create(key, record) is not None
        used = await _used_bytes(bucket, record.tenant) if created else 0
    except BaseException:
        await _forget(bucket, js, key, name)
        raise
    if used > quota:
        await _forget(bucket, js, key, name)
        raise _over_quota(quota, used - record.bytes, record.bytes)
    return created


async def _forget(bucket: Bucket[ModelUpload], js: JetStreamContext, key: str, name: str) -> None:
    """Remove an upload's record, then its archive (a failure is logged: the archive is
    replaced by the next identical upload, and counts against no quota meanwhile)."""
    try:
        await bucket.delete(key)
        await delete_object(js, c.MODELS_OBJECT_BUCKET, name)
    except (PlatformError, nats.errors.Error, TimeoutError) as exc:
        log.warning("upload.forget_failed", key=key, error=repr(exc))


async def models_list(request: web.Request) -> web.Response:
    """The caller's uploaded models, with the bytes they hold and the tenant's quota."""
    gw.nats_of(request)
    tenant = gw.tenant_of(request)
    entries = await request.app[UPLOADS].items(f"{tenant}.")
    found = sorted((e.value for e in entries), key=lambda u: u.created_at)
    return gw.json_response(
        {
            "models": [_json(u) for u in found],
            "used_bytes": sum(u.bytes for u in found),
            "quota_bytes": request.app[gw.CONFIG].model_quota_bytes,
            "max_model_bytes": request.app[gw.CONFIG].max_model_bytes,
        }
    )


async def require_upload(request: web.Request, source: ModelSource) -> None:
    """A deploy from an upload names one of the caller's own (another tenant's: 404)."""
    if source.upload is None:
        return
    key = record_key(gw.tenant_of(request), source.upload)
    if await request.app[UPLOADS].value(key) is None:
        raise NotFound(f"uploaded model {source.upload} not found", field="model.upload")


async def model_delete(request: web.Request) -> web.Response:
    """Delete an uploaded model, unless a function of the tenant is deployed from it."""
    tenant = gw.tenant_of(request)
    upload = request.match_info["id"]
    bucket = request.app[UPLOADS]
    if not _ID.match(upload) or await bucket.value(record_key(tenant, upload)) is None:
        raise NotFound(f"uploaded model {upload!r} not found", field="id")
    users = [
        r.spec.name
        for r in await records(request.app[gw.KV].functions, tenant)
        if r.spec.model.upload == upload
    ]
    if users:
        raise AlreadyExists(
            f"uploaded model {upload} is deployed as {', '.join(users)}; delete those first",
            field="id",
        )
    js = gw.nats_of(request).jetstream()
    await bucket.delete(record_key(tenant, upload))
    await delete_object(js, c.MODELS_OBJECT_BUCKET, object_name(tenant, upload))
    await gw.publish_event(request, "model.deleted", {"tenant": tenant, "model": upload})
    return gw.json_response({"deleted": upload})


async def uploads_ctx(app: web.Application) -> AsyncIterator[None]:
    """The uploads' record bucket and object bucket (after the gateway's NATS context).

    Only gateways read and write them, so only gateways create them: no other role's
    NATS permissions need to name them."""
    js, config = app[gw.NC].jetstream(), app[gw.CONFIG]
    replicas = cluster_replicas(app[gw.NC], config.nats_replicas)
    limits, reshape = stream_max_bytes(config), may_reshape(config)
    kv = await ensure_kv(js, c.KV_MODELS, replicas=replicas, reshape=reshape, limits=limits)
    await ensure_object_bucket(
        js,
        c.MODELS_OBJECT_BUCKET,
        replicas=replicas,
        max_bytes=limits[f"OBJ_{c.MODELS_OBJECT_BUCKET}"],
        reshape=reshape,
    )
    codec = Codec.json(ModelUpload, lambda u: record_key(u.tenant, u.id))
    app[UPLOADS] = Bucket(js, kv, c.KV_MODELS, codec)
    yield


ROUTES: list[tuple[RouteDoc, Handler]] = [
    (
        RouteDoc(
            "POST",
            "/v1/models",
            "Upload a model directory (a tar or zip archive; id = its SHA-256)",
            ok=201,
            exists_ok=True,
            media=ARCHIVE_TYPES,
        ),
        models_post,
    ),
    (RouteDoc("GET", "/v1/models", "List the tenant's uploaded models"), models_list),
    (
        RouteDoc(
            "DELETE",
            "/v1/models/{id}",
            "Delete an uploaded model",
            params=(Param("id", "path", {"type": "string", "pattern": UPLOAD_ID_PATTERN}),),
        ),
        model_delete,
    ),
]
