"""Defaults and fixed names shared by every service, kept in one place."""

from __future__ import annotations

from typing import Final

API_VERSION: Final = "v1"
SUBJECT_ROOT: Final = "gpufaas"

# Queue group in which scheduler replicas share cluster-wide requests.
SCHEDULER_QUEUE: Final = "scheduler"

# JetStream names.
EVENTS_STREAM: Final = "EVENTS"
KV_FUNCTIONS: Final = "gpufaas_functions"
KV_NODES: Final = "gpufaas_nodes"
KV_TUBES: Final = "gpufaas_tubes"
KV_TENSORS: Final = "gpufaas_tensors"
KV_MEMORY: Final = "gpufaas_memory"  # each node's pools: segments and allocations
KV_PROFILES: Final = "gpufaas_profiles"  # per function: measured configurations, DTS choice
KV_WORKFLOWS: Final = "gpufaas_workflows"
KV_INFLIGHT: Final = "gpufaas_inflight"  # invocations a scheduler replica has accepted
KV_INFLIGHT_MAX_AGE_S: Final = 3600.0  # records and markers older than this lapse
KV_REPLICAS: Final = "gpufaas_replicas"  # scheduler replicas that ever ran (until cleaned up)
KV_KEYS: Final = "gpufaas_keys"  # API keys by id: tenant, admin, keyed hash (shared/apikeys.py)
KV_LEASES: Final = "gpufaas_leases"  # short-lived ownership (the autoscaling leader), TTL
SCHEDULER_LEADER_KEY: Final = "scheduler-leader"
DEFAULT_AUTOSCALE_INTERVAL_S: Final = 1.0
DEFAULT_INSTANCE_KEEP_ALIVE_S: Final = 120.0  # an idle function scales to zero after this
DEFAULT_PROFILE_S: Final = 10.0  # background profiling budget per deploy; 0 = off

# Headers carried on NATS messages.
HDR_REQUEST_ID: Final = "Gpufaas-Request-Id"
HDR_ERROR_CODE: Final = "Gpufaas-Error-Code"
HDR_ERROR_MESSAGE: Final = "Gpufaas-Error-Message"
HDR_MSG_ID: Final = "Nats-Msg-Id"  # JetStream de-duplication

# Defaults (all overridable through GPUFAAS_* environment variables, see config.py).
DEFAULT_NATS_URL: Final = "nats://127.0.0.1:4222"
DEFAULT_HTTP_HOST: Final = "127.0.0.1"
DEFAULT_HTTP_PORT: Final = 8080
DEFAULT_GRPC_PORT: Final = 8081  # the gateway's gRPC (KServe v2) port; 0 = none
DEFAULT_NATS_PORT: Final = 4222
DEFAULT_INLINE_THRESHOLD: Final = 64 * 1024
DEFAULT_MAX_BODY_BYTES: Final = 64 * 1024 * 1024
# Uploaded models (POST /v1/models): one archive at most, and all of a tenant's together.
DEFAULT_MAX_MODEL_BYTES: Final = 4 * 1024**3
DEFAULT_MODEL_QUOTA_BYTES: Final = 16 * 1024**3
KV_MODELS: Final = "gpufaas_models"  # uploaded models: <tenant>.<id> -> ModelUpload (gateway)
MODELS_OBJECT_BUCKET: Final = "models"  # their archives, as objects <tenant>/<id>
TUBES_OBJECT_BUCKET: Final = "tubes"  # the object tier of tubes: durable, read from every node
OBJECT_NODE: Final = "*"  # the node of an object-tier placement (it belongs to none)
DEFAULT_REQUEST_TIMEOUT_S: Final = 30.0
DEFAULT_DEPLOY_TIMEOUT_S: Final = 120.0
DEFAULT_HEARTBEAT_S: Final = 2.0
DEFAULT_NODE_TTL_S: Final = 10.0
DEFAULT_SHUTDOWN_DEADLINE_S: Final = 10.0
DEFAULT_CONNECT_DEADLINE_S: Final = 30.0
DEFAULT_NATS_REPLICAS: Final = 3  # JetStream replicas, capped by the cluster's size
DEFAULT_TUBE_TTL_S: Final = 600.0
DEFAULT_MEMORY_SEGMENT_BYTES: Final = 256 << 20
DEFAULT_TENSOR_KEEP_ALIVE_S: Final = 300.0
DEFAULT_RECLAIM_INTERVAL_S: Final = 5.0
DEFAULT_TENANT: Final = "default"
DEFAULT_WORKER_SPARES: Final = 1
DEFAULT_WORKER_IDLE_S: Final = 300.0
DEFAULT_BATCH_WAIT_S: Final = 0.002  # how long an idle device waits to fill a batch
DEFAULT_DIRECT_ROUTE_TTL_S: Final = 1.0  # a gateway's direct route to a warm worker lasts
# Batches one device may run at once (across instances); 0 = by backend: 2 on a CUDA GPU
# (kernels of two streams overlap), 1 where compute is on the CPU (cpu, sim:N): torch
# already spreads one batch over every core, and two at once only contend.
DEFAULT_DEVICE_STREAMS: Final = 0
CUDA_DEVICE_STREAMS: Final = 2
EVENTS_MAX_AGE_S: Final = 7 * 24 * 3600.0

# JetStream's limits, by stream (KV_<bucket>, OBJ_<object bucket>, EVENTS): bytes each may
# hold (GPUFAAS_JETSTREAM_MAX_BYTES, JSON {"<stream>": bytes}, overrides some). A full
# bucket refuses new writes (507); EVENTS and the inflight bucket (whose oldest entries are
# delete markers of answered requests) drop their oldest instead. The server reserves
# their sum (times replicas) of its disk at creation.
_MIB: Final = 1 << 20
DEFAULT_STREAM_MAX_BYTES: Final[dict[str, int]] = {
    f"KV_{KV_FUNCTIONS}": 64 * _MIB,
    f"KV_{KV_NODES}": 16 * _MIB,
    f"KV_{KV_TUBES}": 256 * _MIB,
    f"KV_{KV_TENSORS}": 64 * _MIB,
    f"KV_{KV_MEMORY}": 64 * _MIB,
    f"KV_{KV_PROFILES}": 64 * _MIB,
    f"KV_{KV_WORKFLOWS}": 64 * _MIB,
    f"KV_{KV_LEASES}": 16 * _MIB,
    f"KV_{KV_INFLIGHT}": 512 * _MIB,
    f"KV_{KV_REPLICAS}": 16 * _MIB,
    f"KV_{KV_KEYS}": 64 * _MIB,
    f"KV_{KV_MODELS}": 64 * _MIB,
    EVENTS_STREAM: 1024 * _MIB,
    "OBJ_tubes": 1024 * _MIB,  # tubes spilled to the object tier (they lapse with the TTL)
    f"OBJ_{MODELS_OBJECT_BUCKET}": 4096 * _MIB,  # uploaded models' archives
}
# Staging files (``.<name>.<pid>.<hex>.tmp``) of copies that crashed are removed once older
# than this and their writer is gone, or once older than STAGING_MAX_AGE_S regardless.
STAGING_GRACE_S: Final = 300.0
STAGING_MAX_AGE_S: Final = 6 * 3600.0

# Admission control (GPUFAAS_* overrides; per tenant with GPUFAAS_TENANT_LIMITS JSON).
DEFAULT_MAX_QUEUED: Final = 256  # requests waiting in one function's queue per scheduler
DEFAULT_TENANT_MAX_INFLIGHT: Final = 1024  # a tenant's requests in a gateway at once
DEFAULT_TENANT_RATE: Final = 10_000.0  # a tenant's requests per second per gateway (refill)
DEFAULT_TENANT_BURST: Final = 20_000  # ... and its bucket's size
DEFAULT_TENANT_MAX_STREAMS: Final = 16  # a tenant's open /v1/events connections per gateway
DEFAULT_EVENTS_REPLAY_MAX: Final = 1000  # events ?replay=all sends at most (the latest)
# Quotas per tenant, enforced by the scheduler at deploy (per tenant: GPUFAAS_TENANT_LIMITS).
DEFAULT_TENANT_MAX_FUNCTIONS: Final = 100  # functions one tenant may have deployed
DEFAULT_TENANT_GPU_MEMORY_BYTES: Final = 0  # its instances' model bytes; 0: no quota
DEFAULT_MAX_ROWS: Final = 1024  # rows (first dimension) per input, per function option
RETRY_AFTER_DEFAULT_S: Final = 1.0  # Retry-After when no drain rate is known
RETRY_AFTER_MAX_S: Final = 60.0
# How long past a request's deadline the scheduler keeps its instance slot while the
# worker may still be computing it (then the worker is presumed gone).
WORKER_ANSWER_GRACE_S: Final = 5.0
# A workflow step's inputs on a node without an instance of its function: what the
# scheduler assumes, until it has measured them, for copying them to another node and for
# a cold start on theirs (scheduler/workflows.py weighs one against the other).
WORKFLOW_LINK_BYTES_PER_S: Final = 200e6
WORKFLOW_COLD_START_S: Final = 0.25

# NATS server settings written into the generated config of the embedded server.
NATS_MAX_PAYLOAD: Final = 8 * 1024 * 1024
NATS_MAX_PENDING: Final = 64 * 1024 * 1024

# Alignment of tensors inside shared-memory segments (cache line, and enough for any dtype).
SEGMENT_ALIGN: Final = 64

# Names of node-local and cluster services, used in subjects and heartbeats.
NODE_SERVICES: Final = ("memory", "tensorstore", "transfer", "worker")  # started in order
CLUSTER_SERVICES: Final = ("scheduler", "gateway")
