"""Running the gateway as a process: bind, announce readiness, stop on a signal."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import structlog
from aiohttp import web

from gpufaas.gateway.app import create_app
from gpufaas.shared.config import Config
from gpufaas.shared.errors import PlatformError
from gpufaas.shared.logging import configure_logging
from gpufaas.shared.paths import check_root
from gpufaas.shared.service import stop_signals

log = structlog.get_logger()


async def serve(config: Config) -> int:
    """Serve until SIGINT/SIGTERM, then stop accepting, drain and close NATS."""
    runner = web.AppRunner(
        create_app(config), shutdown_timeout=config.shutdown_deadline_s / 2, access_log=None
    )
    stop = stop_signals()
    try:
        await runner.setup()
        site = web.TCPSite(runner, config.http_host, config.http_port)
        await site.start()
    except PlatformError as exc:
        log.error("gateway.start_failed", code=exc.code, error=exc.message)
        await runner.cleanup()
        return 1
    except OSError as exc:
        log.error(
            "gateway.bind_failed", host=config.http_host, port=config.http_port, error=str(exc)
        )
        await runner.cleanup()
        return 1
    if config.ready_file:
        await asyncio.to_thread(Path(config.ready_file).write_text, str(os.getpid()))
    log.info(
        "gateway.started",
        url=f"http://{config.http_host}:{config.http_port}",
        grpc_port=config.grpc_port or None,
    )
    await stop.wait()
    log.info("gateway.stopping")
    await runner.cleanup()
    log.info("gateway.stopped")
    return 0


def main() -> None:
    try:
        config = Config.from_env()
        check_root(config.shm_dir)  # it writes inputs as host tubes there
    except PlatformError as exc:
        print(f"error: {exc.message} ({exc.field})", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(config.log_format, config.log_level, service="gateway")
    raise SystemExit(asyncio.run(serve(config)))
