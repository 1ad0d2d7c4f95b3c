"""Frozen configuration, built once from ``GPUFAAS_*`` environment variables."""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import platformdirs

from gpufaas.shared import constants as c
from gpufaas.shared.errors import InvalidArgument

PREFIX = "GPUFAAS_"


def default_shm_dir() -> Path:
    """Per-user directory for host shared-memory segments."""
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(platformdirs.user_runtime_dir())
    return base / f"gpufaas-{os.getuid()}"


def default_data_dir() -> Path:
    """Per-user directory for durable state (the embedded NATS server's JetStream store)."""
    return Path(platformdirs.user_data_dir("gpufaas"))


def _safe_hostname() -> str:
    host = socket.gethostname().split(".")[0] or "node"
    return "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in host)


@dataclass(frozen=True, slots=True)
class Config:
    """Settings of one process; every field maps to ``GPUFAAS_<FIELD>``."""

    nats_url: str = c.DEFAULT_NATS_URL
    # This process's NATS identity (shared/nats_auth.py): a user and a file holding its
    # password (0600; never the password itself in the environment); none: anonymous.
    nats_user: str = ""
    nats_password_file: str = ""
    # TLS to NATS: the CA that signed the servers' certificates (and a client certificate).
    nats_tls_ca: str = ""
    nats_tls_cert: str = ""
    nats_tls_key: str = ""
    # The identity the worker pool manager gives the worker processes it starts.
    worker_nats_user: str = ""
    worker_nats_password_file: str = ""
    node_id: str = dataclasses.field(default_factory=_safe_hostname)
    http_host: str = c.DEFAULT_HTTP_HOST
    http_port: int = c.DEFAULT_HTTP_PORT
    # Gateway: the Open Inference Protocol over gRPC, on http_host (0: not served).
    grpc_port: int = c.DEFAULT_GRPC_PORT
    # Gateway: API keys on every route but liveness and readiness (off: the tenant header
    # is trusted, for local experiments only); /metrics open to anyone who can reach it
    # (for a scraper on a private network) instead of admin keys only.
    auth: bool = True
    metrics_public: bool = False
    # Directories (absolute, os.pathsep-separated) under which admin keys may deploy
    # server paths (model.path); empty: no server path is accepted.
    model_roots: tuple[str, ...] = ()
    devices: str = "auto"  # auto | cpu | sim:N
    topology: str = ""  # topology file for sim:N; empty = the packaged default
    shm_dir: Path = dataclasses.field(default_factory=default_shm_dir)
    data_dir: Path = dataclasses.field(default_factory=default_data_dir)
    inline_threshold: int = c.DEFAULT_INLINE_THRESHOLD
    max_body_bytes: int = c.DEFAULT_MAX_BODY_BYTES
    # Admission control: requests waiting per function in a scheduler (429 beyond); per
    # tenant in a gateway: requests at once, a token bucket (rate per second, burst) and
    # open event streams; tenant_limits: JSON {"<tenant>": {"max_inflight": n, "rate": r,
    # "burst": b, "max_streams": s}} overriding those for some tenants. ?replay=all of
    # /v1/events sends at most the latest events_replay_max events.
    max_queued: int = c.DEFAULT_MAX_QUEUED
    tenant_max_inflight: int = c.DEFAULT_TENANT_MAX_INFLIGHT
    tenant_rate: float = c.DEFAULT_TENANT_RATE
    tenant_burst: int = c.DEFAULT_TENANT_BURST
    tenant_max_streams: int = c.DEFAULT_TENANT_MAX_STREAMS
    tenant_limits: str = ""
    events_replay_max: int = c.DEFAULT_EVENTS_REPLAY_MAX
    # Quotas per tenant (the scheduler, at deploy and scale-out; ``shared/quotas.py``):
    # functions deployed, and the model bytes of its functions' instances (0: no quota);
    # tenant_limits overrides them too ("max_functions", "gpu_memory_bytes").
    tenant_max_functions: int = c.DEFAULT_TENANT_MAX_FUNCTIONS
    tenant_gpu_memory_bytes: int = c.DEFAULT_TENANT_GPU_MEMORY_BYTES
    # Uploaded models: the largest archive, and the bytes one tenant's uploads may hold.
    max_model_bytes: int = c.DEFAULT_MAX_MODEL_BYTES
    model_quota_bytes: int = c.DEFAULT_MODEL_QUOTA_BYTES
    request_timeout_s: float = c.DEFAULT_REQUEST_TIMEOUT_S
    deploy_timeout_s: float = c.DEFAULT_DEPLOY_TIMEOUT_S
    heartbeat_s: float = c.DEFAULT_HEARTBEAT_S
    node_ttl_s: float = c.DEFAULT_NODE_TTL_S
    shutdown_deadline_s: float = c.DEFAULT_SHUTDOWN_DEADLINE_S
    connect_deadline_s: float = c.DEFAULT_CONNECT_DEADLINE_S
    # Replicas of every JetStream bucket, object store and stream (capped by the number
    # of servers in the NATS cluster: a single server gets 1).
    nats_replicas: int = c.DEFAULT_NATS_REPLICAS
    tube_ttl_s: float = c.DEFAULT_TUBE_TTL_S
    # JSON {"<stream>": bytes} over c.DEFAULT_STREAM_MAX_BYTES (KV_<bucket>, OBJ_<bucket>, EVENTS).
    jetstream_max_bytes: str = ""
    # Tensor store: unreferenced tensors are kept this long, then freed; under capacity
    # pressure (host_tensor_bytes, 0 = no limit) the least recently used go first.
    tensor_keep_alive_s: float = c.DEFAULT_TENSOR_KEEP_ALIVE_S
    reclaim_interval_s: float = c.DEFAULT_RECLAIM_INTERVAL_S
    host_tensor_bytes: int = 0
    # Memory service: a real GPU's pool grows by cudaMalloc'd segments of this size (or
    # the request, if larger), each shared by CUDA IPC handle.
    memory_segment_bytes: int = c.DEFAULT_MEMORY_SEGMENT_BYTES
    # Memory service: the host tier's pool, where GPUs swap out what has no host copy
    # (/dev/shm files of 64 MiB). 0: a quarter of the host's memory, at most half of the
    # shared-memory file system.
    host_pool_bytes: int = 0
    # Worker: dynamic batching. An idle device waits up to batch_wait_s for a batch to
    # fill (never past a request's slack); device_streams batches may run at once (0: by
    # backend, see constants).
    # Worker processes: "shared" (one process serves every tenant: tests, development),
    # "pool" (the node's pool manager: a process per tenant, from warm spares), "spare"
    # (a warm process waiting to be bound), "tenant" (bound to worker_tenant at start).
    worker_role: str = "shared"
    worker_tenant: str = ""
    worker_spare_id: str = ""
    worker_spares: int = c.DEFAULT_WORKER_SPARES  # ready spares per device the pool keeps
    worker_idle_s: float = c.DEFAULT_WORKER_IDLE_S  # a tenant's process with no instance exits
    # At most this many worker processes on a node, spares included (0: as many as its
    # memory holds, ``gpufaas.worker.pool.process_cap``); one per tenant by design.
    max_worker_processes: int = 0
    batch_wait_s: float = c.DEFAULT_BATCH_WAIT_S
    # Gateway: it runs on a node's machine and shares its shared memory (gpufaas up,
    # compose): big tensors are host tubes there. Off (Kubernetes: gateways anywhere): big
    # inputs go to the object tier and big outputs are fetched from their node.
    gateway_local_shm: bool = True
    # Scheduler: how long a gateway may send a warm function's requests straight to its
    # worker before asking a scheduler again (a direct route; 0: every request through a
    # scheduler).
    direct_route_ttl_s: float = c.DEFAULT_DIRECT_ROUTE_TTL_S
    device_streams: int = c.DEFAULT_DEVICE_STREAMS
    # Scheduler: autoscaling tick, scale to zero after instance_keep_alive_s idle, and the
    # device time a deploy's background profile may take (0: batch-1 point only).
    autoscale_interval_s: float = c.DEFAULT_AUTOSCALE_INTERVAL_S
    instance_keep_alive_s: float = c.DEFAULT_INSTANCE_KEEP_ALIVE_S
    max_instances: int = 8
    profile_s: float = c.DEFAULT_PROFILE_S
    log_format: str = "auto"  # auto | console | json
    log_level: str = "info"
    ready_file: str = ""  # touched once the service is ready (used by `gpufaas up`)

    @classmethod
    def from_env(cls, prefix: str = PREFIX, environ: Mapping[str, str] | None = None) -> Config:
        """Build from the environment; a malformed value raises ``InvalidArgument`` naming it."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            key = prefix + f.name.upper()
            if key not in env:
                continue
            values[f.name] = _parse(key, env[key], f.type)
        return cls(**values)

    def to_env(self, prefix: str = PREFIX) -> dict[str, str]:
        """The environment that reproduces this config in a child process."""
        return {
            prefix + f.name.upper(): _format(getattr(self, f.name))
            for f in dataclasses.fields(self)
        }

    def replace(self, **changes: Any) -> Config:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def _format(value: Any) -> str:
    """A field's value as its environment variable spells it (``_parse`` reads it back)."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, tuple):
        return os.pathsep.join(value)
    return str(value)


def _parse(key: str, raw: str, typ: Any) -> Any:
    name = typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))
    if name == "bool":
        if raw.strip().lower() not in _TRUE + _FALSE:
            raise InvalidArgument(f"{key}={raw!r} is not a boolean (1 or 0)", field=key)
        return raw.strip().lower() in _TRUE
    if name.startswith("tuple"):
        return tuple(p for p in raw.split(os.pathsep) if p)
    try:
        if name == "int":
            return int(raw)
        if name == "float":
            return float(raw)
        if name == "Path":
            return Path(raw).expanduser()
    except ValueError:
        raise InvalidArgument(f"{key}={raw!r} is not a valid {name}", field=key) from None
    return raw
