"""HTTP request and response bodies (JSON), validated with msgspec."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from gpufaas.shared.messages import Datatype, FunctionOptions, ModelSource, Name
from gpufaas.shared.workflows import WorkflowStep


class Body(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of request bodies: unknown fields are rejected."""


class DeployBody(Body):
    """``POST /v1/functions``."""

    name: Name
    model: ModelSource
    options: FunctionOptions = msgspec.field(default_factory=FunctionOptions)


class WorkflowBody(Body):
    """``POST /v1/workflows``: steps wire function inputs to ``$input.<name>`` or
    ``<step>.<output>``; ``outputs`` maps names to ``<step>.<output>`` (default: the outputs
    of the steps nothing consumes)."""

    name: Name
    steps: Annotated[list[WorkflowStep], msgspec.Meta(min_length=1, max_length=64)]
    outputs: dict[str, str] | None = None
    slo_ms: Annotated[float, msgspec.Meta(gt=0)] | None = None


class InferInput(Body):
    """One input tensor of an Open Inference Protocol request."""

    name: str
    shape: list[int]
    datatype: Datatype
    data: Any = None  # absent when the data travels as binary or in shared memory
    parameters: dict[str, Any] | None = None


class InferOutputRequest(Body):
    name: str
    parameters: dict[str, Any] | None = None


class InferBody(Body):
    """``POST /v2/models/{name}/infer`` (JSON form of the Open Inference Protocol)."""

    inputs: list[InferInput]
    id: str | None = None
    outputs: list[InferOutputRequest] | None = None
    parameters: dict[str, Any] | None = None


class ShmRegisterBody(Body):
    """``POST /v2/systemsharedmemory/region/{name}/register``: ``byte_size`` bytes from
    ``offset`` of the POSIX shared-memory object ``key`` (``/dev/shm/<key>``)."""

    key: Annotated[str, msgspec.Meta(min_length=1, max_length=201)]
    byte_size: Annotated[int, msgspec.Meta(ge=1)]
    offset: Annotated[int, msgspec.Meta(ge=0)] = 0


MAX_CUDA_REGION_BYTES = 16 << 30  # a CUDA region is mapped, not received: its own cap


class CudaRawHandle(Body):
    b64: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]


class CudaShmRegisterBody(Body):
    """``POST /v2/cudasharedmemory/region/{name}/register``: the first ``byte_size`` bytes
    of the allocation whose ``cudaIpcMemHandle_t`` is ``raw_handle.b64`` (base64)."""

    raw_handle: CudaRawHandle
    device_id: Annotated[int, msgspec.Meta(ge=0)]
    byte_size: Annotated[int, msgspec.Meta(ge=1, le=MAX_CUDA_REGION_BYTES)]
