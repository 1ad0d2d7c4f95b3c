"""The gateway's gRPC proto: its committed modules are what scripts/gen_grpc.sh makes, its
messages are Triton's (so tritonclient.grpc talks to it), and its tensor codec."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from tritonclient.grpc import service_pb2 as triton_pb

from gpufaas.gateway.grpc_server import STATUS
from gpufaas.gateway.grpc_tensors import CONTENTS, Head, decode_inputs, encode_outputs, heads
from gpufaas.gateway.inference import Tensor
from gpufaas.gateway.proto import grpc_service_pb2 as pb
from gpufaas.shared.errors import ERROR_TABLE, InvalidArgument
from gpufaas.shared.tensors import NUMPY_DTYPES, encode_bytes_elements

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "services" / "gateway" / "proto"
GENERATED = [
    "grpc_service_pb2.py",
    "grpc_service_pb2.pyi",
    "grpc_service_pb2_grpc.py",
    "grpc_service_pb2_grpc.pyi",
]


def test_the_committed_modules_are_what_the_script_generates(tmp_path: Path) -> None:
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen_grpc.sh"), str(tmp_path)],
        check=True,
        capture_output=True,
        env={**os.environ, "PYTHON": sys.executable},
        timeout=120,
    )
    for name in GENERATED:
        assert (tmp_path / name).read_text() == (PROTO_DIR / name).read_text(), (
            f"{name} is stale: run scripts/gen_grpc.sh"
        )


def _file(descriptor: Any) -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    descriptor.CopyToProto(proto)
    return proto


def _fields(message: descriptor_pb2.DescriptorProto) -> dict[str, Any]:
    """Every field (nested messages' too) as (number, type, label, type name)."""
    out: dict[str, Any] = {f.name: (f.number, f.type, f.label, f.type_name) for f in message.field}
    for nested in message.nested_type:
        out[nested.name] = _fields(nested)
    return out


def test_messages_and_rpcs_are_tritons() -> None:
    ours, theirs = _file(pb.DESCRIPTOR), _file(triton_pb.DESCRIPTOR)
    assert ours.package == theirs.package == "inference"
    triton_messages = {m.name: m for m in theirs.message_type}
    for message in ours.message_type:
        assert _fields(message) == _fields(triton_messages[message.name]), message.name
    (service,) = ours.service
    (triton_service,) = theirs.service
    assert service.name == triton_service.name == "GRPCInferenceService"
    triton_methods = {m.name: m for m in triton_service.method}
    for method in service.method:
        assert method == triton_methods[method.name]
    # Ours stay out of protobuf's default pool, where tritonclient's names live.
    assert pb.ModelInferRequest.DESCRIPTOR.file.pool is not descriptor_pool.Default()


def test_every_error_code_has_a_grpc_status() -> None:
    assert set(STATUS) == set(ERROR_TABLE)


SAMPLES: dict[str, list[Any]] = {
    "BOOL": [True, False, True],
    "INT8": [-128, 0, 127],
    "INT16": [-32768, 1, 32767],
    "INT32": [-(2**31), 2, 2**31 - 1],
    "INT64": [-(2**63), 3, 2**63 - 1],
    "UINT8": [0, 1, 255],
    "UINT16": [0, 2, 65535],
    "UINT32": [0, 3, 2**32 - 1],
    "UINT64": [0, 4, 2**64 - 1],
    "FP32": [0.5, -1.25, 3.0],
    "FP64": [0.1, -2.5, 1e300],
}


@pytest.mark.parametrize("datatype", [*SAMPLES, "BYTES"])
def test_typed_and_raw_contents_give_the_same_tensor(datatype: str) -> None:
    if datatype == "BYTES":
        values: list[Any] = [b"a", b"", "é".encode()]
        raw = encode_bytes_elements(values)
    else:
        values = SAMPLES[datatype]
        raw = np.array(values, dtype=NUMPY_DTYPES[datatype]).tobytes()
    typed = pb.ModelInferRequest()
    inp = typed.inputs.add(name="t", datatype=datatype, shape=[3])
    getattr(inp.contents, CONTENTS[datatype][0]).extend(values)
    rawreq = pb.ModelInferRequest(raw_input_contents=[raw])
    rawreq.inputs.add(name="t", datatype=datatype, shape=[3])
    types: dict[str, Any] = {"t": datatype}
    assert heads(typed) == [Head("t", datatype, [3])]
    (a,) = decode_inputs(typed, types)
    (b,) = decode_inputs(rawreq, types)
    assert bytes(a.data) == bytes(b.data) == raw

    out = pb.ModelInferResponse()
    encode_outputs(out, [Tensor("t", a.datatype, [3], raw)], typed=True)
    assert list(getattr(out.outputs[0].contents, CONTENTS[datatype][0])) == values
    assert not out.raw_output_contents


def test_an_output_without_a_typed_field_makes_every_output_raw() -> None:
    out = pb.ModelInferResponse()
    fp16 = np.ones(2, np.float16).tobytes()
    encode_outputs(
        out, [Tensor("h", "FP16", [2], fp16), Tensor("i", "INT32", [1], b"\x01\0\0\0")], True
    )
    assert list(out.raw_output_contents) == [fp16, b"\x01\0\0\0"]
    assert not out.outputs[1].HasField("contents")


@pytest.mark.parametrize(
    ("datatype", "raw", "field"),
    [
        ("BYTES", b"\x05\0\0\0ab", "raw_input_contents[0]"),  # claims 5 bytes, has 2
        ("BYTES", encode_bytes_elements([b"a", b"b"]), "raw_input_contents[0]"),  # 2, not 1
        ("BYTES", b"\x01\0", "raw_input_contents[0]"),  # a truncated length
        ("FP32", b"\0" * 3, "raw_input_contents[0]"),
        ("BF16", b"\0" * 2, None),  # BF16 travels raw: 2 bytes an element
    ],
)
def test_raw_contents_are_checked(datatype: str, raw: bytes, field: str | None) -> None:
    request = pb.ModelInferRequest(raw_input_contents=[raw])
    request.inputs.add(name="t", datatype=datatype, shape=[1])
    if field is None:
        assert bytes(decode_inputs(request, {"t": datatype})[0].data) == raw  # type: ignore[dict-item]
        return
    with pytest.raises(InvalidArgument) as info:
        decode_inputs(request, {"t": datatype})  # type: ignore[dict-item]
    assert info.value.field == field


def test_typed_contents_are_checked() -> None:
    request = pb.ModelInferRequest()
    inp = request.inputs.add(name="t", datatype="INT32", shape=[2])
    inp.contents.fp32_contents.extend([1.0, 2.0])  # the wrong field
    with pytest.raises(InvalidArgument) as info:
        decode_inputs(request, {"t": "INT32"})
    assert info.value.field == "inputs[0].contents.fp32_contents"
    inp.contents.Clear()
    inp.contents.int_contents.append(1)  # one element for shape [2]
    with pytest.raises(InvalidArgument) as info:
        decode_inputs(request, {"t": "INT32"})
    assert info.value.field == "inputs[0].contents.int_contents"
    both = pb.ModelInferRequest(raw_input_contents=[b"\0" * 8])
    both.inputs.add(name="t", datatype="INT32", shape=[2]).contents.int_contents.extend([1, 2])
    with pytest.raises(InvalidArgument) as info:
        decode_inputs(both, {"t": "INT32"})
    assert info.value.field == "inputs[0].contents"
