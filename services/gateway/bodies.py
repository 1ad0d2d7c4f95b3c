"""HTTP request and response bodies (JSON), validated with msgspec."""

from __future__ import annotations

from typing import Any

import msgspec

from gpufaas.shared.messages import Datatype, FunctionOptions, ModelSource, Name


class Body(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of request bodies: unknown fields are rejected."""


class DeployBody(Body):
    """``POST /v1/functions``."""

    name: Name
    model: ModelSource
    options: FunctionOptions = msgspec.field(default_factory=FunctionOptions)


class InferInput(Body):
    """One input tensor of an Open Inference Protocol request."""

    name: str
    shape: list[int]
    datatype: Datatype
    data: Any
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
