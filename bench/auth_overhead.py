"""What an API key costs a request at the gateway (issue 15): the check alone, and over HTTP.

1. The middleware's check on a cached key (parse, cache lookup, keyed BLAKE2b, constant-time
   compare, expiry), called directly on a mocked request, median of many runs.
2. ``GET`` round trips on one keep-alive connection to two in-process aiohttp apps that
   differ only in the auth middleware, alternating; the p50 difference is auth's share.

No NATS: the key is in the cache, as on the hot path (a miss costs one KV read).
Run: ``python bench/auth_overhead.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import time
from typing import Any, cast

import _platform as harness
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestServer, make_mocked_request

from gpufaas.gateway.auth import KEYS, auth_middleware, authenticate
from gpufaas.shared import apikeys
from gpufaas.shared.config import Config


def cached_key() -> tuple[str, apikeys.KeyCache]:
    """A tenant key and a cache holding its record (no bucket: a miss would fail loudly)."""
    key_id, secret = apikeys.new_id(), secrets.token_urlsafe(apikeys.SECRET_BYTES)
    record = apikeys.ApiKeyRecord(
        id=key_id, tenant="bench", hash=apikeys.secret_hash(key_id, secret), created_at=0.0
    )
    cache = apikeys.KeyCache(cast(Any, None))
    cache.on_change(key_id, record)
    return f"{apikeys.TOKEN_PREFIX}{key_id}_{secret}", cache


async def check_cost_us(token: str, cache: apikeys.KeyCache, runs: int) -> list[float]:
    """Microseconds per ``authenticate`` call, per batch of 1,000 calls."""
    request = make_mocked_request(
        "GET", "/v1/functions", headers={"Authorization": f"Bearer {token}"}
    )
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(1000):
            await authenticate(request, cache)
        out.append((time.perf_counter() - t0) * 1e3)  # ms per 1000 = µs per call
    return out


def app(cache: apikeys.KeyCache | None) -> web.Application:
    """A one-route app, with the gateway's auth middleware when ``cache`` is given."""

    async def ok(_: web.Request) -> web.Response:
        return web.json_response({"functions": []})

    async def publish(*_: Any) -> None:
        return None

    middlewares = [] if cache is None else [auth_middleware(Config(), publish)]
    application = web.Application(middlewares=middlewares)
    if cache is not None:
        application[KEYS] = cache
    application.router.add_get("/v1/functions", ok)
    return application


async def http_cost(token: str, cache: apikeys.KeyCache, requests: int) -> dict[str, float]:
    """p50 and p99 (µs) of round trips with and without auth, alternating in rounds."""
    with_auth, without = TestServer(app(cache)), TestServer(app(None))
    await with_auth.start_server()
    await without.start_server()
    times: dict[str, list[float]] = {"auth": [], "none": []}
    headers = {"Authorization": f"Bearer {token}"}
    try:
        async with ClientSession() as s:
            for _ in range(10):
                for name, server in (("auth", with_auth), ("none", without)):
                    url = str(server.make_url("/v1/functions"))
                    for i in range(requests // 10 + 50):
                        t0 = time.perf_counter()
                        async with s.get(url, headers=headers) as resp:
                            await resp.read()
                        if i >= 50:  # the first requests warm the connection
                            times[name].append((time.perf_counter() - t0) * 1e6)
                        assert resp.status == 200
    finally:
        await with_auth.close()
        await without.close()
    p50 = {k: harness.percentile(v, 50) for k, v in times.items()}
    return {
        "auth_p50_us": p50["auth"],
        "none_p50_us": p50["none"],
        "auth_p99_us": harness.percentile(times["auth"], 99),
        "none_p99_us": harness.percentile(times["none"], 99),
        "delta_p50_us": p50["auth"] - p50["none"],
    }


async def main_async(args: argparse.Namespace) -> None:
    token, cache = cached_key()
    per_call = await check_cost_us(token, cache, args.runs)
    print(
        f"check (cached key), µs per call: median {statistics.median(per_call):.2f}, "
        f"min {min(per_call):.2f}, max {max(per_call):.2f} ({args.runs} x 1000 calls)"
    )
    r = await http_cost(token, cache, args.requests)
    print(
        f"HTTP GET, keep-alive, {args.requests} requests each: p50 {r['auth_p50_us']:.0f} µs "
        f"with auth vs {r['none_p50_us']:.0f} µs without (delta {r['delta_p50_us']:+.0f} µs); "
        f"p99 {r['auth_p99_us']:.0f} vs {r['none_p99_us']:.0f} µs"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, default=50, help="batches of 1,000 checks")
    ap.add_argument("--requests", type=int, default=4000, help="HTTP requests per app")
    args = ap.parse_args(argv)
    harness.print_machine(harness.machine("cpu (no device involved)"))
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
