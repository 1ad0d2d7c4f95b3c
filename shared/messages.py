"""Typed, versioned messages exchanged over NATS.

Every struct is frozen, rejects unknown fields and carries a ``type`` tag with its
version (``deploy_request.v1``). Control messages travel as msgpack; events as JSON
so that any client can read the stream. Bulk bytes travel in tubes, not here.
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Any, Final, Literal, TypeVar

import msgspec

from gpufaas.shared.constants import DEFAULT_MAX_ROWS, DEFAULT_TENANT
from gpufaas.shared.errors import InvalidArgument

# Every pattern ends in (?!\n)$, not $: Python's $ (msgspec checks with Python's re) also
# matches before a trailing newline, so "name\n" would pass and reach a KV key or a
# subject. (?!\n)$ refuses it, and means the same in JSON Schema's (ECMA) regexes.
NAME_PATTERN: Final = r"^[a-z0-9][a-z0-9_-]{0,62}(?!\n)$"
Name = Annotated[str, msgspec.Meta(pattern=NAME_PATTERN, description="lower-case name, 1-63 chars")]
Tenant = Annotated[str, msgspec.Meta(pattern=NAME_PATTERN)]
Dim = Annotated[int, msgspec.Meta(ge=-1)]
Count = Annotated[int, msgspec.Meta(ge=0)]

# --- what ids, names, sizes and paths from NATS or KV may be (checked on decode) ---------
MAX_BYTES: Final = 1 << 50  # every size and offset read from the wire is at most 1 PiB
Bytes = Annotated[int, msgspec.Meta(ge=0, le=MAX_BYTES)]
# A tube's id is what ``shm.new_id()`` makes: ``secrets.token_urlsafe(18)``, 24 characters.
TUBE_ID_PATTERN: Final = r"^[A-Za-z0-9_-]{24}(?!\n)$"
TubeId = Annotated[str, msgspec.Meta(pattern=TUBE_ID_PATTERN, description="a tube id")]
_NODE: Final = r"[A-Za-z0-9_-]{1,128}"  # one subject token
NODE_PATTERN: Final = rf"^{_NODE}(?!\n)$"
NodeId = Annotated[str, msgspec.Meta(pattern=NODE_PATTERN, description="a node id")]
# The ids of segments a service made (``new_id``), named in replies and records.
SEGMENT_ID_PATTERN: Final = r"^[A-Za-z0-9_-]{0,64}(?!\n)$"
SegmentId = Annotated[str, msgspec.Meta(pattern=SEGMENT_ID_PATTERN)]
_TUBE: Final = r"[A-Za-z0-9_-]{24}"
# Where a tube's copy lies (docs/architecture.md, the shared-memory table): ``tubes/<id>``,
# ``tubes/<node>/<id>``, ``gpu/<node>/gpuN/<id>.<block>``, ``hostpool/<node>/<segment>``; a
# real GPU's ``ipc:<handle>``; the object tier's ``<id>``. Never absolute, never ``..``.
TUBE_SEGMENT_PATTERN: Final = (
    rf"^(tubes/({_NODE}/)?{_TUBE}|gpu/{_NODE}/gpu[0-9]{{1,4}}/{_TUBE}\.[0-9]{{1,12}}"
    rf"|hostpool/{_NODE}/[A-Za-z0-9_-]{{1,64}}|ipc:[0-9a-f]{{2,1024}}|{_TUBE})(?!\n)$"
)
TubeSegment = Annotated[str, msgspec.Meta(pattern=TUBE_SEGMENT_PATTERN)]
# A weight segment of a node's tensor store, and an exported program's graph beside it.
TENSOR_SEGMENT_PATTERN: Final = rf"^tensors/{_NODE}/[A-Za-z0-9_-]{{1,64}}(?!\n)$"
PROGRAM_PATTERN: Final = rf"^tensors/{_NODE}/models/[0-9a-f]{{1,64}}\.program(?!\n)$"
TensorId = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}(?!\n)$")]  # blake3, hex
# An uploaded model: the SHA-256 of its archive, hex (shared/uploads.py).
UPLOAD_ID_PATTERN: Final = r"^[0-9a-f]{64}(?!\n)$"
UploadId = Annotated[
    str, msgspec.Meta(pattern=UPLOAD_ID_PATTERN, description="an uploaded model's id")
]
TorchDtype = Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_]{0,31}(?!\n)$")]
DeviceName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_:-]{1,64}(?!\n)$")]
# One GPU of a node, as devices and tiers name it: "gpu:0", "gpu:1", ...
GpuName = Annotated[str, msgspec.Meta(pattern=r"^gpu:\d{1,3}(?!\n)$", description="a GPU")]

# KServe v2 datatypes.
Datatype = Literal[
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "BF16",
    "FP32",
    "FP64",
    "BYTES",
]

Tier = Annotated[str, msgspec.Meta(pattern=r"^(host|gpu:\d+|object)(?!\n)$")]


class Msg(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True, tag_field="type"):
    """Base of every message: frozen, strict, tagged with name and version."""


# --- tensors and tubes ---------------------------------------------------------------


class Placement(Msg, frozen=True, tag="placement.v1"):
    """Where a copy of a tube's bytes lives."""

    node: Annotated[str, msgspec.Meta(pattern=rf"^(\*|{_NODE})(?!\n)$")]  # "*": the object tier
    tier: Tier
    segment: TubeSegment
    offset: Bytes = 0


class Tube(Msg, frozen=True, tag="tube.v1"):
    """A reference to tensor bytes that live outside messages."""

    id: TubeId
    tenant: Tenant
    datatype: Datatype
    shape: Annotated[list[Dim], msgspec.Meta(max_length=64)]
    nbytes: Bytes
    placements: Annotated[list[Placement], msgspec.Meta(max_length=64)]
    created_at: float = 0.0


class TensorSpec(Msg, frozen=True, tag="tensor_spec.v1"):
    """Name, datatype and shape (``-1`` = any size) of a function input or output."""

    name: str
    datatype: Datatype
    shape: list[Dim]


class TensorPayload(Msg, frozen=True, tag="tensor.v1"):
    """A tensor in a request or reply: inline raw bytes, or a tube."""

    name: str
    datatype: Datatype
    shape: list[Count]
    data: bytes | None = None
    tube: Tube | None = None


class TensorRef(Msg, frozen=True, tag="tensor_ref.v1"):
    """A content-addressed tensor resident in a host segment of the tensor store."""

    id: TensorId
    dtype: TorchDtype  # torch dtype name, e.g. "float32"
    shape: Annotated[list[Count], msgspec.Meta(max_length=64)]
    nbytes: Bytes
    segment: Annotated[str, msgspec.Meta(pattern=TENSOR_SEGMENT_PATTERN)]
    offset: Bytes


# --- functions -----------------------------------------------------------------------


class ModelSource(Msg, frozen=True, tag="model_source.v1"):
    """Where a model's weights come from: a packaged model, a directory on the node, or
    an archive the tenant uploaded (``POST /v1/models``)."""

    builtin: str | None = None
    path: str | None = None
    upload: UploadId | None = None
    architecture: str = "bert-embedding"
    # The tenant's own tensors: shared among its functions only, invisible to others.
    private: bool = False


class FunctionOptions(Msg, frozen=True, tag="function_options.v1"):
    """Serving options of a function."""

    max_batch_size: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 32
    slo_ms: Annotated[float, msgspec.Meta(gt=0)] | None = None
    # Rows (first dimension) one request's input may have: more is 413 at the gateway.
    max_rows: Annotated[int, msgspec.Meta(ge=1, le=1 << 20)] = DEFAULT_MAX_ROWS


class FunctionSpec(Msg, frozen=True, tag="function_spec.v1"):
    """What a user deploys."""

    name: Name
    model: ModelSource
    options: FunctionOptions = msgspec.field(default_factory=FunctionOptions)
    tenant: Tenant = DEFAULT_TENANT


class FunctionRecord(Msg, frozen=True, tag="function.v1"):
    """A deployed function, as stored in the functions KV bucket."""

    spec: FunctionSpec
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    model_bytes: Count
    tensor_count: Count
    nodes: list[NodeId]
    created_at: float
    status: Literal["ready"] = "ready"
    # The GPUs of each node's instances (placement is per GPU), first the one a request
    # that finds none builds on; more than one: the function scaled out within the node.
    # A node not named here (no GPU, or a record from before) runs one on its first GPU.
    gpus: dict[NodeId, Annotated[list[GpuName], msgspec.Meta(min_length=1, max_length=64)]] = (
        msgspec.field(default_factory=dict)
    )
    # When a repository load or unload last set its instances: the autoscaler forgets the
    # activity before it (0: never).
    rescaled_at: float = 0.0


class DeployRequest(Msg, frozen=True, tag="deploy_request.v1"):
    spec: FunctionSpec


class DeployReply(Msg, frozen=True, tag="deploy_reply.v1"):
    function: FunctionRecord
    created: bool


class ScaleRequest(Msg, frozen=True, tag="scale_request.v1"):
    """The model repository's load (an instance now, if none) or unload (none) of a
    function; it stays deployed either way."""

    name: Name
    load: bool
    tenant: Tenant = DEFAULT_TENANT


class ScaleReply(Msg, frozen=True, tag="scale_reply.v1"):
    function: FunctionRecord


class DeleteRequest(Msg, frozen=True, tag="delete_request.v1"):
    name: Name
    tenant: Tenant = DEFAULT_TENANT


class DeleteReply(Msg, frozen=True, tag="delete_reply.v1"):
    name: str


# --- invocation ----------------------------------------------------------------------


class Breakdown(Msg, frozen=True, tag="breakdown.v1"):
    """Where an invocation spent its time, in microseconds."""

    queue_us: Count = 0
    transfer_us: Count = 0
    load_us: Count = 0
    compute_us: Count = 0
    total_us: Count = 0
    cold: bool = False
    batch: Count = 1  # requests computed together in the batch this one ran in
    worker_us: Count = 0  # waiting for a worker process for the tenant (inside queue_us)
    loaded_bytes: Count = 0  # a cold start's bytes the tensor store had to read (not resident)
    new_process: bool = False  # none was ready: one was started (the slow fall-back)


class InvokeRequest(Msg, frozen=True, tag="invoke_request.v1"):
    function: Name
    request_id: str
    inputs: list[TensorPayload]
    tenant: Tenant = DEFAULT_TENANT
    deadline: float = 0.0  # unix time; 0 = the platform default
    # Requests of this function the sending gateway ran on its direct route since its last
    # request through a scheduler (see Route): counted as arrivals for the autoscaler.
    direct: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] = 0


class Route(Msg, frozen=True, tag="route.v1"):
    """A scheduler's grant to a gateway: send this function's next requests straight to its
    warm instance on ``node`` (at most ``slots`` in flight from that gateway, for ``ttl_s``
    seconds), with the instance's batching configuration; the rest go through a scheduler.
    """

    node: NodeId
    slots: Annotated[int, msgspec.Meta(ge=1, le=4096)]
    ttl_s: Annotated[float, msgspec.Meta(gt=0, le=60)]
    max_batch: Annotated[int, msgspec.Meta(ge=1, le=4096)] | None = None
    concurrency: Annotated[int, msgspec.Meta(ge=1, le=64)] | None = None


class InvokeReply(Msg, frozen=True, tag="invoke_reply.v1"):
    function: str
    request_id: str
    outputs: list[TensorPayload]
    node: NodeId
    device: DeviceName
    breakdown: Breakdown
    route: Route | None = None  # a scheduler's reply to a gateway: the direct route to use


class WorkerLoadRequest(Msg, frozen=True, tag="worker_load_request.v1"):
    spec: FunctionSpec
    # The GPU the placement chose for the instance (None: the node's first GPU, or the
    # host on a node without one). The worker checks that the node has it.
    device: GpuName | None = None
    # Another instance on ``device`` besides those the worker has (a scale-out within the
    # node), instead of moving its instance there.
    replica: bool = False


class WorkerLoadReply(Msg, frozen=True, tag="worker_load_reply.v1"):
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    model_bytes: Count
    tensor_count: Count
    bytes_stored: Count
    bytes_deduplicated: Count
    load_us: Count
    cached: bool
    device: str


class WorkerBindRequest(Msg, frozen=True, tag="worker_bind_request.v1"):
    """Give ``tenant`` a worker process on this node (a warm spare, else a new process)."""

    tenant: Tenant


class WorkerBindReply(Msg, frozen=True, tag="worker_bind_reply.v1"):
    worker: str  # the process's id
    waited_us: Count  # how long the caller waited for it
    new_process: bool  # no spare was ready: a process was started for it


class Reconnected(Msg, frozen=True, tag="reconnected.v1"):
    """(A scheduler replica or a worker process, published once its NATS connection is
    back after a drop.) Requests sent to it meanwhile may be lost with the server that
    carried them: its callers send theirs again (each is answered once, see
    ``gpufaas.shared.rpc``). A worker says whose it is; a scheduler says nothing."""

    tenant: Tenant | None = None
    worker: Annotated[str, msgspec.Meta(max_length=64)] = ""


class WorkerRetireRequest(Msg, frozen=True, tag="worker_retire_request.v1"):
    """(A tenant's worker process, idle.) May it exit? The pool says yes only after it has
    stopped counting the process as the tenant's, so that no bind returns it from then on;
    the process serves until that answer (see ``gpufaas.worker.pool``)."""

    worker: str  # its id in the pool (GPUFAAS_WORKER_SPARE_ID)
    tenant: Tenant


class WorkerRetireReply(Msg, frozen=True, tag="worker_retire_reply.v1"):
    retire: bool  # false: a bind of its tenant is under way or has just returned it: stay


class WorkerProfileRequest(Msg, frozen=True, tag="worker_profile_request.v1"):
    """Measure an instance of ``spec`` at each batch size and concurrency (see profiling)."""

    spec: FunctionSpec
    batches: list[Annotated[int, msgspec.Meta(ge=1)]]
    concurrencies: list[Annotated[int, msgspec.Meta(ge=1)]] = msgspec.field(
        default_factory=lambda: [1]
    )
    repeats: Annotated[int, msgspec.Meta(ge=1, le=100)] = 3
    deadline_s: Annotated[float, msgspec.Meta(gt=0)] = 60.0


class ProfilePointMsg(Msg, frozen=True, tag="profile_point.v1"):
    batch: int
    concurrency: int
    latency_s: float
    memory_bytes: Count


class WorkerProfileReply(Msg, frozen=True, tag="worker_profile_reply.v1"):
    device: str
    points: list[ProfilePointMsg]


class ProfileRecord(Msg, frozen=True, tag="profile.v1"):
    """A function's profile and the configuration chosen from it, in the profiles bucket."""

    spec: FunctionSpec
    device: str
    points: list[ProfilePointMsg]
    batch: int  # the chosen configuration (Decreased Throughput Selection)
    concurrency: int
    reason: str
    complete: bool  # False: only the batch-1 point measured so far
    measured_at: float


class InflightRecord(Msg, frozen=True, tag="inflight.v1"):
    """An invocation a scheduler replica accepted, kept in KV until it is answered, so
    that another replica answers the caller (``reply_to``) if this one dies."""

    replica: str
    reply_to: str
    request: InvokeRequest
    dispatch_id: str
    accepted_at: float


class FunctionLoadReport(Msg, frozen=True, tag="function_load.v1"):
    """One function as one scheduler replica sees it."""

    function: str  # FunctionRef.key: tenant.name
    arrivals: Count  # since the replica's previous report
    queued: Count
    in_flight: Count


class SchedulerLoad(Msg, frozen=True, tag="scheduler_load.v1"):
    """A scheduler replica's load report, published each autoscaling tick."""

    replica: str
    at: float
    functions: list[FunctionLoadReport]


class QueuedTube(Msg, frozen=True, tag="queued_tube.v1"):
    """An input tube of a queued request that has a copy on the view's node (an item of the
    memory manager's policy: kept on, or brought back to, the GPU the request runs on)."""

    id: TubeId
    tenant: Tenant
    nbytes: Bytes
    position: Count  # which of the function's queued requests reads it (0: the next to run)
    running: bool = False  # read by a request already sent to the node: never to be evicted


class QueueEntry(Msg, frozen=True, tag="queue_entry.v1"):
    """What a function's requests will touch on a node: its model, queued and running, and
    the input tubes of its first queued requests that have a copy on that node."""

    function: str  # FunctionRef.key: tenant.name
    model: ModelSource
    queued: Count
    running: Count
    next_deadline: float | None = None
    # Seconds one request of it takes on the device, from its profile (a batch's time over
    # its size); None when not profiled yet.
    compute_s: Annotated[float, msgspec.Meta(ge=0)] | None = None
    tubes: list[QueuedTube] = []
    # The GPU its instance on that node is placed on (FunctionRecord.gpus): where its
    # model is brought before its requests run; None: where the model is, else the first.
    device: GpuName | None = None


class QueueView(Msg, frozen=True, tag="queue_view.v1"):
    """A scheduler replica's view of one node's work, for the node's memory manager."""

    replica: str
    node: NodeId
    at: float
    entries: list[QueueEntry]


class WorkerUnloadRequest(Msg, frozen=True, tag="worker_unload_request.v1"):
    function: Name
    tenant: Tenant = DEFAULT_TENANT
    device: GpuName | None = None  # only the instance on this GPU (a scale-in within a node)


class WorkerUnloadReply(Msg, frozen=True, tag="worker_unload_reply.v1"):
    unloaded: bool


class WorkerRunRequest(Msg, frozen=True, tag="worker_run_request.v1"):
    spec: FunctionSpec
    request_id: str
    inputs: list[TensorPayload]
    queue_us: Count = 0
    deadline: float = 0.0
    # The instance's configuration from its profile (DTS): rows per batch and batches in
    # flight at once. None: the spec's max_batch_size, one batch at a time.
    max_batch: Annotated[int, msgspec.Meta(ge=1)] | None = None
    concurrency: Annotated[int, msgspec.Meta(ge=1)] | None = None
    # One accepted invocation, however many times it is sent (a replica taking over a dead
    # one's requests sends it again): the worker runs it once and answers repeats alike.
    dispatch_id: str = ""
    # A workflow step whose outputs feed other steps: every output becomes a tube, kept on
    # the worker's GPU tier where it can be (a simulated GPU), else on the host tier.
    intermediate: bool = False
    # Sent by a gateway on its direct route (see Route): run only on an instance already
    # built here, else answer Unavailable (the gateway then goes through a scheduler).
    direct: bool = False
    # The GPU of the function's instance on this node (FunctionRecord.gpus): where the
    # instance is built should this request find none.
    device: GpuName | None = None


# --- node services -------------------------------------------------------------------


class RegisterRequest(Msg, frozen=True, tag="register_request.v1"):
    source: ModelSource
    tenant: Tenant = DEFAULT_TENANT
    lease: str | None = None  # take this lease on the model's tensors, atomically
    holder: str = ""  # who renews the lease (a worker process)
    device: str | None = None  # also place one copy of each tensor on this GPU ("gpu:0")


class LeaseClaim(Msg, frozen=True, tag="lease_claim.v1"):
    """One lease as a worker re-announces it: its id and every tensor it references."""

    id: str
    tensors: list[str]
    device: str | None = None  # the GPU whose copies the lease also holds


class RenewRequest(Msg, frozen=True, tag="renew_request.v1"):
    holder: str
    leases: list[LeaseClaim]


class RenewReply(Msg, frozen=True, tag="renew_reply.v1"):
    missing: list[str]  # tensors no longer stored (their leases hold the rest)
    lost: list[str] = []  # leases whose device copies are gone (a restarted store, real GPU)


class ReleaseRequest(Msg, frozen=True, tag="release_request.v1"):
    lease: str


class ReleaseReply(Msg, frozen=True, tag="release_reply.v1"):
    released: bool


class DeviceSegment(Msg, frozen=True, tag="device_segment.v1"):
    """Device copies of some tensors, in one allocation on a GPU opened by ``ipc_handle``.

    The copies lie from ``offset`` (their block in a segment of the memory service's
    pool; 0 in an allocation of their own) to ``nbytes`` from the allocation's start:
    map ``nbytes`` from the handle. Their ``DeviceRef`` offsets count from that start too.
    """

    id: SegmentId
    nbytes: Bytes
    device_index: Count = 0
    ipc_handle: bytes | None = None  # CUDA IPC handle; None on a simulated GPU
    offset: Bytes = 0


class DeviceRef(Msg, frozen=True, tag="device_ref.v1"):
    """Where one tensor's device copy lies: a segment, and a byte offset from the start of
    the allocation its handle opens (the block's offset included)."""

    segment: SegmentId
    offset: Bytes


class DevicePlacement(Msg, frozen=True, tag="device_placement.v1"):
    """A model's tensors on one GPU, as the tensor store placed them."""

    device: str
    refs: dict[str, DeviceRef]  # tensor id -> its copy
    segments: list[DeviceSegment]
    bytes_copied: Count  # bytes this registration copied to the GPU (0: all resident)
    used_bytes: Count  # the GPU's tier after the placement


class RegisterReply(Msg, frozen=True, tag="register_reply.v1"):
    model_dir: str
    manifest: dict[str, TensorRef]
    model_bytes: Count
    bytes_stored: Count
    bytes_deduplicated: Count
    register_us: Count
    file_read: bool = True  # False: every tensor was resident, the model file was not opened
    placement: DevicePlacement | None = None  # with ``device`` in the request
    # An exported program's graph, kept by the store (a path under the shm root).
    program: Annotated[str, msgspec.Meta(pattern=PROGRAM_PATTERN)] | None = None


class LocalityRequest(Msg, frozen=True, tag="locality_request.v1"):
    source: ModelSource
    tenant: Tenant = DEFAULT_TENANT


class LocalityReply(Msg, frozen=True, tag="locality_reply.v1"):
    """How much of a model is already resident on a node (the scheduler's θ)."""

    known: bool  # the store has a manifest for this model file (its own, or a peer's)
    model_bytes: Count
    resident_bytes: Count
    bytes_to_load: Count
    theta: float  # resident_bytes / model_bytes (0 when unknown)


class ModelManifest(Msg, frozen=True, tag="model_manifest.v1"):
    """A model file's tensors as the first store to read it found them (KV ``tensors``,
    key ``m.<model key>``): every node's store can then tell its θ for that file from its
    own index, without reading it (content-addressed ids are the same on every node)."""

    ids: dict[str, str]  # parameter -> tensor id
    sizes: dict[str, Count]  # tensor id -> bytes


class StoreStatsRequest(Msg, frozen=True, tag="store_stats_request.v1"):
    pass


class StoreStats(Msg, frozen=True, tag="store_stats.v1"):
    node: NodeId
    tensors: Count
    segments: Count
    bytes_stored: Count
    bytes_requested: Count
    leases: Count = 0
    bytes_referenced: Count = 0  # stored bytes some instance uses
    bytes_without_sharing: Count = 0  # what the leased instances would hold with private copies
    devices: list[DeviceTierStats] = []


class DeviceTierStats(Msg, frozen=True, tag="device_tier_stats.v1"):
    """The device tier of one GPU: copies held, and what private copies would take."""

    device: str
    capacity_bytes: Count
    tensors: Count
    segments: Count
    bytes_stored: Count
    leases: Count
    bytes_referenced: Count
    bytes_without_sharing: Count


class ModelQuery(Msg, frozen=True, tag="model_query.v1"):
    """A model a queued request will need, as the memory manager asks the store about it."""

    source: ModelSource
    tenant: Tenant = DEFAULT_TENANT  # the scope of a private model


class ModelItem(Msg, frozen=True, tag="model_item.v1"):
    """How the store names a model (its item for the memory manager) and its size."""

    item: str  # the store's key of the model file in its scope; "" when it cannot be found
    nbytes: Count  # its tensors' bytes, each once (an estimate, the file's size, if not known)
    known: bool  # the store has the model's manifest (else nbytes is the estimate)
    error: str | None = None  # why ``item`` is ""


class ResidentModel(Msg, frozen=True, tag="resident_model.v1"):
    """A model all of whose tensors have their copy on a GPU."""

    item: str
    nbytes: Count  # its tensors' bytes, each once
    last_used: float  # when its copies were last leased or placed (now while leased)
    leased: bool  # an instance holds the copies (or shares a segment with it): never evicted
    file: str = ""  # the model file, when registered since the store started
    tenant: str | None = None  # set for a tenant's private model


class DeviceResidency(Msg, frozen=True, tag="device_residency.v1"):
    """One GPU's device tier: its capacity, the bytes it holds and the models complete on it."""

    device: str
    capacity_bytes: Count
    used_bytes: Count
    models: list[ResidentModel]


class ResidencyRequest(Msg, frozen=True, tag="residency_request.v1"):
    models: list[ModelQuery] = []  # also resolve these to items (answered in order)


class ResidencyReply(Msg, frozen=True, tag="residency_reply.v1"):
    node: NodeId
    owner: str  # the store's owner of blocks in the memory service's pools
    devices: list[DeviceResidency]
    models: list[ModelItem] = []  # one per query, in order


class EvictModelRequest(Msg, frozen=True, tag="evict_model_request.v1"):
    """Drop a model's idle copies from a GPU (the host tier keeps its tensors)."""

    device: Tier
    item: str


class EvictModelReply(Msg, frozen=True, tag="evict_model_reply.v1"):
    evicted: bool
    nbytes: Count  # bytes freed on the GPU
    reason: str = ""  # why nothing was freed: "not resident" or "leased"


class PrefetchRequest(Msg, frozen=True, tag="prefetch_request.v1"):
    """Place a model's copies on a GPU ahead of a queued request, without a lease."""

    device: Tier
    source: ModelSource
    tenant: Tenant = DEFAULT_TENANT


class PrefetchReply(Msg, frozen=True, tag="prefetch_reply.v1"):
    item: str
    nbytes: Count  # the model's tensors' bytes, each once
    bytes_copied: Count  # 0: every copy was resident already
    used_bytes: Count  # the GPU's tier after the placement


class ResolveRequest(Msg, frozen=True, tag="resolve_request.v1"):
    tube_id: TubeId
    tenant: Tenant = DEFAULT_TENANT
    tier: Tier = "host"


class ResolveReply(Msg, frozen=True, tag="resolve_reply.v1"):
    tube: Tube
    path: str


class EnsureRequest(Msg, frozen=True, tag="ensure_request.v1"):
    """Make a tube resident on the serving node's ``tier`` (a no-op when it already is)."""

    tube_id: TubeId
    tenant: Tenant = DEFAULT_TENANT
    tier: Tier = "host"
    slo_ms: Annotated[float, msgspec.Meta(gt=0)] | None = None  # from now: when the caller needs it
    inference_ms: Annotated[float, msgspec.Meta(ge=0)] = 0.0  # work left after the copy


class EnsureReply(Msg, frozen=True, tag="ensure_reply.v1"):
    tube: Tube  # with the new placement
    placement: Placement  # the copy on the requested tier of this node
    path: str  # how the bytes came: "resident", "host(node-a)->host", "host->gpu:0 via 2 routes"
    nbytes: Count  # bytes copied (0 when already resident)
    duration_us: Count
    simulated: bool = False  # duration from the link model of simulated GPUs, not measured
    deadline_met: bool | None = None  # None: no SLO given
    at_risk: list[str] = []  # why the copy could not get the bandwidth its SLO needed


class AdoptRequest(Msg, frozen=True, tag="adopt_request.v1"):
    """Take a tube a worker of this node has just written as a file under ``tubes/`` onto
    ``tier`` (a simulated GPU: the file joins that GPU's memory, no bytes move), and
    record it in the tube directory. ``tube.placements`` names the written file."""

    tube: Tube
    tier: Tier


class AdoptReply(Msg, frozen=True, tag="adopt_reply.v1"):
    tube: Tube  # as recorded: its one placement on the tier


class TubeReleaseRequest(Msg, frozen=True, tag="tube_release_request.v1"):
    """(The memory manager, making room on a GPU.) Drop this node's copy of a tube on
    ``tier``, keeping its bytes on this node's host tier: copied there first when the node
    has no host copy (the swap). A platform verb: the tube is named by id alone."""

    tube_id: TubeId
    tier: Tier


class TubeReleaseReply(Msg, frozen=True, tag="tube_release_reply.v1"):
    released: bool
    nbytes: Count = 0  # the GPU bytes given back
    swapped_bytes: Count = 0  # bytes copied to the host tier first (0: a host copy existed)
    reason: str = ""  # why not released: "not resident", "copy in flight", "unknown tube"
    tenant: Tenant | None = None  # the released tube's (the memory.evicted event carries it)


class FetchRequest(Msg, frozen=True, tag="fetch_request.v1"):
    """One chunk of a tube's host copy, asked by another node's transfer service."""

    tube_id: TubeId
    tenant: Tenant
    offset: Bytes
    nbytes: Bytes


class FetchReply(Msg, frozen=True, tag="fetch_reply.v1"):
    data: bytes


class DeviceInfo(Msg, frozen=True, tag="device.v1"):
    """One device of a node: a real GPU, a simulated GPU or the host."""

    name: str  # "host", "gpu:0", ...
    kind: Literal["host", "cuda", "sim"]
    model: str
    memory_bytes: Count
    used_bytes: Count = 0


class LinkInfo(Msg, frozen=True, tag="link_info.v1"):
    """One link of a node's topology and the bytes it has carried each way (since its
    transfer service started; on simulated GPUs, the emulated copies' bytes)."""

    a: str  # "host", "gpu:0", ...
    b: str
    kind: str  # the topology's: pcie3, nvlink2, ...
    gbps: float  # per direction
    bytes_a_to_b: Count = 0
    bytes_b_to_a: Count = 0


class LinksRequest(Msg, frozen=True, tag="links_request.v1"):
    pass


class LinksReply(Msg, frozen=True, tag="links_reply.v1"):
    """A node's links (none without GPUs) and the topology they come from."""

    topology: str  # its name; "" without GPUs
    simulated: bool
    links: list[LinkInfo]


class CapacityRequest(Msg, frozen=True, tag="capacity_request.v1"):
    pass


class CapacityReply(Msg, frozen=True, tag="capacity_reply.v1"):
    node: NodeId
    devices: list[DeviceInfo]


class MemAllocRequest(Msg, frozen=True, tag="mem_alloc_request.v1"):
    """A block of device memory for ``owner`` (who renews it, see MemRenewRequest)."""

    device: Tier
    nbytes: Bytes
    owner: str
    # What the block holds, when the memory manager may move it: "tube:<id>" for a tube's
    # copy (evicted to the host tier through the transfer service). "" for anything else.
    item: str = ""
    swap_bytes: Count = 0  # what moving it to the host would copy (0: the host has them)


class MemAllocation(Msg, frozen=True, tag="mem_allocation.v1"):
    """A block: ``nbytes`` at ``offset`` in a segment of the device's pool."""

    id: Count
    device: str
    segment: SegmentId  # a host pool's file (hostpool/<node>/<segment>) or a GPU's
    offset: Bytes
    nbytes: Bytes
    owner: str
    # A real GPU's segment: its CUDA IPC handle (open it once, work at ``offset``). None on
    # a simulated GPU, and from an older memory service that only budgeted.
    handle: bytes | None = None
    item: str = ""  # as asked
    at: float = 0.0  # when it was made (wall clock): the LRU order of movable items
    swap_bytes: Count = 0  # as asked


class MemFreeRequest(Msg, frozen=True, tag="mem_free_request.v1"):
    device: Tier
    id: Count


class MemFreeReply(Msg, frozen=True, tag="mem_free_reply.v1"):
    freed: bool


class MemRenewRequest(Msg, frozen=True, tag="mem_renew_request.v1"):
    """An owner is alive: keep its allocations (they lapse after the node TTL without)."""

    owner: str


class MemRenewReply(Msg, frozen=True, tag="mem_renew_reply.v1"):
    allocations: Count  # how many it holds


class MemObserve(Msg, frozen=True, tag="mem_observe.v1"):
    """A request of a function started or ended on a GPU, with the bytes it holds there."""

    device: Tier
    function: str  # "<tenant>/<name>"
    request_id: str
    phase: Literal["start", "end"]
    nbytes: Count = 0


class MemListRequest(Msg, frozen=True, tag="mem_list_request.v1"):
    """An owner's live allocations on ``device`` (so it can free those it no longer needs)."""

    device: Tier
    owner: str


class MemListReply(Msg, frozen=True, tag="mem_list_reply.v1"):
    allocations: list[MemAllocation]


class MemStatsRequest(Msg, frozen=True, tag="mem_stats_request.v1"):
    pass


class MemPoolStats(Msg, frozen=True, tag="mem_pool_stats.v1"):
    device: str
    capacity_bytes: Count
    reserved_bytes: Count
    allocated_bytes: Count
    free_bytes: Count
    largest_free_block_bytes: Count
    fragmentation: float
    segments: Count
    allocations: Count
    held_bytes: Count = 0  # room kept for functions' intermediates (torch allocates them)


class MemStatsReply(Msg, frozen=True, tag="mem_stats_reply.v1"):
    node: NodeId
    pools: list[MemPoolStats]
    reserved: dict[str, Count] = {}  # "<device> <function>" -> bytes held for intermediates


class MemViewAck(Msg, frozen=True, tag="mem_view_ack.v1"):
    """The memory service's answer to a queue view (scheduler replicas publish, not ask)."""

    accepted: bool  # False: older than the view held from that replica


class CachedModel(Msg, frozen=True, tag="cached_model.v1"):
    """One model complete on a GPU, in a node's published model cache."""

    item: str
    nbytes: Count
    leased: bool
    file: str = ""
    tenant: str | None = None


class ModelCache(Msg, frozen=True, tag="model_cache.v1"):
    """What one GPU of a node holds, in the memory bucket (``<node>.<gpuN>.m``); rewritten,
    with a ``memory.residency`` event, when it changes."""

    node: NodeId
    device: str
    at: float
    models: list[CachedModel]


class MemRejection(Msg, frozen=True, tag="mem_rejection.v1"):
    """A function whose working set can never fit on a GPU (``<node>.<gpuN>.r.<tenant>.<name>``)."""

    device: str
    function: str
    working_set_bytes: Count
    capacity_bytes: Count
    reason: str
    at: float


class Ping(Msg, frozen=True, tag="ping.v1"):
    pass


class Pong(Msg, frozen=True, tag="pong.v1"):
    service: str
    node: str
    pid: int


class EndpointStats(Msg, frozen=True, tag="endpoint_stats.v1"):
    """One endpoint's requests since its service started, and its recent latency."""

    name: str  # the verb
    subject: str
    requests: int
    errors: int  # replies that were typed errors (a bad request, a crash)
    p50_us: int  # over the last requests (a window), not since start
    p99_us: int


class LoopStats(Msg, frozen=True, tag="loop_stats.v1"):
    """One supervised background loop (or KV watch): steps run and transient failures."""

    name: str
    runs: int
    failures: int  # transient failures, each logged and retried after a backoff
    skipped: int = 0  # malformed records a watch skipped
    last_error: str | None = None


class ServiceStatsRequest(Msg, frozen=True, tag="service_stats_request.v1"):
    pass


class ServiceStatsReply(Msg, frozen=True, tag="service_stats.v1"):
    """What every service answers on its ``service_stats`` verb (and on the broadcast)."""

    service: str
    node: str
    pid: int
    uptime_s: float
    endpoints: list[EndpointStats]
    loops: list[LoopStats]
    malformed_records: dict[str, int] = {}  # per KV bucket: records skipped as malformed


class Heartbeat(Msg, frozen=True, tag="heartbeat.v1"):
    """A node service's liveness entry in the nodes KV bucket (TTL'd)."""

    node: NodeId
    service: Annotated[str, msgspec.Meta(pattern=NODE_PATTERN)]
    pid: int
    started_at: float
    updated_at: float
    devices: list[DeviceInfo] = msgspec.field(default_factory=list)
    # The links between the node's GPUs (NVLink, ...), from its topology: placement puts a
    # workflow step on the GPU holding its inputs or a neighbour of it. Reported by the
    # node's worker pool; byte counters stay 0 here (see the transfer service's links).
    links: list[LinkInfo] = msgspec.field(default_factory=list)


class ErrorReply(Msg, frozen=True, tag="error.v1"):
    code: str
    message: str
    field: str | None = None
    retry_after_s: float | None = None  # when a retry may succeed (``Overloaded``)


class Event(Msg, frozen=True, tag="event.v1"):
    """An entry of the EVENTS stream (JSON on the wire)."""

    kind: str
    time: float
    source: str
    data: dict[str, Any] = msgspec.field(default_factory=dict)
    request_id: str | None = None


# --- codecs --------------------------------------------------------------------------

_UNKNOWN_FIELD = re.compile(r"unknown field `([^`]*)`")

M = TypeVar("M", bound=Msg)
S = TypeVar("S", bound=msgspec.Struct)

_encoder = msgspec.msgpack.Encoder()
_decoders: dict[type[Any], msgspec.msgpack.Decoder[Any]] = {}
_json_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}


def encode(msg: Msg) -> bytes:
    """Encode a control message for NATS (msgpack)."""
    return _encoder.encode(msg)


def decode(data: bytes, typ: type[M]) -> M:
    """Decode and validate; a bad message raises ``InvalidArgument`` naming the field."""
    dec = _decoders.get(typ)
    if dec is None:
        dec = _decoders[typ] = msgspec.msgpack.Decoder(typ)
    try:
        return dec.decode(data)  # type: ignore[no-any-return]
    except msgspec.ValidationError as exc:
        raise InvalidArgument(f"invalid {typ.__name__}: {exc}", field=_field_of(exc)) from None
    except msgspec.DecodeError as exc:
        raise InvalidArgument(f"malformed {typ.__name__}: {exc}") from None


def encode_json(msg: Msg) -> bytes:
    """Encode a message as JSON (events, HTTP bodies)."""
    return msgspec.json.encode(msg)


def decode_json(data: bytes | str, typ: type[M]) -> M:
    """Decode JSON with validation; errors as in :func:`decode`."""
    dec = _json_decoders.get(typ)
    if dec is None:
        dec = _json_decoders[typ] = msgspec.json.Decoder(typ)
    try:
        return dec.decode(data)  # type: ignore[no-any-return]
    except msgspec.ValidationError as exc:
        raise InvalidArgument(f"invalid {typ.__name__}: {exc}", field=_field_of(exc)) from None
    except msgspec.DecodeError as exc:
        raise InvalidArgument(f"malformed JSON: {exc}") from None


def convert(obj: Any, typ: type[S]) -> S:
    """Validate a plain object (e.g. parsed JSON from HTTP) into a message."""
    try:
        return msgspec.convert(obj, typ)
    except msgspec.ValidationError as exc:
        raise InvalidArgument(str(exc), field=_field_of(exc)) from None


def to_builtins(msg: Msg) -> Any:
    """Plain dicts and lists (for JSON responses)."""
    return msgspec.to_builtins(msg)


def completed(function: str, tenant: str, reply: InvokeReply) -> dict[str, Any]:
    """The data of an ``invocation.completed`` event (published by whoever sent the
    request to the worker: a scheduler, or a gateway on its direct route)."""
    return {
        "function": function,
        "tenant": tenant,
        "node": reply.node,
        "device": reply.device,
        "breakdown": to_builtins(reply.breakdown),
    }


def new_event(kind: str, source: str, data: dict[str, Any], request_id: str | None = None) -> Event:
    """An event stamped with the current time."""
    return Event(kind=kind, time=time.time(), source=source, data=data, request_id=request_id)


def _field_of(exc: msgspec.ValidationError) -> str | None:
    # msgspec messages end with " - at `$.path.to[0].field`".
    # An unknown field is named in the text: "Object contains unknown field `x`".
    text = str(exc)
    marker = "- at `$"
    path = text.split(marker, 1)[1].rstrip("`").lstrip(".") if marker in text else ""
    unknown = _UNKNOWN_FIELD.search(text)
    if unknown is not None:
        path = ".".join(filter(None, [path, unknown.group(1)]))
    return path or None
