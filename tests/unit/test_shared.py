"""Unit tests of gpufaas.shared: subjects, errors, messages, config, tensors, devices,
catalog and host shared-memory segments. Pure and in-process: no NATS, no subprocesses."""

from __future__ import annotations

import inspect
import json
import struct
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from gpufaas.shared import catalog, devices, errors, messages, shm, subjects, tensors
from gpufaas.shared.catalog import Packaged, resolve_model_dir, validate_source
from gpufaas.shared.config import Config
from gpufaas.shared.devices import load_topology, parse_devices
from gpufaas.shared.errors import (
    ERROR_TABLE,
    Internal,
    InvalidArgument,
    ModelInvalid,
    NotFound,
    PlatformError,
    from_code,
    http_status,
)
from gpufaas.shared.messages import (
    Breakdown,
    DeleteRequest,
    DeployRequest,
    DeviceInfo,
    ErrorReply,
    Event,
    FunctionOptions,
    FunctionSpec,
    Heartbeat,
    InvokeReply,
    InvokeRequest,
    ModelSource,
    Placement,
    RegisterReply,
    TensorPayload,
    TensorRef,
    Tube,
)
from gpufaas.shared.rpc import error_reply
from gpufaas.shared.shm import (
    POOL_MIN_BYTES,
    SegmentCache,
    delete_tube,
    read_tube,
    write_segment,
    write_tube,
)
from gpufaas.shared.tensors import (
    check_shape,
    decode_bytes_elements,
    encode_bytes_elements,
    json_to_raw,
    raw_nbytes,
    raw_to_json,
)

pytestmark = pytest.mark.unit


# --- subjects ------------------------------------------------------------------------


def test_subject_builders() -> None:
    assert subjects.cluster("scheduler", "deploy") == "gpufaas.v1.scheduler.deploy"
    assert subjects.node("n-1", "worker", "run") == "gpufaas.v1.node.n-1.worker.run"
    assert subjects.node_service_all("n_1", "tensorstore") == "gpufaas.v1.node.n_1.tensorstore.*"
    assert subjects.SCHED_DEPLOY == "gpufaas.v1.scheduler.deploy"
    assert subjects.SCHED_DELETE == "gpufaas.v1.scheduler.delete"
    assert subjects.SCHED_INVOKE == "gpufaas.v1.scheduler.invoke"
    assert subjects.EVENTS_ALL == "gpufaas.v1.events.>"


@pytest.mark.parametrize("bad", ["a.b", "*", ">", "a*", "a b", "", "node\t1", "é"])
def test_token_rejects_unsafe_values(bad: str) -> None:
    with pytest.raises(ValueError, match="not a valid subject token"):
        subjects.token(bad)
    with pytest.raises(ValueError, match="node id"):
        subjects.node(bad, "worker", "run")
    with pytest.raises(ValueError, match="verb"):
        subjects.cluster("scheduler", bad)


def test_token_accepts_safe_values() -> None:
    for ok in ["node1", "Node-1", "a_b", "0", shm.new_id()]:
        assert subjects.token(ok) == ok


@pytest.mark.parametrize("kind", ["function.deployed", "invocation.completed", "node", "a_b.c-d.9"])
def test_event_and_event_kind_round_trip(kind: str) -> None:
    subject = subjects.event(kind)
    assert subject == f"gpufaas.v1.events.{kind}"
    assert subjects.event_kind(subject) == kind


@pytest.mark.parametrize("bad", ["Function.deployed", "a..b", "a.*", ">", "", ".a", "a.", "a b"])
def test_event_rejects_bad_kinds(bad: str) -> None:
    with pytest.raises(ValueError, match="event kind"):
        subjects.event(bad)


@pytest.mark.parametrize(
    "subject", ["gpufaas.v1.scheduler.deploy", "gpufaas.v1.events", "gpufaas.v1.eventsx.a"]
)
def test_event_kind_rejects_non_event_subjects(subject: str) -> None:
    with pytest.raises(ValueError, match="not an event subject"):
        subjects.event_kind(subject)


@pytest.mark.parametrize(
    "pattern", [">", "function.*", "node.>", "invocation.completed", "*.deployed", "*", "a.*.>"]
)
def test_event_filter_accepts_patterns(pattern: str) -> None:
    assert subjects.event_filter(pattern) == f"gpufaas.v1.events.{pattern}"


@pytest.mark.parametrize("bad", ["a..b", "Foo", "", ">.a", "a.>.b", "a.", ".a", "a b", "a*"])
def test_event_filter_rejects_bad_patterns(bad: str) -> None:
    with pytest.raises(ValueError, match="pattern"):
        subjects.event_filter(bad)


# --- errors --------------------------------------------------------------------------

EXPECTED_STATUS = {
    "invalid_argument": 400,
    "unauthenticated": 401,
    "permission_denied": 403,
    "quota_exceeded": 403,
    "not_found": 404,
    "already_exists": 409,
    "payload_too_large": 413,
    "unsupported_media_type": 415,
    "model_invalid": 422,
    "overloaded": 429,
    "resource_exhausted": 507,
    "unavailable": 503,
    "deadline_exceeded": 504,
    "internal": 500,
}


def test_error_table_covers_every_error_class() -> None:
    assert set(ERROR_TABLE) == set(EXPECTED_STATUS)
    classes = {
        obj
        for _, obj in inspect.getmembers(errors, inspect.isclass)
        if issubclass(obj, PlatformError) and obj is not PlatformError
    }
    # Every class's code has its row; a refinement keeps its parent's (NoResponders).
    assert {cls for cls in classes if cls.code not in ERROR_TABLE} == set()
    assert {cls for _, cls in ERROR_TABLE.values()} <= classes


@pytest.mark.parametrize("code", sorted(EXPECTED_STATUS))
def test_error_code_maps_to_status_and_round_trips(code: str) -> None:
    status, cls = ERROR_TABLE[code]
    assert status == EXPECTED_STATUS[code]
    assert cls.code == code
    err = cls("boom", field="spec.name")
    assert http_status(err) == status
    back = from_code(err.code, err.message, err.field)
    assert type(back) is cls
    assert (back.message, back.field, str(back)) == ("boom", "spec.name", "boom")
    assert back.to_dict() == err.to_dict()


def test_retry_after_travels_in_an_error_reply() -> None:
    body, headers = error_reply(errors.Overloaded("queue full", retry_after_s=2.5))
    assert headers["Gpufaas-Error-Code"] == "overloaded"
    reply = messages.decode(body, ErrorReply)
    back = from_code(reply.code, reply.message, reply.field, reply.retry_after_s)
    assert type(back) is errors.Overloaded
    assert back.retry_after_s == 2.5
    assert http_status(back) == 429


def test_unknown_error_code_becomes_internal_500() -> None:
    err = from_code("no_such_code", "what happened", "x")
    assert type(err) is Internal
    assert (err.message, err.field) == ("what happened", "x")
    assert http_status(err) == 500

    class Odd(PlatformError):
        code = "odd"

    assert http_status(Odd("x")) == 500


def test_to_dict_includes_field_only_when_set() -> None:
    assert NotFound("gone").to_dict() == {"code": "not_found", "error": "gone"}
    assert InvalidArgument("bad", field="inputs[0].shape").to_dict() == {
        "code": "invalid_argument",
        "error": "bad",
        "field": "inputs[0].shape",
    }
    assert "field" in InvalidArgument("bad", field="").to_dict()


# --- messages ------------------------------------------------------------------------


TUBE_ID = "T" * 24  # the shape of shm.new_id()


def _tube() -> Tube:
    return Tube(
        id=TUBE_ID,
        tenant="default",
        datatype="FP32",
        shape=[2, 3],
        nbytes=24,
        placements=[Placement(node="n1", tier="host", segment=f"tubes/{TUBE_ID}")],
        created_at=12.5,
    )


SAMPLES: list[messages.Msg] = [
    DeployRequest(
        spec=FunctionSpec(
            name="minilm",
            model=ModelSource(builtin="all-minilm-l6-v2"),
            options=FunctionOptions(max_batch_size=8, slo_ms=50.0),
            tenant="acme",
        )
    ),
    DeleteRequest(name="minilm"),
    InvokeRequest(
        function="minilm",
        request_id="r1",
        inputs=[
            TensorPayload(name="text", datatype="BYTES", shape=[1], data=b"\x01\x00\x00\x00a"),
            TensorPayload(name="big", datatype="FP32", shape=[2, 3], tube=_tube()),
        ],
        deadline=1.5,
    ),
    InvokeReply(
        function="minilm",
        request_id="r1",
        outputs=[TensorPayload(name="embedding", datatype="FP32", shape=[1, 2], data=b"\0" * 8)],
        node="n1",
        device="gpu:0",
        breakdown=Breakdown(queue_us=1, compute_us=2, total_us=3, cold=True),
    ),
    RegisterReply(
        model_dir="/m",
        manifest={
            "w": TensorRef(
                id="ab" * 32,
                dtype="float32",
                shape=[4],
                nbytes=16,
                segment="tensors/n1/s",
                offset=64,
            )
        },
        model_bytes=16,
        bytes_stored=16,
        bytes_deduplicated=0,
        register_us=10,
    ),
    Heartbeat(
        node="n1",
        service="worker",
        pid=42,
        started_at=1.0,
        updated_at=2.0,
        devices=[DeviceInfo(name="gpu:0", kind="sim", model="V100", memory_bytes=1 << 30)],
    ),
    ErrorReply(code="not_found", message="gone", field="name"),
    Event(kind="function.deployed", time=3.0, source="scheduler", data={"a": [1, "x"]}),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_msgpack_round_trip(msg: messages.Msg) -> None:
    assert messages.decode(messages.encode(msg), type(msg)) == msg


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_json_round_trip_and_type_tag(msg: messages.Msg) -> None:
    raw = messages.encode_json(msg)
    assert messages.decode_json(raw, type(msg)) == msg
    assert messages.decode_json(raw.decode(), type(msg)) == msg
    tag = type(msg).__struct_config__.tag
    assert isinstance(tag, str)
    assert tag.endswith(".v1")
    assert json.loads(raw)["type"] == tag
    assert messages.to_builtins(msg)["type"] == tag
    assert messages.convert(json.loads(raw), type(msg)) == msg


def test_nested_messages_carry_their_type_tag() -> None:
    body = json.loads(messages.encode_json(SAMPLES[0]))
    assert body["type"] == "deploy_request.v1"
    assert body["spec"]["type"] == "function_spec.v1"
    assert body["spec"]["model"]["type"] == "model_source.v1"
    assert body["spec"]["options"]["type"] == "function_options.v1"


def _deploy_body(**spec_changes: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "type": "function_spec.v1",
        "name": "ok",
        "model": {"type": "model_source.v1", "builtin": "all-minilm-l6-v2"},
    }
    spec.update(spec_changes)
    return {"type": "deploy_request.v1", "spec": spec}


def test_unknown_field_is_rejected_with_its_name_in_the_message() -> None:
    for body, name in [
        ({"type": "delete_request.v1", "name": "x", "colour": 1}, "colour"),
        (_deploy_body(model={"builtin": "a", "bogus": 2}), "bogus"),
    ]:
        typ: type[messages.Msg] = DeleteRequest if "name" in body else DeployRequest
        for decode in (
            lambda b, t: messages.decode_json(json.dumps(b), t),
            lambda b, t: messages.decode(msgspec.msgpack.encode(b), t),
            messages.convert,
        ):
            with pytest.raises(InvalidArgument, match=f"unknown field `{name}`"):
                decode(body, typ)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"type": "delete_request.v1", "name": "x", "colour": 1}, "colour"),
        (_deploy_body(model={"builtin": "a", "bogus": 2}), "spec.model.bogus"),
    ],
    ids=["top-level", "nested"],
)
def test_unknown_field_error_field_names_it(body: dict[str, Any], field: str) -> None:
    typ: type[messages.Msg] = DeleteRequest if "name" in body else DeployRequest
    with pytest.raises(InvalidArgument) as info:
        messages.decode_json(json.dumps(body), typ)
    assert info.value.field == field


def test_wrong_type_names_the_path() -> None:
    with pytest.raises(InvalidArgument, match="Expected `str`") as info:
        messages.decode_json(json.dumps(_deploy_body(name=5)), DeployRequest)
    assert info.value.field == "spec.name"

    with pytest.raises(InvalidArgument) as info:
        messages.decode(msgspec.msgpack.encode(_deploy_body(name=5)), DeployRequest)
    assert info.value.field == "spec.name"

    body = {
        "type": "invoke_request.v1",
        "function": "f",
        "request_id": "r",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, "two"]}],
    }
    with pytest.raises(InvalidArgument) as info:
        messages.convert(body, InvokeRequest)
    assert info.value.field == "inputs[0].shape[1]"

    with pytest.raises(InvalidArgument) as info:
        messages.convert(
            dict(body, inputs=[{"name": "x", "datatype": "FP8", "shape": []}]), InvokeRequest
        )
    assert info.value.field == "inputs[0].datatype"


@pytest.mark.parametrize("name", ["Bad", "bad name", "-lead", "_lead", "a" * 64, "", "a.b"])
def test_invalid_function_name_pattern(name: str) -> None:
    with pytest.raises(InvalidArgument, match="regex") as info:
        messages.decode_json(json.dumps(_deploy_body(name=name)), DeployRequest)
    assert info.value.field == "spec.name"


@pytest.mark.parametrize("name", ["a", "0", "my-fn_2", "a" * 63])
def test_valid_function_names(name: str) -> None:
    req = messages.decode_json(json.dumps(_deploy_body(name=name)), DeployRequest)
    assert req.spec.name == name
    assert req.spec.tenant == "default"
    assert req.spec.options == FunctionOptions()


def test_wrong_tag_and_malformed_bytes() -> None:
    with pytest.raises(InvalidArgument) as info:
        messages.decode_json(b'{"type": "delete_request.v2", "name": "x"}', DeleteRequest)
    assert info.value.field == "type"
    with pytest.raises(InvalidArgument, match="malformed JSON") as info:
        messages.decode_json(b"{not json", DeleteRequest)
    assert info.value.field is None
    with pytest.raises(InvalidArgument, match="malformed DeleteRequest"):
        messages.decode(b"\xc1", DeleteRequest)


def test_constraints_are_enforced() -> None:
    with pytest.raises(InvalidArgument) as info:
        messages.convert(
            _deploy_body(options={"max_batch_size": 0}),
            DeployRequest,
        )
    assert info.value.field == "spec.options.max_batch_size"
    with pytest.raises(InvalidArgument) as info:
        messages.convert(
            {"type": "placement.v1", "node": "n", "tier": "disk", "segment": "s"}, Placement
        )
    assert info.value.field == "tier"


def test_messages_are_frozen() -> None:
    msg = DeleteRequest(name="x")
    with pytest.raises(AttributeError):
        msg.name = "y"  # type: ignore[misc]


def test_new_event_is_stamped() -> None:
    ev = messages.new_event("function.deployed", "scheduler", {"name": "f"}, request_id="r")
    assert ev.time > 0
    assert (ev.kind, ev.source, ev.data, ev.request_id) == (
        "function.deployed",
        "scheduler",
        {"name": "f"},
        "r",
    )


# --- config --------------------------------------------------------------------------


def test_config_from_env_parses_types() -> None:
    env = {
        "GPUFAAS_HTTP_PORT": "9090",
        "GPUFAAS_REQUEST_TIMEOUT_S": "1.5",
        "GPUFAAS_SHM_DIR": "/tmp/gpufaas-test",
        "GPUFAAS_DATA_DIR": "~/gpufaas-data",
        "GPUFAAS_NODE_ID": "node-7",
        "GPUFAAS_DEVICES": "sim:2",
        "OTHER_HTTP_PORT": "1",
        "GPUFAAS_NOT_A_FIELD": "x",
    }
    cfg = Config.from_env(environ=env)
    assert cfg.http_port == 9090
    assert isinstance(cfg.http_port, int)
    assert cfg.request_timeout_s == 1.5
    assert isinstance(cfg.request_timeout_s, float)
    assert cfg.shm_dir == Path("/tmp/gpufaas-test")
    assert cfg.data_dir == Path("~/gpufaas-data").expanduser()
    assert cfg.node_id == "node-7"
    assert cfg.devices == "sim:2"
    assert cfg.heartbeat_s == Config().heartbeat_s


def test_config_from_empty_env_is_default() -> None:
    assert Config.from_env(environ={}) == Config()


@pytest.mark.parametrize(
    ("key", "value"),
    [("GPUFAAS_HTTP_PORT", "eighty"), ("GPUFAAS_HTTP_PORT", "1.5"), ("GPUFAAS_HEARTBEAT_S", "x")],
)
def test_config_bad_number_names_the_variable(key: str, value: str) -> None:
    with pytest.raises(InvalidArgument, match=key) as info:
        Config.from_env(environ={key: value})
    assert info.value.field == key


def test_config_env_round_trip(tmp_path: Path) -> None:
    cfg = Config(
        node_id="n1",
        http_port=1234,
        shm_dir=tmp_path / "shm",
        data_dir=tmp_path / "data",
        request_timeout_s=2.5,
        devices="sim:4",
        ready_file=str(tmp_path / "ready"),
    )
    env = cfg.to_env()
    assert all(k.startswith("GPUFAAS_") and isinstance(v, str) for k, v in env.items())
    assert env["GPUFAAS_HTTP_PORT"] == "1234"
    assert Config.from_env(environ=env) == cfg
    assert Config.from_env(environ=Config().to_env()) == Config()
    assert Config.from_env(prefix="X_", environ=cfg.to_env(prefix="X_")) == cfg
    assert cfg.replace(http_port=1) == Config.from_env(environ={**env, "GPUFAAS_HTTP_PORT": "1"})


# --- tensors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("datatype", "shape", "data", "flat"),
    [
        ("FP32", [2, 2], [[1.0, 2.5], [-3.0, 0.0]], [1.0, 2.5, -3.0, 0.0]),
        ("FP32", [3], [1, 2, 3], [1.0, 2.0, 3.0]),
        ("INT64", [3], [1, -2, 2**62], [1, -2, 2**62]),
        ("INT8", [2], [-128, 127], [-128, 127]),
        ("BOOL", [2, 1], [[True], [False]], [True, False]),
        ("BYTES", [2, 2], [["a", "bc"], ["ü日", ""]], ["a", "bc", "ü日", ""]),
        ("BYTES", [2, 1, 1], [[["x"]], [["y"]]], ["x", "y"]),
        ("FP64", [0], [], []),
        ("BF16", [3], [1, -2.5, 3.140625], [1.0, -2.5, 3.140625]),  # float32 values in JSON
    ],
)
def test_json_raw_round_trip(datatype: str, shape: list[int], data: Any, flat: list[Any]) -> None:
    raw = json_to_raw(datatype, shape, data, "inputs[0].data")
    expected_nbytes = raw_nbytes(datatype, shape)
    if expected_nbytes is not None:
        assert len(raw) == expected_nbytes
    back = raw_to_json(datatype, shape, raw)
    assert back == flat
    assert [type(x) for x in back] == [type(x) for x in flat]
    assert json_to_raw(datatype, shape, back, "f") == raw


def test_bytes_layout_is_length_prefixed() -> None:
    raw = json_to_raw("BYTES", [2], ["ab", ""], "f")
    assert raw == struct.pack("<I", 2) + b"ab" + struct.pack("<I", 0)
    items = [b"", b"\x00\xff", b"x" * 300]
    assert decode_bytes_elements(encode_bytes_elements(items), 3) == items


@pytest.mark.parametrize(
    ("datatype", "shape", "data", "match"),
    [
        ("FP32", [2, 2], [1.0, 2.0, 3.0], "needs 4 elements but data has 3"),
        ("FP32", [1], [[1.0, 2.0]], "does not follow shape"),
        ("FP32", [2, 2], [[1.0, 2.0, 3.0], [4.0]], "does not follow shape"),
        ("FP32", [2], 1.0, "must be a JSON array"),
        ("BYTES", [3], ["a", "b"], "needs 3 elements"),
        ("INT32", [1], [1.5], "do not match datatype INT32"),
        ("INT32", [1], [True], "do not match datatype INT32"),
        ("FP32", [1], [True], "do not match datatype FP32"),
        ("FP32", [1], ["1.0"], "do not match datatype FP32"),
        ("BOOL", [1], [1], "do not match datatype BOOL"),
        ("BYTES", [1], [1], "BYTES elements must be strings"),
        ("INT8", [1], [128], "out of range for INT8"),
        ("INT8", [1], [-129], "out of range for INT8"),
        ("UINT8", [1], [-1], "out of range for UINT8"),
        ("INT64", [1], [2**64], "out of range for INT64"),
        ("BF16", [1], [True], "do not match datatype BF16"),
    ],
)
def test_json_to_raw_rejects_bad_data(
    datatype: str, shape: list[int], data: Any, match: str
) -> None:
    with pytest.raises(InvalidArgument, match=match) as info:
        json_to_raw(datatype, shape, data, "inputs[3].data")
    assert info.value.field == "inputs[3].data"


@pytest.mark.parametrize(("datatype", "value"), [("FP16", 1e10), ("FP32", 1e300)])
def test_json_to_raw_rejects_float_overflow(datatype: str, value: float) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # today: silently inf
        with pytest.raises(InvalidArgument, match="out of range") as info:
            json_to_raw(datatype, [1], [value], "inputs[0].data")
    assert info.value.field == "inputs[0].data"


@pytest.mark.parametrize(
    ("raw", "count", "match"),
    [
        (struct.pack("<I", 10) + b"abc", 1, "truncated BYTES element$"),
        (encode_bytes_elements([b"ab"]) + b"\x01\x00", 2, "truncated BYTES element length"),
        (encode_bytes_elements([b"a", b"b"]), 3, "expected 3 BYTES elements, got 2"),
        (encode_bytes_elements([b"a", b"b"]), 1, "expected 1 BYTES elements, got 2"),
    ],
)
def test_decode_bytes_elements_rejects_bad_framing(raw: bytes, count: int, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match) as info:
        decode_bytes_elements(raw, count, field="inputs[text].data")
    assert info.value.field == "inputs[text].data"
    with pytest.raises(InvalidArgument) as info:
        raw_to_json("BYTES", [count], raw)
    assert info.value.field == "data"


def test_check_shape_and_sizes() -> None:
    assert check_shape([2, 0, 3], "shape") == [2, 0, 3]
    for bad in [[-1], [True], [1.0], (1, 2), "12", None]:
        with pytest.raises(InvalidArgument) as info:
            check_shape(bad, "inputs[0].shape")
        assert info.value.field == "inputs[0].shape"
    assert raw_nbytes("FP16", [3, 4]) == 24
    assert raw_nbytes("BOOL", [5]) == 5
    assert raw_nbytes("BF16", [3, 4]) == 24
    assert raw_nbytes("BYTES", [5]) is None
    assert tensors.element_count([]) == 1


# --- devices -------------------------------------------------------------------------

DGX1_NVLINK = {
    frozenset({f"gpu:{a}", f"gpu:{b}"})
    for a, b in [
        (0, 1),
        (0, 2),
        (0, 3),
        (0, 4),
        (1, 2),
        (1, 3),
        (1, 5),
        (2, 3),
        (2, 6),
        (3, 7),
        (4, 5),
        (4, 6),
        (4, 7),
        (5, 6),
        (5, 7),
        (6, 7),
    ]
}


def test_parse_devices_sim_2() -> None:
    nd = parse_devices("sim:2")
    assert nd.backend == "sim"
    assert [d.name for d in nd.devices] == ["host", "gpu:0", "gpu:1"]
    assert [d.kind for d in nd.devices] == ["host", "sim", "sim"]
    assert nd.devices[0].memory_bytes > 0
    assert all(d.memory_bytes == 32 * 2**30 for d in nd.devices[1:])
    assert nd.topology is not None
    assert nd.topology.name == "dgx1-v100"
    assert [g["index"] for g in nd.topology.gpus] == [0, 1]
    pairs = {frozenset({ln.a, ln.b}) for ln in nd.topology.links}
    assert pairs == {
        frozenset({"host", "gpu:0"}),
        frozenset({"host", "gpu:1"}),
        frozenset({"gpu:0", "gpu:1"}),
    }
    link = nd.topology.link("gpu:1", "gpu:0")
    assert link is not None
    assert link.kind == "nvlink2"
    assert nd.topology.link("gpu:0", "gpu:4") is None


def test_parse_devices_normalises_and_takes_a_topology() -> None:
    nd = parse_devices("  SIM:1 ", "pcie-1gpu")
    assert [d.name for d in nd.devices] == ["host", "gpu:0"]
    assert nd.topology is not None
    assert nd.topology.name == "pcie-1gpu"
    assert len(parse_devices("sim:8", "dgx-h100").devices) == 9


@pytest.mark.parametrize(
    ("spec", "topology"),
    [
        ("sim:0", ""),
        ("sim:99", ""),
        ("sim:-1", ""),
        ("sim:x", ""),
        ("sim:", ""),
        ("sim:2", "pcie-1gpu"),
        ("bogus", ""),
        ("", ""),
        ("gpu", ""),
    ],
)
def test_parse_devices_rejects_bad_specs(spec: str, topology: str) -> None:
    with pytest.raises(InvalidArgument, match="devices") as info:
        parse_devices(spec, topology)
    assert info.value.field == "devices"


def test_parse_devices_cpu_is_host_only() -> None:
    nd = parse_devices("cpu")
    assert nd.backend == "cpu"
    assert nd.topology is None
    assert [(d.name, d.kind) for d in nd.devices] == [("host", "host")]
    assert nd.devices[0].memory_bytes > 0


def test_parse_devices_auto_falls_back_to_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices, "probe_cuda", lambda: None)
    nd = parse_devices("auto")
    assert nd.backend == "cpu"
    assert [d.name for d in nd.devices] == ["host"]


def test_parse_devices_auto_on_this_machine() -> None:
    if devices.probe_cuda() is not None:
        pytest.skip("this machine has a GPU")
    assert parse_devices("auto").backend == "cpu"


@pytest.mark.parametrize("name", ["dgx1-v100", "dgx-h100", "pcie-1gpu"])
def test_packaged_topologies_are_consistent(name: str) -> None:
    topo = load_topology(name)
    assert topo.name == name
    n = len(topo.gpus)
    assert [g["index"] for g in topo.gpus] == list(range(n))
    assert all(int(g["memory_bytes"]) > 0 for g in topo.gpus)
    names = {"host"} | {f"gpu:{i}" for i in range(n)}
    pairs = [frozenset({ln.a, ln.b}) for ln in topo.links]
    assert len(pairs) == len(set(pairs)), "duplicate links"
    assert all(p <= names and len(p) == 2 for p in pairs)
    assert all(ln.gbps > 0 and ln.latency_us >= 0 for ln in topo.links)
    for i in range(n):
        assert topo.link("host", f"gpu:{i}") is not None


def test_dgx1_v100_nvlink_pairs_match_the_reference() -> None:
    topo = load_topology("dgx1-v100")
    assert len(topo.gpus) == 8
    nvlink = {frozenset({ln.a, ln.b}) for ln in topo.links if ln.kind.startswith("nvlink")}
    assert len(nvlink) == 16
    assert nvlink == DGX1_NVLINK
    assert load_topology("") == topo  # the default


def test_dgx_h100_is_all_to_all_and_pcie_has_one_gpu() -> None:
    h100 = load_topology("dgx-h100")
    gpu_pairs = {frozenset({ln.a, ln.b}) for ln in h100.links if ln.a != "host"}
    assert len(h100.gpus) == 8
    assert len(gpu_pairs) == 28
    pcie = load_topology("pcie-1gpu")
    assert len(pcie.gpus) == 1
    assert [(ln.a, ln.b) for ln in pcie.links] == [("host", "gpu:0")]


def test_unknown_topology_lists_packaged_ones() -> None:
    with pytest.raises(InvalidArgument, match="unknown topology 'nope'") as info:
        load_topology("nope")
    assert info.value.field == "topology"
    for name in ["dgx1-v100", "dgx-h100", "pcie-1gpu"]:
        assert name in info.value.message


def test_topology_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "mine.json"
    path.write_text(
        json.dumps(
            {
                "name": "mine",
                "gpus": [{"index": 0, "model": "X", "memory_bytes": 1024}],
                "links": [
                    {"a": "host", "b": "gpu:0", "kind": "pcie4", "gbps": 25, "latency_us": 5}
                ],
            }
        )
    )
    topo = load_topology(str(path))
    assert topo.name == "mine"
    assert topo.links[0].gbps == 25.0
    nd = parse_devices("sim:1", str(path))
    assert nd.devices[1].memory_bytes == 1024

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "bad", "gpus": []}))
    with pytest.raises(InvalidArgument, match="malformed") as info:
        load_topology(str(bad))
    assert info.value.field == "topology"
    with pytest.raises(InvalidArgument, match="cannot read") as info:
        load_topology(str(tmp_path / "missing.json"))
    assert info.value.field == "topology"


# --- catalog -------------------------------------------------------------------------


def test_validate_source_accepts_good_sources(tmp_path: Path) -> None:
    validate_source(ModelSource(builtin="all-minilm-l6-v2"))
    validate_source(ModelSource(path=str(tmp_path)))


@pytest.mark.parametrize(
    ("source", "field"),
    [
        (ModelSource(builtin="all-minilm-l6-v2", path="/models/x"), "model"),
        (ModelSource(), "model"),
        (ModelSource(builtin="gpt-17"), "model.builtin"),
        (ModelSource(path="models/x"), "model.path"),
        (ModelSource(builtin="all-minilm-l6-v2", architecture="llama"), "model.architecture"),
    ],
)
def test_validate_source_names_the_field(source: ModelSource, field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        validate_source(source)
    assert info.value.field == field
    with pytest.raises(InvalidArgument):
        resolve_model_dir(source)


def test_resolve_builtin_demo_model() -> None:
    path = resolve_model_dir(ModelSource(builtin=catalog.DEMO_MODEL))
    assert path.is_dir()
    assert (path / "model.safetensors").is_file()
    assert (path / "config.json").is_file()
    assert (path / "tokenizer.json").is_file()


def test_resolve_path_sources(tmp_path: Path) -> None:
    assert resolve_model_dir(ModelSource(path=str(tmp_path))) == tmp_path
    with pytest.raises(ModelInvalid, match="does not exist") as info:
        resolve_model_dir(ModelSource(path=str(tmp_path / "missing")))
    assert info.value.field == "model.path"


def test_resolve_builtin_that_is_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(
        catalog.BUILTIN,
        "ghost",
        Packaged(
            package="gpufaas_no_such_package",
            subdir="model",
            architecture="bert-embedding",
            pip="pip install ghost",
        ),
    )
    with pytest.raises(ModelInvalid, match="pip install ghost") as info:
        resolve_model_dir(ModelSource(builtin="ghost"))
    assert info.value.field == "model.builtin"


# --- shm -----------------------------------------------------------------------------


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_tube_write_read_delete(tmp_path: Path) -> None:
    data = b"\x00\x01" * 1000
    tube = write_tube(tmp_path, "n1", "acme", datatype="INT16", shape=[1000], data=data)
    assert (tube.tenant, tube.datatype, tube.shape, tube.nbytes) == ("acme", "INT16", [1000], 2000)
    assert tube.created_at > 0
    [p] = tube.placements
    assert (p.node, p.tier, p.offset) == ("n1", "host", 0)
    assert p.segment == f"{shm.TUBES_DIR}/{tube.id}"
    subjects.token(tube.id)  # ids are safe in subjects and file names
    assert _files(tmp_path) == [p.segment]  # no temporary file left behind
    assert read_tube(tmp_path, tube) == data
    assert shm.host_path(tmp_path, tube) == tmp_path / p.segment
    assert messages.decode_json(messages.encode_json(tube), Tube) == tube

    other = write_tube(tmp_path, "n1", "acme", datatype="BYTES", shape=[0], data=memoryview(b""))
    assert other.id != tube.id
    assert read_tube(tmp_path, other) == b""

    delete_tube(tmp_path, tube)
    delete_tube(tmp_path, tube)  # idempotent
    with pytest.raises(NotFound) as info:
        read_tube(tmp_path, tube)
    assert info.value.field == "tube"
    assert _files(tmp_path) == [other.placements[0].segment]

    # A copy swapped into the host pool is a block of a shared segment: never deleted here.
    segment = shm.host_pool_segment("n1", "seg1")
    (tmp_path / segment).parent.mkdir(parents=True)
    (tmp_path / segment).write_bytes(b"\0" * 64)
    pooled = msgspec.structs.replace(
        other, placements=[messages.Placement(node="n1", tier="host", segment=segment, offset=32)]
    )
    delete_tube(tmp_path, pooled)
    assert (tmp_path / segment).stat().st_size == 64


def test_read_tube_detects_truncation_and_missing_host_copy(tmp_path: Path) -> None:
    tube = write_tube(tmp_path, "n1", "default", datatype="UINT8", shape=[8], data=b"12345678")
    (tmp_path / tube.placements[0].segment).write_bytes(b"1234")
    with pytest.raises(NotFound, match="truncated"):
        read_tube(tmp_path, tube)
    gpu_only = msgspec.structs.replace(
        tube, placements=[Placement(node="n1", tier="gpu:0", segment="x")]
    )
    with pytest.raises(NotFound, match="no host copy"):
        read_tube(tmp_path, gpu_only)


def test_write_segment_is_atomic(tmp_path: Path) -> None:
    assert write_segment(tmp_path, "a/b/seg", [b"abc", memoryview(b"defg")]) == 7
    assert (tmp_path / "a/b/seg").read_bytes() == b"abcdefg"

    def failing() -> Iterator[bytes]:
        yield b"new bytes"
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_segment(tmp_path, "a/b/seg", failing())
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_segment(tmp_path, "a/b/other", failing())
    # The old segment is intact, the failed one never appeared, no temp file remains.
    assert (tmp_path / "a/b/seg").read_bytes() == b"abcdefg"
    assert _files(tmp_path) == ["a/b/seg"]


def test_segment_cache(tmp_path: Path) -> None:
    cache = SegmentCache(tmp_path)
    with pytest.raises(NotFound, match="not on this node"):
        cache.map("tensors/n1/missing")
    assert len(cache) == 0
    write_segment(tmp_path, "tensors/n1/seg", [b"hello world"])
    m = cache.map("tensors/n1/seg")
    assert m[:] == b"hello world"
    assert cache.map("tensors/n1/seg") is m
    assert len(cache) == 1
    cache.forget("tensors/n1/seg")
    cache.forget("tensors/n1/seg")
    assert len(cache) == 0
    m.close()


def test_copy_chunks_amortise_the_launch_overhead() -> None:
    from gpufaas.transfer.cuda_engine import (  # noqa: PLC0415
        MAX_CHUNK_BYTES,
        MIN_CHUNK_BYTES,
        OVERHEAD_SHARE,
        chunk_size,
    )

    # 15 µs per Python-issued copy on a 25 GB/s PCIe 4 link: >= 7.5 MB, so 8 MiB chunks.
    n = chunk_size(15e-6, 25e9)
    assert n == 8 * 2**20
    assert OVERHEAD_SHARE * n / 25e9 >= 15e-6
    assert n < 2 * 15e-6 * 25e9 / OVERHEAD_SHARE  # the next power of two, not more
    assert chunk_size(0.0, 25e9) == MIN_CHUNK_BYTES
    assert chunk_size(1e-3, 400e9) == MAX_CHUNK_BYTES


def test_a_short_copy_is_cut_finer_so_the_pipeline_fills_fast() -> None:
    from gpufaas.transfer.cuda_engine import (  # noqa: PLC0415
        MIN_CHUNK_BYTES,
        PIPELINE_CHUNKS,
        copy_chunk,
    )

    mib = 2**20
    assert copy_chunk(1024 * mib, 16 * mib) == 16 * mib  # long: the calibrated chunk
    assert copy_chunk(64 * mib, 16 * mib) == 64 * mib // PIPELINE_CHUNKS
    assert copy_chunk(100 * mib, 16 * mib) == 8 * mib  # a power of two, rounded up
    assert copy_chunk(1, 16 * mib) == MIN_CHUNK_BYTES


def test_released_tube_files_are_reused_and_cut_to_the_new_tube(tmp_path: Path) -> None:
    def tube_file(t: Tube) -> Path:
        return tmp_path / t.placements[0].segment

    first = write_tube(
        tmp_path, "n", "a", datatype="UINT8", shape=[0], data=b"\x01" * (POOL_MIN_BYTES + 100)
    )
    inode = tube_file(first).stat().st_ino
    delete_tube(tmp_path, first)
    assert not tube_file(first).exists()
    data = b"\x02" * POOL_MIN_BYTES
    second = write_tube(tmp_path, "n", "b", datatype="UINT8", shape=[0], data=data)
    assert tube_file(second).stat().st_ino == inode  # the same pages, no new allocation
    assert tube_file(second).stat().st_size == POOL_MIN_BYTES  # nothing of tenant a's left
    assert read_tube(tmp_path, second) == data
    small = write_tube(tmp_path, "n", "b", datatype="UINT8", shape=[0], data=b"tiny")
    delete_tube(tmp_path, small)
    delete_tube(tmp_path, second)
    assert len(list((tmp_path / "tubes" / ".pool").iterdir())) == 1  # small ones are deleted
    # This process keeps pooled files mapped to write them again; not one deleted since.
    from gpufaas.shared import shm  # noqa: PLC0415

    assert inode in shm._POOL_MAPS
    for f in (tmp_path / "tubes" / ".pool").iterdir():
        f.unlink()
    third = write_tube(tmp_path, "n", "c", datatype="UINT8", shape=[0], data=data)
    assert inode not in shm._POOL_MAPS
    assert read_tube(tmp_path, third) == data


def test_config_reads_and_writes_booleans_and_path_lists() -> None:
    from gpufaas.shared.config import Config  # noqa: PLC0415

    config = Config(auth=False, metrics_public=True, model_roots=("/srv/models", "/data/m"))
    env = config.to_env()
    assert (env["GPUFAAS_AUTH"], env["GPUFAAS_MODEL_ROOTS"]) == ("0", "/srv/models:/data/m")
    assert Config.from_env(environ=env) == config
    assert Config.from_env(environ={}).auth is True
    with pytest.raises(InvalidArgument) as bad:
        Config.from_env(environ={"GPUFAAS_AUTH": "maybe"})
    assert bad.value.field == "GPUFAAS_AUTH"


def test_bf16_from_json_rounds_to_nearest_even_as_torch_does() -> None:
    import torch  # noqa: PLC0415 - the reference only

    values = [1.0, 3.14159, -1e30, 1.00390625, 1.01171875, 65504.0, 1e-40]
    raw = json_to_raw("BF16", [len(values)], values, "f")
    assert raw == torch.tensor(values, dtype=torch.bfloat16).view(torch.int16).numpy().tobytes()
