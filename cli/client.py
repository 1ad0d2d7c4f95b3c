"""A small HTTP client of the gateway for the CLI (standard library only)."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console

from gpufaas.shared.apikeys import ADMIN_KEY_FILE, read_key_file
from gpufaas.shared.catalog import DEMO_FUNCTION, DEMO_MODEL
from gpufaas.shared.config import default_data_dir

AUTH_HINTS = {
    401: (
        "no valid API key: pass --api-key, set GPUFAAS_API_KEY, or run where `gpufaas up` "
        "keeps <data-dir>/admin.key (GPUFAAS_DATA_DIR)"
    ),
    403: "this key may not do that (an admin-only action, or another tenant's)",
}


def find_key(explicit: str | None = None, data_dir: Path | None = None) -> str | None:
    """The API key to send: ``explicit`` (``--api-key`` or ``GPUFAAS_API_KEY``), else the
    admin key ``gpufaas up`` keeps in its data directory; ``None`` when there is none."""
    if explicit:
        return explicit.strip()
    env_dir = os.environ.get("GPUFAAS_DATA_DIR")
    directory = data_dir or (Path(env_dir) if env_dir else default_data_dir())
    return read_key_file(directory / ADMIN_KEY_FILE)[0]


def auth_headers(key: str | None) -> dict[str, str]:
    """``Authorization: Bearer <key>`` (nothing without a key)."""
    return {"Authorization": f"Bearer {key}"} if key else {}


class ApiError(RuntimeError):
    """An error reply from the gateway, or no gateway at all."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        field = f" (field {body['field']})" if body.get("field") else ""
        super().__init__(f"{status} {body.get('code', 'error')}: {body.get('error', body)}{field}")
        self.status = status
        self.body = body


def call(
    url: str, method: str = "GET", body: Any = None, timeout: float = 300, key: str | None = None
) -> Any:
    """One JSON request with ``key``; raises ``ApiError`` on an error status or no connection."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=auth_headers(key))
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        raise api_error(exc) from None
    except (urllib.error.URLError, OSError) as exc:
        raise ApiError(0, {"code": "unavailable", "error": f"cannot reach {url}: {exc}"}) from None


def api_error(exc: urllib.error.HTTPError) -> ApiError:
    """The gateway's error reply (``{"code", "error", "field"}``) as an ``ApiError``."""
    try:
        payload = json.loads(exc.read())
    except ValueError:
        payload = {"error": exc.reason}
    return ApiError(exc.code, payload)


def sse(url: str, key: str | None = None) -> Iterator[tuple[str, str]]:
    """Follow a Server-Sent Events stream: yields (event, data); ``ApiError`` if refused."""
    headers = {"Accept": "text/event-stream", **auth_headers(key)}
    req = urllib.request.Request(url, headers=headers)
    try:
        resp = urllib.request.urlopen(req)
    except urllib.error.HTTPError as exc:
        raise api_error(exc) from None
    with resp:
        event, data = "message", list[str]()
        for raw in resp:
            line = raw.decode().rstrip("\n")
            if not line:
                if data:
                    yield event, "\n".join(data)
                event, data = "message", []
            elif line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())


def deploy_demo(gateway: str, console: Console, key: str | None = None) -> None:
    """Deploy the demo model (if absent) with a progress display, then print a curl line."""
    body = {"name": DEMO_FUNCTION, "model": {"builtin": DEMO_MODEL}}
    with console.status(f"Loading demo model {DEMO_MODEL} as function '{DEMO_FUNCTION}'…"):
        rec = call(f"{gateway}/v1/functions", "POST", body, key=key)
    mib = rec["model_bytes"] / 2**20
    console.print(f"  demo function [bold]{DEMO_FUNCTION}[/bold] ready ({mib:.1f} MiB of weights)")
    payload = '{"inputs":[{"name":"text","datatype":"BYTES","shape":[1],"data":["hello world"]}]}'
    console.print("  try it:")
    console.print(
        f"    curl -s {curl_auth(key)}{gateway}/v2/models/{DEMO_FUNCTION}/infer -d '{payload}'",
        soft_wrap=True,
        highlight=False,
    )


def curl_auth(key: str | None) -> str:
    """The curl option that sends ``key`` (with a trailing space), or nothing."""
    return f'-H "Authorization: Bearer {key}" ' if key else ""
