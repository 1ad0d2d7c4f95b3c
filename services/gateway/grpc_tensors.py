"""Tensors of the gRPC protocol: a ``ModelInferRequest``'s inputs as raw :class:`Tensor` s,
raw outputs as a ``ModelInferResponse``'s.

An input's data comes either in ``raw_input_contents`` (one entry per input, in order:
the tensor's raw bytes, as in :mod:`gpufaas.gateway.inference`) or in its typed
``contents`` field; never both in one request. An input whose ``parameters`` name a
``shared_memory_region`` has neither: it has no ``raw_input_contents`` entry (as with
Triton's clients) and its bytes are read from the region (:mod:`sysshm`). A response
answers in kind: raw outputs to a raw request (or one with every input in shared
memory), typed ``contents`` to a typed one, unless an output has no typed field (FP16,
BF16), when every output is raw (the protocol forbids mixing them). An output written
into shared memory keeps its place in ``raw_output_contents`` with no bytes, so that the
entries still follow ``outputs``, and its ``parameters`` say where it lies.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from gpufaas.gateway.inference import Tensor
from gpufaas.gateway.proto import grpc_service_pb2 as pb
from gpufaas.gateway.sysshm import ShmRef, shm_ref
from gpufaas.shared.errors import InvalidArgument
from gpufaas.shared.messages import Datatype
from gpufaas.shared.tensors import (
    NUMPY_DTYPES,
    check_raw,
    decode_bytes_elements,
    element_count,
)

# datatype -> the InferTensorContents field that carries it, and that field's element type
# (narrower integers travel widened, as int32 or uint32).
CONTENTS: Final[dict[str, tuple[str, str]]] = {
    "BOOL": ("bool_contents", "|b1"),
    "INT8": ("int_contents", "<i4"),
    "INT16": ("int_contents", "<i4"),
    "INT32": ("int_contents", "<i4"),
    "INT64": ("int64_contents", "<i8"),
    "UINT8": ("uint_contents", "<u4"),
    "UINT16": ("uint_contents", "<u4"),
    "UINT32": ("uint_contents", "<u4"),
    "UINT64": ("uint64_contents", "<u8"),
    "FP32": ("fp32_contents", "<f4"),
    "FP64": ("fp64_contents", "<f8"),
    "BYTES": ("bytes_contents", ""),
}
_FIELDS: Final = tuple(dict.fromkeys(f for f, _ in CONTENTS.values()))


@dataclass(frozen=True, slots=True)
class Head:
    """An input's name, datatype and shape, as ``check_inputs`` reads them."""

    name: str
    datatype: str
    shape: list[int]


def heads(request: pb.ModelInferRequest) -> list[Head]:
    return [Head(i.name, i.datatype, list(i.shape)) for i in request.inputs]


def parameters(params: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    """A ``parameters`` map as plain values (None for a parameter with no value set)."""
    out: dict[str, Any] = {}
    for key, param in params.items():
        which = param.WhichOneof("parameter_choice")
        out[key] = None if which is None else getattr(param, which)
    return out


def shm_inputs(request: pb.ModelInferRequest) -> list[ShmRef | None]:
    """Each input's shared-memory reference (None: its data is in the request)."""
    return [
        shm_ref(parameters(inp.parameters), f"inputs[{i}].parameters")
        for i, inp in enumerate(request.inputs)
    ]


def shm_outputs(request: pb.ModelInferRequest) -> dict[str, ShmRef]:
    """The requested outputs to be written into shared memory, by name."""
    refs = {}
    for j, out in enumerate(request.outputs):
        ref = shm_ref(parameters(out.parameters), f"outputs[{j}].parameters")
        if ref is not None:
            refs[out.name] = ref
    return refs


def decode_inputs(
    request: pb.ModelInferRequest,
    datatypes: dict[str, Datatype],
    shm: Mapping[int, memoryview] | None = None,
) -> list[Tensor]:
    """The inputs as raw tensors (heads already checked: ``datatypes`` gives each input's;
    ``shm`` the bytes of those read from shared memory, by index); ``InvalidArgument``
    naming ``raw_input_contents[i]``, ``inputs[i].contents`` or the shared-memory size."""
    shm = shm or {}
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs) - len(shm):
        raise InvalidArgument(
            f"raw_input_contents has {len(raw)} entries for "
            f"{len(request.inputs) - len(shm)} inputs not in shared memory",
            field="raw_input_contents",
        )
    tensors, k = [], 0
    for i, inp in enumerate(request.inputs):
        datatype, shape = datatypes[inp.name], list(inp.shape)
        if (raw or i in shm) and inp.HasField("contents"):
            raise InvalidArgument(
                "give an input's data in raw_input_contents, contents or shared memory, "
                "one of them",
                field=f"inputs[{i}].contents",
            )
        data: bytes | memoryview
        if i in shm:
            data = shm[i]
            check_raw(datatype, shape, data, f"inputs[{i}].parameters.shared_memory_byte_size")
        elif raw:
            data, k = raw[k], k + 1
            check_raw(datatype, shape, data, f"raw_input_contents[{k - 1}]")
        else:
            data = _typed_to_raw(datatype, shape, inp.contents, f"inputs[{i}].contents")
        tensors.append(Tensor(inp.name, datatype, shape, data))
    return tensors


def _typed_to_raw(
    datatype: str, shape: list[int], contents: pb.InferTensorContents, field: str
) -> bytes:
    count = element_count(shape)
    if datatype not in CONTENTS:
        if count == 0:
            return b""
        raise InvalidArgument(
            f"{datatype} data has no typed field: send it in raw_input_contents", field=field
        )
    name, wide = CONTENTS[datatype]
    for other in _FIELDS:
        if other != name and len(getattr(contents, other)):
            raise InvalidArgument(
                f"{datatype} data goes in contents.{name}, not {other}", field=f"{field}.{other}"
            )
    values = getattr(contents, name)
    if len(values) != count:
        raise InvalidArgument(
            f"shape {shape} needs {count} elements; contents.{name} has {len(values)}",
            field=f"{field}.{name}",
        )
    if datatype == "BYTES":
        out = bytearray()
        for item in values:
            out += struct.pack("<I", len(item))
            out += item
        return bytes(out)
    arr = np.array(list(values), dtype=np.dtype(wide))
    target = np.dtype(NUMPY_DTYPES[datatype])
    if target != arr.dtype and arr.size:
        info = np.iinfo(target)
        if arr.min() < info.min or arr.max() > info.max:
            raise InvalidArgument(
                f"a value is out of range for {datatype}", field=f"{field}.{name}"
            )
    return arr.astype(target).tobytes()


def encode_outputs(
    response: pb.ModelInferResponse,
    outputs: list[Tensor],
    typed: bool,
    shm: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """Add ``outputs`` to ``response``: typed (when asked for and every output has a typed
    field) or raw; those in ``shm`` (written there already: the parameters that say
    where, by name) with no data."""
    shm = shm or {}
    typed = typed and all(o.datatype in CONTENTS for o in outputs if o.name not in shm)
    for out in outputs:
        tensor = response.outputs.add(name=out.name, datatype=out.datatype, shape=out.shape)
        if out.name in shm:
            for key, value in shm[out.name].items():
                param = tensor.parameters[key]
                if isinstance(value, str):
                    param.string_param = value
                else:
                    param.int64_param = value
            if not typed:
                response.raw_output_contents.append(b"")
            continue
        if not typed:
            response.raw_output_contents.append(bytes(out.data))
            continue
        name, _ = CONTENTS[out.datatype]
        count = element_count(out.shape)
        values: list[bytes] | list[bool | int | float]
        if out.datatype == "BYTES":
            values = decode_bytes_elements(out.data, count, f"outputs[{out.name}]")
        else:
            arr = np.frombuffer(out.data, dtype=np.dtype(NUMPY_DTYPES[out.datatype]), count=count)
            values = arr.tolist()
        getattr(tensor.contents, name).extend(values)
