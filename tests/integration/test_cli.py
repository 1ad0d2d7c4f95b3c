"""The `gpufaas` CLI against an in-process platform: every command sends the caller's key
and turns an error reply into one line (with a hint for a missing or refused key)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from typer.testing import CliRunner, Result

from gpufaas.main import app as cli_app
from tests.integration.conftest import DEMO_BODY, Platform
from tests.support import eventually


async def test_commands_send_the_key_and_report_errors_in_one_line(platform: Platform) -> None:
    runner = CliRunner()
    admin = await platform.key_for("default", admin=True)
    url = str(platform.client.make_url("")).rstrip("/")

    def cli(*args: str, key: str = admin) -> Result:
        argv = [*args, "--url", url, "--api-key", key]
        return runner.invoke(cli_app, argv, catch_exceptions=False)

    assert (await platform.client.post("/v1/functions", json=DEMO_BODY)).status == 201
    result = await asyncio.to_thread(cli, "invoke", "minilm", "hello world")
    assert result.exit_code == 0, result.output
    assert "embedding FP32 [1, 384]" in result.output
    result = await asyncio.to_thread(cli, "status")
    assert result.exit_code == 0, result.output
    assert "minilm" in result.output

    result = await asyncio.to_thread(cli, "keys", "create", "--tenant", "bob")
    assert result.exit_code == 0, result.output
    bob = next(w for w in result.output.split() if w.startswith("gpf_"))
    key_id = bob.split("_")[1]
    listed = await asyncio.to_thread(cli, "keys", "list")
    assert key_id in listed.output
    # bob sees none of default's functions: a delete of minilm is a 404, in one line.
    result = await asyncio.to_thread(cli, "delete", "minilm", key=bob)
    assert result.exit_code == 1
    assert "not_found" in result.output or "not found" in result.output
    assert (await asyncio.to_thread(cli, "workflow", "list", key=bob)).exit_code == 0
    # bob may not manage keys: 403 with a hint.
    result = await asyncio.to_thread(cli, "keys", "list", key=bob)
    assert result.exit_code == 1
    assert "hint:" in result.output
    result = await asyncio.to_thread(cli, "keys", "revoke", key_id)
    assert result.exit_code == 0, result.output

    async def refused() -> bool:
        result = await asyncio.to_thread(cli, "status", key=bob)
        return result.exit_code == 1 and "hint:" in result.output

    await eventually(refused, 10, "the revoked key to be refused")
    result = await asyncio.to_thread(cli, "delete", "minilm")
    assert result.exit_code == 0, result.output


async def test_keys_bootstrap_makes_the_first_admin_key_then_keeps_it(
    platform: Platform, tmp_path: Path
) -> None:
    """`gpufaas keys bootstrap` (compose, Kubernetes: no `gpufaas up` made a key) writes an
    admin key with the process's NATS identity; the gateway takes it; a second run keeps it."""
    runner = CliRunner()
    env = {k: v for k, v in platform.config.to_env().items() if k.startswith("GPUFAAS_NATS")}

    def bootstrap() -> Result:
        argv = ["keys", "bootstrap", "--data-dir", str(tmp_path)]
        return runner.invoke(cli_app, argv, env=env, catch_exceptions=False)

    first = await asyncio.to_thread(bootstrap)
    assert first.exit_code == 0, first.output
    assert "created" in first.output
    key = first.output.strip().splitlines()[-1]
    assert (tmp_path / "admin.key").stat().st_mode & 0o777 == 0o600
    resp = await platform.client.get("/v1/keys", headers={"Authorization": f"Bearer {key}"})
    assert resp.status == 200, await resp.text()
    again = await asyncio.to_thread(bootstrap)
    assert again.exit_code == 0, again.output
    assert "kept" in again.output
    assert again.output.strip().splitlines()[-1] == key
