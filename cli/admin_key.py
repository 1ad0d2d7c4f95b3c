"""The admin API key of ``gpufaas up``: made on first start, kept in the data directory."""

from __future__ import annotations

import asyncio
from pathlib import Path

from rich.console import Console

from gpufaas.client import curl_auth
from gpufaas.shared.apikeys import ADMIN_KEY_FILE, ensure_admin_key
from gpufaas.shared.config import Config, default_data_dir
from gpufaas.shared.jetstream import wait_for_jetstream
from gpufaas.shared.kv import TypedBuckets
from gpufaas.shared.service import close_nats, connect_nats

NO_AUTH_WARNING = (
    "[bold red]WARNING: --no-auth: NO AUTHENTICATION.[/bold red] Anyone who can reach the "
    "gateway is any tenant and an admin (X-Gpufaas-Tenant is trusted). For local "
    "experiments only."
)


def key_path(data_dir: Path) -> Path:
    """Where ``gpufaas up`` keeps its admin key (0600)."""
    return data_dir / ADMIN_KEY_FILE


async def _ensure(config: Config, path: Path) -> tuple[str, bool]:
    nc = await connect_nats(config, "gpufaas-up")
    try:
        buckets = await wait_for_jetstream(nc, config)
        return await ensure_admin_key(TypedBuckets(nc.jetstream(), buckets).keys, path)
    finally:
        await close_nats(nc)


def admin_key(config: Config, data_dir: Path) -> tuple[str, bool]:
    """``(token, created)``: the admin key in ``data_dir`` if still valid, else a new one
    (``config``: an identity allowed to write the keys bucket, i.e. NATS admin)."""
    return asyncio.run(_ensure(config, key_path(data_dir)))


def start_auth(
    auth: bool, admin_env: dict[str, str], data_dir: Path, console: Console
) -> tuple[str | None, bool]:
    """At start: the admin key and whether it is new (``admin_env``: the environment of NATS
    admin's identity); with auth off, no key and a loud warning."""
    if not auth:
        console.print(NO_AUTH_WARNING)
        return None, False
    return admin_key(Config.from_env(environ=admin_env), data_dir)


def print_key(console: Console, url: str, key: str | None, created: bool, data_dir: Path) -> None:
    """The banner's lines about the key: where it is kept and a curl line that uses it
    (without a key: the warning that nothing is authenticated)."""
    if key is None:
        console.print(NO_AUTH_WARNING)
        return
    made = "created" if created else "kept"
    console.print(f"  admin API key ({made} in {key_path(data_dir)}, mode 0600):", highlight=False)
    console.print(f"    {key}", soft_wrap=True, highlight=False)
    console.print(
        f"    curl -s {curl_auth(key)}{url}/v1/functions", soft_wrap=True, highlight=False
    )
    where = (
        "finds the key itself"
        if data_dir == default_data_dir()
        else f"finds it with GPUFAAS_DATA_DIR={data_dir}"
    )
    console.print(
        f"  the gpufaas CLI on this machine {where}; elsewhere set GPUFAAS_API_KEY. "
        "Tenants' keys: gpufaas keys create --tenant NAME",
        highlight=False,
    )
