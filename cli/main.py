"""The ``gpufaas`` command: run the platform, deploy and invoke functions, watch events."""

from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from gpufaas.client import AUTH_HINTS, ApiError, call, find_key, sse
from gpufaas.shared.config import Config, default_data_dir
from gpufaas.shared.constants import DEFAULT_GRPC_PORT, DEFAULT_HTTP_PORT, DEFAULT_NATS_PORT

app = typer.Typer(help="gpufaas: serverless ML inference on GPUs.", no_args_is_help=True)
console = Console()

GatewayUrl = Annotated[
    str, typer.Option("--url", envvar="GPUFAAS_GATEWAY_URL", help="gateway base URL")
]
DEFAULT_URL = f"http://127.0.0.1:{DEFAULT_HTTP_PORT}"
ApiKey = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        envvar="GPUFAAS_API_KEY",
        help="API key (default: the admin key `gpufaas up` keeps in its data directory)",
        show_default=False,
    ),
]


def _fail(message: str, code: int = 1) -> typer.Exit:
    console.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


def _api_fail(exc: ApiError) -> typer.Exit:
    """An error reply, with a one-line hint when the key was missing or not enough."""
    # A 403 may be a tenant's quota (the message names it), not the key.
    quota = exc.body.get("code") == "quota_exceeded"
    hint = None if quota else AUTH_HINTS.get(exc.status)
    return _fail(f"{exc}\n[dim]hint: {hint}[/dim]" if hint else str(exc))


def _api(url: str, method: str = "GET", body: Any = None, api_key: str | None = None) -> Any:
    """One gateway call with the caller's key (``find_key``); an error reply exits the command."""
    try:
        return call(url, method, body, key=find_key(api_key))
    except ApiError as exc:
        raise _api_fail(exc) from None


@app.command()
def up(
    http_port: Annotated[int, typer.Option(help="gateway HTTP port")] = DEFAULT_HTTP_PORT,
    grpc_port: Annotated[
        int, typer.Option(help="gateway gRPC port (KServe v2); 0: no gRPC")
    ] = DEFAULT_GRPC_PORT,
    nats_port: Annotated[int, typer.Option(help="embedded NATS port")] = DEFAULT_NATS_PORT,
    nats_url: Annotated[
        str | None, typer.Option(help="use this NATS instead of starting one")
    ] = None,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    devices: Annotated[str, typer.Option(help="auto (probe GPUs), cpu, or sim:N")] = "auto",
    topology: Annotated[str, typer.Option(help="topology for sim:N (name or file)")] = "",
    nodes: Annotated[int, typer.Option(help="number of nodes to start")] = 1,
    data_dir: Annotated[Path, typer.Option(help="state directory")] = default_data_dir(),
    demo: Annotated[bool, typer.Option(help="deploy the demo model")] = False,
    auth: Annotated[
        bool,
        typer.Option(
            "--auth/--no-auth",
            help="API keys on the gateway; --no-auth trusts X-Gpufaas-Tenant (experiments only)",
        ),
    ] = True,
) -> None:
    """Start the whole platform on this machine (embedded NATS, all services)."""
    from gpufaas.platform import UpOptions, UsageError  # noqa: PLC0415 - keep --help fast
    from gpufaas.platform import up as run_up  # noqa: PLC0415

    opts = UpOptions(
        host,
        http_port,
        nats_port,
        nats_url,
        devices,
        topology,
        nodes,
        data_dir,
        demo,
        auth,
        grpc_port=grpc_port,
    )
    try:
        raise typer.Exit(run_up(opts, console))
    except UsageError as exc:
        raise _fail(str(exc), 2) from None


@app.command()
def node() -> None:
    """Run this node's services (tensor store, transfer, memory, worker); config from GPUFAAS_*."""
    from gpufaas.platform import node as run_node  # noqa: PLC0415

    raise typer.Exit(run_node(Config.from_env(), console))


def _service(module: str) -> None:
    os.execv(sys.executable, [sys.executable, "-m", f"gpufaas.{module}"])


for _svc in ("gateway", "scheduler", "tensorstore", "transfer", "memory", "worker"):

    def _cmd(svc: str = _svc) -> None:
        _service(svc)

    app.command(name=_svc, help=f"Run the {_svc} service alone (config from GPUFAAS_*).")(_cmd)


@app.command()
def deploy(
    name: Annotated[str, typer.Argument(help="function name")],
    builtin: Annotated[
        str | None, typer.Option(help="a packaged model, e.g. all-minilm-l6-v2")
    ] = None,
    path: Annotated[
        Path | None, typer.Option(help="a local model directory: uploaded, then deployed")
    ] = None,
    server_path: Annotated[
        str | None, typer.Option(help="a model directory on the node (admin keys)")
    ] = None,
    architecture: Annotated[str, typer.Option(help="model architecture")] = "bert-embedding",
    max_batch_size: Annotated[int, typer.Option(help="largest batch")] = 32,
    slo_ms: Annotated[float | None, typer.Option(help="latency objective per request")] = None,
    url: GatewayUrl = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Deploy a model as a function: a packaged model, a local directory (uploaded), or a
    directory on the node."""
    model: dict[str, str] = {"architecture": architecture}
    if builtin:
        model["builtin"] = builtin
    if server_path:
        model["path"] = server_path
    options: dict[str, float] = {"max_batch_size": max_batch_size}
    if slo_ms is not None:
        options["slo_ms"] = slo_ms
    body = {"name": name, "model": model, "options": options}
    try:
        if path is not None:
            from gpufaas.upload import upload_directory  # noqa: PLC0415 (only when uploading)

            model["upload"] = upload_directory(url, path, find_key(api_key), console)
        with console.status(f"Deploying {name} (loading the model)…"):
            rec = call(f"{url}/v1/functions", "POST", body, key=find_key(api_key))
    except ApiError as exc:
        raise _api_fail(exc) from None
    console.print(
        f"[green]deployed[/green] {rec['spec']['name']} on {', '.join(placed_on(rec))}: "
        f"{rec['tensor_count']} tensors, {rec['model_bytes'] / 2**20:.1f} MiB"
    )


@app.command()
def invoke(
    name: Annotated[str, typer.Argument(help="function name")],
    texts: Annotated[list[str], typer.Argument(help="input texts")],
    url: GatewayUrl = DEFAULT_URL,
    api_key: ApiKey = None,
    full: Annotated[bool, typer.Option(help="print whole output tensors")] = False,
) -> None:
    """Invoke a text function (e.g. the demo embedding model)."""
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]}
    res = _api(f"{url}/v2/models/{name}/infer", "POST", body, api_key=api_key)
    for out in res["outputs"]:
        data = out["data"] if full else out["data"][:6]
        more = "" if full or len(out["data"]) <= 6 else f" … ({len(out['data'])} values)"
        console.print(f"{out['name']} {out['datatype']} {out['shape']}: {data}{more}")
    params = res.get("parameters", {})
    console.print(
        f"[dim]node {params.get('node')} device {params.get('device')} "
        f"breakdown µs {params.get('breakdown_us')}[/dim]"
    )


@app.command()
def status(url: GatewayUrl = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Nodes, their devices, and deployed functions."""
    nodes = _api(f"{url}/v1/nodes", api_key=api_key)["nodes"]
    functions = _api(f"{url}/v1/functions", api_key=api_key)["functions"]
    console.print(_nodes_table(nodes))
    console.print(_store_table(nodes))
    memory = _memory_table(nodes)
    if memory.row_count:  # nodes without GPUs have no pools
        console.print(memory)
    console.print(_functions_table(functions))


def _table(title: str, *columns: str) -> Table:
    t = Table(title=title)
    for col in columns:
        t.add_column(col)
    return t


def _nodes_table(nodes: list[dict[str, Any]]) -> Table:
    t = _table("nodes", "node", "services", "devices")
    for n in nodes:
        devs = ", ".join(
            f"{d['name']} ({d['kind']}, {d['memory_bytes'] / 2**30:.0f} GiB"
            + (f", {len(d['functions'])} fn" if d.get("functions") else "")
            + ")"
            for d in n["devices"]
        )
        t.add_row(n["node"], ", ".join(n["services"]), devs)
    return t


def _store_table(nodes: list[dict[str, Any]]) -> Table:
    t = _table(
        "tensor store (each tensor stored once per tier per node)",
        "node",
        "tier",
        "tensors",
        "instances",
        "stored MiB",
        "private copies MiB",
        "saved",
    )
    for n in nodes:
        for tier, st in (n.get("tensor_store") or {}).items():
            private = st["bytes_without_sharing"]
            saved = f"{1 - st['bytes_referenced'] / private:.0%}" if private else "-"
            t.add_row(
                n["node"],
                tier,
                str(st["tensors"]),
                str(st["leases"]),
                f"{st['bytes_stored'] / 2**20:.1f}",
                f"{private / 2**20:.1f}",
                saved,
            )
    return t


def _memory_table(nodes: list[dict[str, Any]]) -> Table:
    t = _table(
        "memory (per device: segments held, blocks in them, room held for intermediates)",
        "node",
        "device",
        "capacity GiB",
        "segments MiB",
        "blocks MiB",
        "held MiB",
        "fragmentation",
    )
    for n in nodes:
        for device, p in ((n.get("memory") or {}).get("pools") or {}).items():
            t.add_row(
                n["node"],
                device,
                f"{p['capacity_bytes'] / 2**30:.1f}",
                f"{p['reserved_bytes'] / 2**20:.1f}",
                f"{p['allocated_bytes'] / 2**20:.1f}",
                f"{p['held_bytes'] / 2**20:.1f}",
                f"{p['fragmentation']:.0%}",
            )
    return t


def placed_on(record: dict[str, Any]) -> list[str]:
    """Where a function's instances are: ``node/gpu:N`` each (the node alone without a GPU)."""
    gpus = record.get("gpus") or {}
    return [f"{n}/{g}" if n in gpus else n for n in record["nodes"] for g in gpus.get(n, [n])]


def _functions_table(functions: list[dict[str, Any]]) -> Table:
    t = _table("functions", "name", "tenant", "model", "instances", "MiB")
    for r in functions:
        model = r["spec"]["model"]
        t.add_row(
            r["spec"]["name"],
            r["spec"]["tenant"],
            model.get("builtin")
            or model.get("path")
            or f"upload {(model.get('upload') or '')[:12]}",
            ", ".join(placed_on(r)),
            f"{r['model_bytes'] / 2**20:.1f}",
        )
    return t


@app.command()
def delete(
    name: Annotated[str, typer.Argument()], url: GatewayUrl = DEFAULT_URL, api_key: ApiKey = None
) -> None:
    """Delete a function."""
    _api(f"{url}/v1/functions/{name}", "DELETE", api_key=api_key)
    console.print(f"deleted {name}")


@app.command()
def events(
    kinds: Annotated[str, typer.Option(help="event kinds, e.g. 'function.*'")] = ">",
    replay: Annotated[str, typer.Option(help="all | new | last")] = "new",
    url: GatewayUrl = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Follow the platform's events (relayed from the JetStream EVENTS stream)."""
    from urllib.parse import urlencode  # noqa: PLC0415

    try:
        for kind, data in sse(
            f"{url}/v1/events?{urlencode({'kinds': kinds, 'replay': replay})}", find_key(api_key)
        ):
            ev = json.loads(data)
            console.print(
                f"[cyan]{kind}[/cyan] [dim]{ev.get('source')}[/dim] {json.dumps(ev.get('data'))}",
                highlight=False,
            )
    except KeyboardInterrupt:
        pass
    except ApiError as exc:
        raise _api_fail(exc) from None
    except OSError as exc:
        raise _fail(f"cannot follow events from {url}: {exc}") from None


models_app = typer.Typer(help="Models uploaded with `gpufaas deploy NAME --path DIR`.")
app.add_typer(models_app, name="models")


@models_app.command("list")
def models_list(url: GatewayUrl = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """This tenant's uploaded models and its quota."""
    held = _api(f"{url}/v1/models", api_key=api_key)
    table = Table(title="Uploaded models")
    table.add_column("model", no_wrap=True, min_width=64)  # the whole id: deploy names it
    for col in ("MiB", "files", "uploaded"):
        table.add_column(col)
    for m in held["models"]:
        when = datetime.datetime.fromtimestamp(m["created_at"]).strftime("%Y-%m-%d %H:%M")
        table.add_row(m["model"], f"{m['bytes'] / 2**20:.1f}", str(len(m["files"])), when)
    console.print(table)
    console.print(
        f"{held['used_bytes'] / 2**20:.1f} MiB of {held['quota_bytes'] / 2**20:.0f} MiB used"
    )


@models_app.command("delete")
def models_delete(
    model: Annotated[str, typer.Argument(help="the model's id (as `models list` shows it)")],
    url: GatewayUrl = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Delete an uploaded model (refused while a function is deployed from it)."""
    _api(f"{url}/v1/models/{model}", "DELETE", api_key=api_key)
    console.print(f"[green]deleted[/green] model {model}")


workflow_app = typer.Typer(
    help="Workflows: DAGs of functions exchanging tube ids.", no_args_is_help=True
)
app.add_typer(workflow_app, name="workflow")


@workflow_app.command("deploy")
def workflow_deploy(
    file: Annotated[Path, typer.Argument(help="a JSON file: {name, steps, outputs, slo_ms}")],
    url: GatewayUrl = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Deploy a workflow from a JSON definition (see the README)."""
    try:
        body = json.loads(file.read_text())
        rec = call(f"{url}/v1/workflows", "POST", body, key=find_key(api_key))
    except (OSError, ValueError) as exc:
        raise _fail(f"cannot read {file}: {exc}") from None
    except ApiError as exc:
        raise _api_fail(exc) from None
    console.print(
        f"[green]deployed[/green] workflow {rec['spec']['name']}: {' -> '.join(rec['order'])}"
    )


@workflow_app.command("invoke")
def workflow_invoke(
    name: Annotated[str, typer.Argument(help="workflow name")],
    texts: Annotated[list[str], typer.Argument(help="the workflow's text input")],
    input_name: Annotated[str, typer.Option("--input", help="its input's name")] = "text",
    url: GatewayUrl = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Run a workflow whose input is text; prints its outputs and where each step ran."""
    body = {
        "inputs": [{"name": input_name, "datatype": "BYTES", "shape": [len(texts)], "data": texts}]
    }
    res = _api(f"{url}/v1/workflows/{name}/infer", "POST", body, api_key=api_key)
    for out in res["outputs"]:
        console.print(f"{out['name']} {out['datatype']} {out['shape']}: {out['data'][:6]}")
    for step in res["parameters"]["steps"]:
        console.print(
            f"[dim]{step['step']}: {step['function']} on {step['node']} "
            f"{step['device']}, outputs on {', '.join(step['output_tiers'])}, "
            f"runs {step['runs']}[/dim]"
        )


@workflow_app.command("list")
def workflow_list(url: GatewayUrl = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """List the workflows."""
    res = _api(f"{url}/v1/workflows", api_key=api_key)
    for w in res["workflows"]:
        console.print(f"{w['spec']['name']}: {' -> '.join(w['order'])}")


@workflow_app.command("delete")
def workflow_delete(
    name: Annotated[str, typer.Argument()], url: GatewayUrl = DEFAULT_URL, api_key: ApiKey = None
) -> None:
    """Delete a workflow."""
    _api(f"{url}/v1/workflows/{name}", "DELETE", api_key=api_key)
    console.print(f"deleted workflow {name}")


keys_app = typer.Typer(
    help="API keys (admin keys only): create, list, revoke.", no_args_is_help=True
)
app.add_typer(keys_app, name="keys")

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """``30d``, ``12h``, ``15m``, ``90s`` or plain seconds, as seconds (> 0)."""
    number, unit = (text[:-1], text[-1]) if text and text[-1] in _UNITS else (text, "s")
    try:
        seconds = float(number) * _UNITS[unit]
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a duration like 30d, 12h, 15m") from None
    if seconds <= 0:
        raise typer.BadParameter("a duration must be positive")
    return seconds


@keys_app.command("bootstrap")
def keys_bootstrap(
    data_dir: Annotated[
        Path, typer.Option(envvar="GPUFAAS_DATA_DIR", help="where the key file is kept")
    ] = default_data_dir(),
) -> None:
    """The first admin key of a platform not started by `gpufaas up` (compose, Kubernetes):
    made in the keys bucket with this process's NATS identity (GPUFAAS_NATS_* settings; run
    it where a gateway runs, e.g. `docker compose exec gateway gpufaas keys bootstrap`),
    kept in DATA_DIR/admin.key (0600) and printed. A valid key already there is printed
    again; run it again after revoking that key to get a new one."""
    from gpufaas.admin_key import admin_key, key_path  # noqa: PLC0415 (NATS only here)
    from gpufaas.shared.errors import PlatformError  # noqa: PLC0415

    try:
        key, created = admin_key(Config.from_env(), data_dir)
    except (PlatformError, OSError) as exc:
        raise _fail(f"cannot make the admin key: {exc}") from None
    made = "created" if created else "kept"
    console.print(f"[green]{made}[/green] admin key in {key_path(data_dir)} (mode 0600)")
    print(key)  # alone on its line, for scripts


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="the tenant the key acts as")],
    admin: Annotated[bool, typer.Option(help="an admin key (any tenant, keys, paths)")] = False,
    expires: Annotated[
        str | None, typer.Option(help="lifetime, e.g. 30d, 12h (default: never expires)")
    ] = None,
    label: Annotated[str, typer.Option(help="a note shown by `keys list`")] = "",
    url: GatewayUrl = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Create an API key; it is printed once and stored only as a hash."""
    body: dict[str, Any] = {"tenant": tenant, "admin": admin, "label": label}
    if expires is not None:
        body["expires_in_s"] = parse_duration(expires)
    res = _api(f"{url}/v1/keys", "POST", body, api_key=api_key)
    kind = "admin key" if res["admin"] else "key"
    console.print(f"[green]created[/green] {kind} {res['id']} for tenant {res['tenant']}")
    console.print("  (shown once; it cannot be read back)", style="dim")
    print(res["key"])  # alone on its line, for scripts


@keys_app.command("list")
def keys_list(
    tenant: Annotated[str | None, typer.Option(help="only this tenant's keys")] = None,
    url: GatewayUrl = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """List API keys (never their secrets)."""
    from urllib.parse import urlencode  # noqa: PLC0415

    query = f"?{urlencode({'tenant': tenant})}" if tenant else ""
    keys = _api(f"{url}/v1/keys{query}", api_key=api_key)["keys"]
    t = _table("API keys", "id", "tenant", "admin", "label", "created", "expires", "revoked")
    for k in keys:
        t.add_row(
            k["id"],
            k["tenant"],
            "yes" if k["admin"] else "",
            k["label"],
            _when(k["created_at"]),
            _when(k["expires_at"]),
            _when(k["revoked_at"]),
        )
    console.print(t)


def _when(at: float | None) -> str:
    if at is None:
        return ""
    return datetime.datetime.fromtimestamp(at).isoformat(sep=" ", timespec="minutes")


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(metavar="ID", help="the key's id (`keys list`)")],
    url: GatewayUrl = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Revoke an API key: every gateway refuses it within a second."""
    _api(f"{url}/v1/keys/{key_id}", "DELETE", api_key=api_key)
    console.print(f"revoked {key_id}")


def main() -> None:
    app()
