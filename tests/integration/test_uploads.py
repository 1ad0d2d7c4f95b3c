"""Uploaded models (POST /v1/models): deploy from an upload, member checks, caps, tenancy."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import stat
import tarfile
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats.js.errors
import numpy as np
import pytest
from typer.testing import CliRunner, Result

from gpufaas.gateway.models import ARCHIVE_TYPES, SPOOL_DIR
from gpufaas.main import app as cli_app
from gpufaas.shared import constants as c
from gpufaas.shared.catalog import resolve_model_dir, upload_dir
from gpufaas.shared.messages import ModelSource
from gpufaas.shared.objects import put_object
from gpufaas.shared.uploads import ALLOWED_FILES
from tests.integration.conftest import (
    DEMO_BODY,
    Platform,
    PlatformFactory,
    bearer,
    text_request,
)

pytestmark = pytest.mark.integration

TEXTS = ["The cat sits on the mat.", "Stock markets fell today."]
TAR = {"Content-Type": "application/x-tar"}


def minilm_tar() -> bytes:
    """The packaged MiniLM directory's model files as a tar, as `tar -C dir -cf - .` does."""
    src = resolve_model_dir(ModelSource(builtin="all-minilm-l6-v2"))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(src, arcname=".", recursive=False)
        for f in sorted(src.iterdir()):
            if f.name in ALLOWED_FILES:
                tar.add(f, arcname=f"./{f.name}")
    return buf.getvalue()


def small_tar(seed: int = 0, size: int = 4096, extra: list[tarfile.TarInfo] | None = None) -> bytes:
    """A small archive that passes the member checks (its weights are not a real model)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in (
            ("config.json", b"{}"),
            ("model.safetensors", bytes([seed % 256]) * size),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra or []:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isreg() else None)
    return buf.getvalue()


async def upload(p: Platform, data: Any, key: str | None = None, **headers: str) -> Any:
    h = {**TAR, **headers, **(bearer(key) if key else {})}
    body = io.BytesIO(data) if isinstance(data, bytes) else data  # sized: a Content-Length
    return await p.client.post("/v1/models", data=body, headers=h)


async def objects_stored(p: Platform) -> int:
    """Chunks in the models object bucket: 0 when no archive's bytes were kept (a deleted
    object leaves only its tombstone record, as every NATS object store does)."""
    js = p.services["scheduler"].js
    bucket = c.MODELS_OBJECT_BUCKET
    try:
        info = await js.stream_info(f"OBJ_{bucket}", subjects_filter=f"$O.{bucket}.C.>")
    except nats.js.errors.NotFoundError:
        return 0
    return sum((info.state.subjects or {}).values())


async def assert_nothing_left(p: Platform, key: str | None = None) -> None:
    listed = await (await p.client.get("/v1/models", headers=bearer(key) if key else {})).json()
    assert listed["models"] == []
    assert listed["used_bytes"] == 0
    assert await objects_stored(p) == 0
    spool = p.config.data_dir / SPOOL_DIR
    assert not spool.exists() or list(spool.iterdir()) == []


async def embed(p: Platform, name: str, key: str) -> np.ndarray:
    resp = await p.client.post(
        f"/v2/models/{name}/infer", json=text_request(TEXTS), headers=bearer(key)
    )
    assert resp.status == 200, await resp.text()
    (out,) = (await resp.json())["outputs"]
    return np.asarray(out["data"], dtype=np.float32).reshape(len(TEXTS), 384)


async def test_upload_deploy_invoke_matches_builtin(platform: Platform) -> None:
    """A tenant uploads the MiniLM directory, deploys it and gets the builtin's output."""
    alice = await platform.key_for("alice")
    archive = minilm_tar()
    resp = await upload(platform, archive, alice)
    assert resp.status == 201, await resp.text()
    body = await resp.json()
    model = body["model"]
    assert model == hashlib.sha256(archive).hexdigest()
    assert body["bytes"] == len(archive)
    assert "model.safetensors" in body["files"]
    assert "tokenizer.json" in body["files"]
    again = await upload(platform, archive, alice)  # content-addressed: stored once
    assert again.status == 200
    assert (await again.json())["created"] is False

    deploy = {"name": "mine", "model": {"upload": model, "architecture": "bert-embedding"}}
    resp = await platform.client.post("/v1/functions", json=deploy, headers=bearer(alice))
    assert resp.status == 201, await resp.text()
    assert (await resp.json())["spec"]["model"]["upload"] == model
    assert (await platform.client.post("/v1/functions", json=DEMO_BODY)).status == 201
    mine = await embed(platform, "mine", alice)
    builtin = await embed(platform, "minilm", platform.api_key)
    assert np.array_equal(mine, builtin)

    unpacked = upload_dir(platform.config.data_dir, "alice", model)
    assert stat.S_IMODE(unpacked.stat().st_mode) == 0o700
    assert stat.S_IMODE(unpacked.parent.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in unpacked.iterdir())
    assert sorted(f.name for f in unpacked.iterdir()) == body["files"]

    listed = await (await platform.client.get("/v1/models", headers=bearer(alice))).json()
    assert [m["model"] for m in listed["models"]] == [model]
    assert listed["used_bytes"] == len(archive)
    in_use = await platform.client.delete(f"/v1/models/{model}", headers=bearer(alice))
    assert in_use.status == 409
    assert (await in_use.json())["field"] == "id"
    resp = await platform.client.delete("/v1/functions/mine", headers=bearer(alice))
    assert resp.status == 200
    resp = await platform.client.delete(f"/v1/models/{model}", headers=bearer(alice))
    assert resp.status == 200, await resp.text()
    await assert_nothing_left(platform, alice)


async def test_another_tenant_cannot_see_deploy_or_delete(platform: Platform) -> None:
    alice, bob = await platform.key_for("alice"), await platform.key_for("bob")
    resp = await upload(platform, small_tar(), alice)
    assert resp.status == 201, await resp.text()
    model = (await resp.json())["model"]

    listed = await (await platform.client.get("/v1/models", headers=bearer(bob))).json()
    assert listed["models"] == []
    anonymous = {"Authorization": ""}
    assert (await upload(platform, small_tar(), **anonymous)).status == 401
    assert (await platform.client.get("/v1/models", headers=anonymous)).status == 401
    deploy = {"name": "stolen", "model": {"upload": model}}
    resp = await platform.client.post("/v1/functions", json=deploy, headers=bearer(bob))
    assert resp.status == 404
    assert (await resp.json())["field"] == "model.upload"
    resp = await platform.client.delete(f"/v1/models/{model}", headers=bearer(bob))
    assert resp.status == 404
    # Bob uploading the same bytes gets his own copy; deleting it leaves Alice's.
    resp = await upload(platform, small_tar(), bob)
    assert resp.status == 201
    assert (await platform.client.delete(f"/v1/models/{model}", headers=bearer(bob))).status == 200
    listed = await (await platform.client.get("/v1/models", headers=bearer(alice))).json()
    assert [m["model"] for m in listed["models"]] == [model]


def _info(
    name: str, kind: bytes = tarfile.REGTYPE, size: int = 2, link: str = ""
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size if kind == tarfile.REGTYPE else 0
    info.linkname = link
    return info


def _zip(name: str, mode: int = 0) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("model.safetensors", b"w" * 10)
        info = zipfile.ZipInfo(name)
        info.external_attr = mode << 16
        zf.writestr(info, b"/etc/passwd")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("archive", "member"),
    [
        (small_tar(extra=[_info("../config.json")]), "../config.json"),
        (small_tar(extra=[_info("./../../tmp/evil.json")]), "./../../tmp/evil.json"),
        (small_tar(extra=[_info("/etc/vocab.txt")]), "/etc/vocab.txt"),
        (small_tar(extra=[_info("vocab.txt", tarfile.SYMTYPE, link="/etc/passwd")]), "vocab.txt"),
        (small_tar(extra=[_info("vocab.txt", tarfile.LNKTYPE, link="config.json")]), "vocab.txt"),
        (small_tar(extra=[_info("sub", tarfile.DIRTYPE)]), "sub"),
        (small_tar(extra=[_info("sitecustomize.py")]), "sitecustomize.py"),
        (small_tar(extra=[_info("config.json")]), "config.json"),  # twice
        (_zip("../vocab.txt"), "../vocab.txt"),
        (_zip("/abs/vocab.txt"), "/abs/vocab.txt"),
        (_zip("vocab.txt", stat.S_IFLNK | 0o777), "vocab.txt"),
    ],
)
async def test_bad_members_refused_leaving_nothing(
    platform: Platform, archive: bytes, member: str
) -> None:
    resp = await upload(platform, archive)
    assert resp.status == 400, await resp.text()
    body = await resp.json()
    assert body["field"] == f"archive[{member}]"
    assert member in body["error"]
    await assert_nothing_left(platform)


async def test_tampered_object_is_refused_by_the_node(platform: Platform) -> None:
    """A node unpacks an upload only if its bytes hash to its id, whatever the bus holds."""
    resp = await upload(platform, small_tar())
    model = (await resp.json())["model"]
    js = platform.services["scheduler"].js
    await put_object(js, c.MODELS_OBJECT_BUCKET, f"default/{model}", small_tar(seed=9))
    resp = await platform.client.post(
        "/v1/functions", json={"name": "forged", "model": {"upload": model}}
    )
    assert resp.status == 422, await resp.text()
    assert "does not match its id" in (await resp.json())["error"]
    unpacked = upload_dir(platform.config.data_dir, "default", model)
    assert list(unpacked.parent.iterdir()) == []  # no half-unpacked directory left either


async def test_not_an_archive_or_no_weights(platform: Platform) -> None:
    resp = await upload(platform, b"just some bytes, not an archive" * 100)
    assert resp.status == 400
    assert (await resp.json())["field"] == "body"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.addfile(_info("config.json"), io.BytesIO(b"{}"))
    resp = await upload(platform, buf.getvalue())
    assert resp.status == 400
    assert (await resp.json())["field"] == "archive"
    resp = await platform.client.post("/v1/models", data=b"x", headers={"Content-Type": "text/x"})
    assert resp.status == 415
    await assert_nothing_left(platform)


async def test_oversize_upload_refused_leaving_nothing(platform_factory: PlatformFactory) -> None:
    p = await platform_factory(max_model_bytes=64 * 1024)
    archive = small_tar(size=100 * 1024)
    resp = await upload(p, archive)  # its Content-Length says so: refused before reading
    assert resp.status == 413
    assert (await resp.json())["field"] == "body"

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: refused as it streams
        for i in range(0, len(archive), 16 * 1024):
            yield archive[i : i + 16 * 1024]

    resp = await upload(p, chunks())
    assert resp.status == 413
    assert "GPUFAAS_MAX_MODEL_BYTES" in (await resp.json())["error"]
    await assert_nothing_left(p)
    small = small_tar(size=1024)

    async def small_chunks() -> AsyncIterator[bytes]:
        yield small[:1000]
        yield small[1000:]

    resp = await upload(p, small_chunks())  # under the cap: accepted
    assert resp.status == 201, await resp.text()
    assert (await resp.json())["model"] == hashlib.sha256(small).hexdigest()


async def test_gzipped_tar_and_zip_accepted(platform: Platform) -> None:
    resp = await upload(
        platform, gzip.compress(small_tar()), **{"Content-Type": "application/gzip"}
    )
    assert resp.status == 201, await resp.text()
    assert (await resp.json())["format"] == "tar"
    resp = await upload(platform, _zip("vocab.txt"), **{"Content-Type": "application/zip"})
    assert resp.status == 201, await resp.text()
    body = await resp.json()
    assert body["format"] == "zip"
    assert body["files"] == ["model.safetensors", "vocab.txt"]


async def test_per_tenant_quota(platform_factory: PlatformFactory) -> None:
    size = len(small_tar())
    p = await platform_factory(model_quota_bytes=2 * size + size // 2)
    alice, bob = await p.key_for("alice"), await p.key_for("bob")
    first = await (await upload(p, small_tar(1), alice)).json()
    assert (await upload(p, small_tar(2), alice)).status == 201
    resp = await upload(p, small_tar(3), alice)
    assert resp.status == 403
    body = await resp.json()
    assert body["code"] == "quota_exceeded"
    assert body["field"] == "GPUFAAS_MODEL_QUOTA_BYTES"
    assert "GPUFAAS_MODEL_QUOTA_BYTES" in body["error"]

    async def one_chunk() -> AsyncIterator[bytes]:  # no Content-Length: checked once spooled
        yield small_tar(3)

    assert (await upload(p, one_chunk(), alice)).status == 403
    listed = await (await p.client.get("/v1/models", headers=bearer(alice))).json()
    assert listed["used_bytes"] == 2 * size
    assert listed["quota_bytes"] == 2 * size + size // 2
    assert (await upload(p, small_tar(3), bob)).status == 201  # quotas are per tenant
    deleted = await p.client.delete(f"/v1/models/{first['model']}", headers=bearer(alice))
    assert deleted.status == 200
    assert (await upload(p, small_tar(3), alice)).status == 201


async def test_openapi_documents_the_routes(platform: Platform) -> None:
    spec = await (await platform.client.get("/openapi.json")).json()
    post = spec["paths"]["/v1/models"]["post"]
    assert set(post["requestBody"]["content"]) == set(ARCHIVE_TYPES)  # what the route takes
    assert set(post["responses"]) == {"201", "200", "default"}  # 200: the same upload again
    assert "get" in spec["paths"]["/v1/models"]
    assert "delete" in spec["paths"]["/v1/models/{id}"]


def test_unpacked_directory_is_under_the_data_dir(tmp_path: Path) -> None:
    model = "0" * 64
    assert upload_dir(tmp_path, "alice", model) == tmp_path / "models" / "alice" / model
    with pytest.raises(Exception, match="not a valid name"):
        upload_dir(tmp_path, "../x", model)
    with pytest.raises(Exception, match="not an uploaded model's id"):
        upload_dir(tmp_path, "alice", "../../etc")


async def test_cli_deploy_path_uploads_then_deploys(platform: Platform) -> None:
    """`gpufaas deploy NAME --path DIR` streams the directory's model files, deploys from
    the upload, and a second run finds the same id without uploading again."""
    runner = CliRunner()
    alice = await platform.key_for("alice")
    url = str(platform.client.make_url("")).rstrip("/")
    src = resolve_model_dir(ModelSource(builtin="all-minilm-l6-v2"))
    common = ["--url", url, "--api-key", alice]

    def cli(*args: str) -> Result:
        return runner.invoke(cli_app, list(args), catch_exceptions=False)

    result = await asyncio.to_thread(cli, "deploy", "mine", "--path", str(src), *common)
    assert result.exit_code == 0, result.output
    assert "uploaded model" in result.output
    assert "deployed" in result.output
    assert "README.md" in result.output  # named as left out
    listed = await (await platform.client.get("/v1/models", headers=bearer(alice))).json()
    (model,) = listed["models"]
    assert "README.md" not in model["files"]

    result = await asyncio.to_thread(cli, "deploy", "again", "--path", str(src), *common)
    assert result.exit_code == 0, result.output
    assert "already uploaded" in result.output
    result = await asyncio.to_thread(cli, "models", "list", *common)
    assert model["model"] in result.output
    result = await asyncio.to_thread(cli, "models", "delete", model["model"], *common)
    assert result.exit_code == 1
    assert "deployed as" in result.output
