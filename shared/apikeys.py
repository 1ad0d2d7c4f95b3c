"""API keys: ``gpf_<id>_<secret>`` tokens, stored in KV as a keyed hash, never in clear.

The id (12 characters) names the record in the ``gpufaas_keys`` bucket, so a lookup is
one key read; the secret (32 random bytes, URL-safe) is what proves possession. A key
belongs to a tenant and may be an admin key (acts as any tenant, manages keys, deploys
server paths). The gateway verifies keys against a watched copy of the bucket
(:class:`KeyCache`), so a revocation takes effect as soon as the watch delivers it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import os
import re
import secrets
import stat
import string
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Final

import msgspec
import nats.errors

from gpufaas.shared.errors import InvalidArgument, Unauthenticated, Unavailable
from gpufaas.shared.messages import Msg, Tenant, convert
from gpufaas.shared.paths import write_private

if TYPE_CHECKING:
    from gpufaas.shared.kv import Bucket

TOKEN_PREFIX: Final = "gpf_"
ID_ALPHABET: Final = string.ascii_letters + string.digits  # URL-safe, and no "_" (the separator)
ID_LENGTH: Final = 12
SECRET_BYTES: Final = 32
ID_PATTERN: Final = rf"^[A-Za-z0-9]{{{ID_LENGTH}}}(?!\n)$"  # see NAME_PATTERN
_SECRET: Final = re.compile(r"^[A-Za-z0-9_-]{43,128}\Z")  # token_urlsafe(32) is 43 characters
_HASH_LABEL: Final = b"gpufaas.apikey.v1\x00"
ADMIN_KEY_FILE: Final = "admin.key"

KeyId = Annotated[str, msgspec.Meta(pattern=ID_PATTERN)]
Label = Annotated[str, msgspec.Meta(max_length=200)]


class ApiKeyRecord(Msg, frozen=True, tag="apikey.v1"):
    """One key as stored (``gpufaas_keys``, keyed by ``id``): never its secret."""

    id: KeyId
    tenant: Tenant
    hash: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}(?!\n)$")]
    created_at: float
    admin: bool = False
    expires_at: float | None = None
    revoked_at: float | None = None
    label: Label = ""

    def usable(self, now: float) -> bool:
        """Neither revoked nor expired at ``now``."""
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)

    def public(self) -> dict[str, object]:
        """What ``GET /v1/keys`` shows: everything but the hash."""
        out = msgspec.to_builtins(self)
        out.pop("hash", None)
        out.pop("type", None)
        return dict(out)


def secret_hash(key_id: str, secret: str) -> str:
    """Keyed BLAKE2b (RFC 7693's MAC mode) of the secret, keyed by a version label and the
    key's id.

    A fast keyed hash, not a password hash: the secret is 256 random bits, so nobody can
    search for it from the hash however fast it is, and a slow hash would cost
    milliseconds on every uncached request (keyed BLAKE2b takes ~1.5 µs here, HMAC-SHA256
    ~4.4 µs). Keying by the id binds a hash to its record (a hash copied into another
    record verifies nothing). There is no server-side pepper: every gateway would need the
    same one, and rotating it would void every key; the bucket itself is readable only by
    platform identities (NATS permissions).
    """
    key = _HASH_LABEL + key_id.encode()
    return hashlib.blake2b(secret.encode(), key=key, digest_size=32).hexdigest()


def parse_token(token: str) -> tuple[str, str]:
    """``(id, secret)`` of a well-formed token; ``Unauthenticated`` otherwise."""
    n = len(TOKEN_PREFIX)
    key_id, secret = token[n : n + ID_LENGTH], token[n + ID_LENGTH + 1 :]
    if (
        not token.startswith(TOKEN_PREFIX)
        or token[n + ID_LENGTH : n + ID_LENGTH + 1] != "_"
        or not key_id.isascii()
        or not key_id.isalnum()
        or len(key_id) != ID_LENGTH
        or not _SECRET.match(secret)
    ):
        raise Unauthenticated(
            "malformed API key (expected gpf_<id>_<secret>)", field="Authorization"
        )
    return key_id, secret


def check(record: ApiKeyRecord | None, key_id: str, secret: str, now: float) -> ApiKeyRecord:
    """``record`` if ``secret`` is its secret (compared in constant time) and it is usable.

    Unknown, wrong, revoked and expired keys get one message, so a caller learns nothing
    about which ids exist.
    """
    if (
        record is None
        or record.id != key_id
        or not hmac.compare_digest(record.hash, secret_hash(key_id, secret))
        or not record.usable(now)
    ):
        raise Unauthenticated("invalid, revoked or expired API key", field="Authorization")
    return record


def new_id() -> str:
    """A fresh key id (12 characters of ``ID_ALPHABET``: 71 bits, never guessed by chance)."""
    return "".join(secrets.choice(ID_ALPHABET) for _ in range(ID_LENGTH))


async def create_key(
    bucket: Bucket[ApiKeyRecord],
    tenant: str,
    admin: bool = False,
    expires_at: float | None = None,
    label: str = "",
    *,
    now: float | None = None,
) -> tuple[str, ApiKeyRecord]:
    """Make a key and store its record; ``(token, record)``: the token exists only here."""
    now = time.time() if now is None else now
    if expires_at is not None and expires_at <= now:
        raise InvalidArgument("the key would be expired already", field="expires_at")
    while True:
        key_id, secret = new_id(), secrets.token_urlsafe(SECRET_BYTES)
        record = convert(
            {
                "type": "apikey.v1",
                "id": key_id,
                "tenant": tenant,
                "admin": admin,
                "hash": secret_hash(key_id, secret),
                "created_at": now,
                "expires_at": expires_at,
                "label": label,
            },
            ApiKeyRecord,
        )
        if await bucket.create(key_id, record) is not None:  # an id collision: draw again
            return f"{TOKEN_PREFIX}{key_id}_{secret}", record


async def verify(
    bucket: Bucket[ApiKeyRecord], token: str, now: float | None = None
) -> ApiKeyRecord:
    """The record of a valid token, read from KV; ``Unauthenticated`` otherwise."""
    key_id, secret = parse_token(token)
    record = await bucket.value(key_id)
    return check(record, key_id, secret, time.time() if now is None else now)


async def revoke(
    bucket: Bucket[ApiKeyRecord], key_id: str, now: float | None = None
) -> ApiKeyRecord | None:
    """Mark a key revoked (kept, for the listing and audit); ``None`` if there is none."""
    at = time.time() if now is None else now

    def change(current: ApiKeyRecord | None) -> ApiKeyRecord | None:
        if current is None or current.revoked_at is not None:
            return None
        return msgspec.structs.replace(current, revoked_at=at)

    if not re.match(ID_PATTERN, key_id):
        return None
    entry = await bucket.update(key_id, change)
    return None if entry is None else entry.value


class KeyCache:
    """Key records mirrored from the bucket by a watch (``follow(bucket, cache.on_change)``);
    a miss falls back to one KV read, so a key made a moment ago by another gateway works."""

    def __init__(self, bucket: Bucket[ApiKeyRecord]) -> None:
        self.bucket = bucket
        self.records: dict[str, ApiKeyRecord] = {}

    def on_change(self, key: str, value: ApiKeyRecord | None) -> None:
        """One change of the bucket (``None``: deleted)."""
        if value is None or value.id != key:
            self.records.pop(key, None)
        else:
            self.records[key] = value

    async def verify(self, token: str, now: float | None = None) -> ApiKeyRecord:
        """The record of a valid token; ``Unauthenticated`` otherwise."""
        key_id, secret = parse_token(token)
        record = self.records.get(key_id)
        if record is None:
            try:
                record = await self.bucket.value(key_id)
            except (nats.errors.Error, TimeoutError) as exc:
                raise Unavailable(f"cannot verify the API key now: {exc!r}; retry") from None
            if record is not None and record.id == key_id:
                self.records[key_id] = record
        return check(record, key_id, secret, time.time() if now is None else now)


# --- the admin key of `gpufaas up` ----------------------------------------------------


def read_key_file(path: Path) -> tuple[str | None, str | None]:
    """``(token, leaked)``: the token in ``path`` if it is a regular file of ours that
    nobody else can read; else, in ``leaked``, any token a wider file held."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None, None
    with os.fdopen(fd) as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            return None, None
        text = f.read(4096).strip() or None
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        return None, text
    return text, None


def write_key_file(path: Path, token: str) -> None:
    """Write ``token`` to ``path`` atomically, 0600 from the moment it exists, on disk
    before it replaces the old file (readers never see a partial key or a wider mode)."""
    write_private(path, [(token + "\n").encode()], sync=True)


async def ensure_admin_key(
    bucket: Bucket[ApiKeyRecord], path: Path, tenant: str = "default"
) -> tuple[str, bool]:
    """The admin key kept in ``path``: reused if still valid, else made (and written 0600).

    Returns ``(token, created)``. A file others could read is treated as leaked: its key
    is revoked and replaced.
    """
    token, leaked = await asyncio.to_thread(read_key_file, path)
    if leaked is not None:
        with contextlib.suppress(Unauthenticated):
            await revoke(bucket, parse_token(leaked)[0])
    if token is not None:
        try:
            record = await verify(bucket, token)
        except Unauthenticated:
            record = None
        if record is not None and record.admin:
            return token, False
    token, _ = await create_key(bucket, tenant, admin=True, label=f"gpufaas up ({path.name})")
    await asyncio.to_thread(write_key_file, path, token)
    return token, True


__all__ = [
    "ADMIN_KEY_FILE",
    "ApiKeyRecord",
    "KeyCache",
    "check",
    "create_key",
    "ensure_admin_key",
    "parse_token",
    "read_key_file",
    "revoke",
    "secret_hash",
    "verify",
    "write_key_file",
]
