"""The binary tensor extension of the Open Inference Protocol over HTTP (Triton's), and
the tensors that lie in a client's shared memory instead (:mod:`sysshm`).

A request with ``Inference-Header-Content-Length: N`` is N bytes of JSON, then the
binary data of each input that has ``parameters.binary_data_size``, in input order; the
bytes are the raw little-endian tensor (``BYTES``: each element 4-byte length
prefixed), sliced out of the body without a copy. An output goes back binary when it asks
for ``parameters.binary_data`` (or, not asking either way, when the request asks for
``parameters.binary_data_output``): the reply is then its JSON, N bytes, then the outputs'
data in the order of the JSON's outputs. A ``gzip`` or ``deflate`` body
(``Content-Encoding``) is inflated by aiohttp as it streams in, within the body cap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

import orjson
from aiohttp import web

from gpufaas.gateway import app as gw
from gpufaas.gateway.bodies import InferBody
from gpufaas.gateway.inference import Tensor
from gpufaas.gateway.sysshm import REGIONS, ShmRef, shm_ref
from gpufaas.shared.errors import InvalidArgument, UnsupportedMediaType
from gpufaas.shared.messages import convert
from gpufaas.shared.tensors import check_raw, json_to_raw

HEADER_LENGTH: Final = "Inference-Header-Content-Length"
ENCODINGS: Final = frozenset({"gzip", "deflate", "identity"})


@dataclass(slots=True)
class InferRequest:
    """A decoded request head: its body, where each input's data lies (a slice of the
    binary part, a shared-memory reference, or None: JSON ``data``) and how each output
    is to be sent back."""

    body: InferBody
    binary: list[memoryview | None]
    shm_in: list[ShmRef | None]
    binary_out: dict[str, bool] = field(default_factory=dict)
    shm_out: dict[str, ShmRef] = field(default_factory=dict)
    binary_default: bool = False


async def read_infer(request: web.Request) -> InferRequest:
    """The request's JSON and binary parts, checked (400 naming the field) before any
    tensor data is decoded."""
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ENCODINGS:
        raise UnsupportedMediaType(
            f"Content-Encoding {encoding[:32]!r}: gzip, deflate or identity",
            field="Content-Encoding",
        )
    raw = await gw.read_body(request)
    view = memoryview(raw)
    size = _header_length(request, len(raw))
    head = raw if size is None else view[:size]
    try:
        obj = orjson.loads(head)
    except orjson.JSONDecodeError as exc:
        where = "body" if size is None else HEADER_LENGTH
        raise InvalidArgument(f"malformed JSON header: {exc}", field=where) from None
    body = convert(obj, InferBody)
    req = InferRequest(body, *_input_parts(body, None if size is None else view[size:]))
    _output_plan(req)
    return req


def _header_length(request: web.Request, body_size: int) -> int | None:
    text = request.headers.get(HEADER_LENGTH)
    if text is None:
        return None
    if not text.strip().isdigit() or not 0 < int(text) <= body_size:
        raise InvalidArgument(
            f"{HEADER_LENGTH} must be the JSON header's size: 1 to the body's "
            f"{body_size} bytes; got {text[:32]!r}",
            field=HEADER_LENGTH,
        )
    return int(text)


def _input_parts(
    body: InferBody, tail: memoryview | None
) -> tuple[list[memoryview | None], list[ShmRef | None]]:
    """Each input's binary slice or shared-memory reference; the slices must cover the
    binary part exactly."""
    binary: list[memoryview | None] = []
    shm: list[ShmRef | None] = []
    pos = 0
    for i, inp in enumerate(body.inputs):
        where = f"inputs[{i}].parameters"
        params = inp.parameters or {}
        ref = shm_ref(params, where)
        size = params.get("binary_data_size")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
            raise InvalidArgument(
                "must be a non-negative integer", field=f"{where}.binary_data_size"
            )
        if (size is not None or ref is not None) and inp.data is not None:
            raise InvalidArgument(
                "data given with binary_data_size or shared_memory_region",
                field=f"inputs[{i}].data",
            )
        if size is not None and ref is not None:
            raise InvalidArgument(
                "binary_data_size and shared_memory_region both given",
                field=f"{where}.binary_data_size",
            )
        if size is not None:
            if tail is None:
                raise InvalidArgument(
                    f"binary_data_size needs the {HEADER_LENGTH} header",
                    field=f"{where}.binary_data_size",
                )
            if pos + size > len(tail):
                raise InvalidArgument(
                    f"binary_data_size {size} runs past the end of the body "
                    f"({len(tail) - pos} bytes left)",
                    field=f"{where}.binary_data_size",
                )
            binary.append(tail[pos : pos + size])
            pos += size
        else:
            binary.append(None)
        shm.append(ref)
    if tail is not None and pos != len(tail):
        raise InvalidArgument(
            f"the body has {len(tail)} bytes after the JSON header; the inputs' "
            f"binary_data_size add up to {pos}",
            field=HEADER_LENGTH,
        )
    return binary, shm


def _flag(params: dict[str, Any], name: str, where: str) -> bool | None:
    value = params.get(name)
    if value is not None and not isinstance(value, bool):
        raise InvalidArgument("must be true or false", field=f"{where}.{name}")
    return value


def _output_plan(req: InferRequest) -> None:
    """How each output goes back: binary, into shared memory, or JSON."""
    req.binary_default = bool(_flag(req.body.parameters or {}, "binary_data_output", "parameters"))
    for j, out in enumerate(req.body.outputs or []):
        where = f"outputs[{j}].parameters"
        params = out.parameters or {}
        if params.get("classification"):
            raise InvalidArgument(
                "the classification extension is not supported", field=f"{where}.classification"
            )
        flag = _flag(params, "binary_data", where)
        if flag is not None:
            req.binary_out[out.name] = flag
        ref = shm_ref(params, where)
        if ref is not None:
            req.shm_out[out.name] = ref


async def decode_inputs(request: web.Request, req: InferRequest) -> list[Tensor]:
    """The inputs as raw tensors (after ``check_inputs`` and the size checks): JSON data
    decoded, binary slices and shared-memory bytes checked against datatype and shape.
    The outputs' shared-memory regions are checked too, before anything runs."""
    tenant = gw.tenant_of(request)
    regions = request.app[REGIONS]
    for out_ref in req.shm_out.values():
        regions.check(tenant, out_ref, output=True)
    max_bytes = request.app[gw.CONFIG].max_body_bytes
    tensors = []
    for i, inp in enumerate(req.body.inputs):
        data: bytes | memoryview
        part, ref = req.binary[i], req.shm_in[i]
        if part is not None:
            check_raw(inp.datatype, inp.shape, part, f"inputs[{i}].parameters.binary_data_size")
            data = part
        elif ref is not None:
            data = await regions.read_input(tenant, ref, inp.datatype, inp.shape, max_bytes)
            check_raw(inp.datatype, inp.shape, data, f"{ref.field}.shared_memory_byte_size")
        else:
            data = json_to_raw(inp.datatype, inp.shape, inp.data, f"inputs[{i}].data")
        tensors.append(Tensor(inp.name, inp.datatype, inp.shape, data))
    return tensors


async def encode_outputs(
    request: web.Request, req: InferRequest, outs: list[Tensor]
) -> tuple[list[dict[str, Any]], list[bytes | memoryview]]:
    """Each output's JSON entry, and the binary data that follows the JSON (in order);
    an output asked for in shared memory is written there and leaves its data out."""
    entries: list[dict[str, Any]] = []
    chunks: list[bytes | memoryview] = []
    for out in outs:
        head: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": out.shape}
        ref = req.shm_out.get(out.name)
        if ref is not None:
            regions = request.app[REGIONS]
            head["parameters"] = await regions.write_output(gw.tenant_of(request), ref, out.data)
        elif req.binary_out.get(out.name, req.binary_default):
            head["parameters"] = {"binary_data_size": len(out.data)}
            chunks.append(out.data)
        else:
            head = gw.json_output(out)
        entries.append(head)
    return entries, chunks


def response(
    result: dict[str, Any], headers: dict[str, str], chunks: list[bytes | memoryview]
) -> web.Response:
    """The reply: JSON alone, or (with binary outputs) its JSON then their bytes."""
    if not chunks:
        return gw.json_response(result, headers=headers)
    head = orjson.dumps(result)
    headers = {**headers, HEADER_LENGTH: str(len(head))}
    return web.Response(
        body=b"".join([head, *chunks]), headers=headers, content_type="application/octet-stream"
    )
