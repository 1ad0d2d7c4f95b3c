"""Every name, id and path pattern refuses a trailing newline: Python's ``$`` matches
before one, so ``"name\\n"`` passed msgspec's checks and reached KV keys and subjects
(nats-py's own key check has the same hole) as a 503 or a 500."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import msgspec
import pytest

from gpufaas.shared import apikeys, messages, subjects
from gpufaas.shared.errors import InvalidArgument
from gpufaas.shared.identity import Device, FunctionRef
from gpufaas.shared.paths import under

pytestmark = pytest.mark.unit

NODE = "node-1"
TUBE = "A" * 24
# (pattern, a value it takes): the value plus "\n" must be refused.
PATTERNS = [
    (messages.NAME_PATTERN, "minilm"),
    (messages.TUBE_ID_PATTERN, TUBE),
    (messages.NODE_PATTERN, NODE),
    (messages.SEGMENT_ID_PATTERN, "seg1"),
    (messages.TUBE_SEGMENT_PATTERN, f"tubes/{NODE}/{TUBE}"),
    (messages.TENSOR_SEGMENT_PATTERN, f"tensors/{NODE}/w1"),
    (messages.PROGRAM_PATTERN, f"tensors/{NODE}/models/ab12.program"),
    (messages.UPLOAD_ID_PATTERN, "a" * 64),
    (apikeys.ID_PATTERN, "a" * apikeys.ID_LENGTH),
]


@pytest.mark.parametrize(("pattern", "good"), PATTERNS)
def test_patterns_refuse_a_trailing_newline(pattern: str, good: str) -> None:
    typ = Annotated[str, msgspec.Meta(pattern=pattern)]
    assert msgspec.convert(good, typ) == good
    assert re.search(pattern, good)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(good + "\n", typ)
    assert re.search(pattern, good + "\n") is None


@pytest.mark.parametrize(
    ("typ", "good"),
    [
        (messages.Name, "minilm"),
        (messages.Tenant, "acme"),
        (messages.TensorId, "b" * 64),
        (messages.TorchDtype, "float32"),
        (messages.Tier, "gpu:0"),
    ],
)
def test_annotated_types_refuse_a_trailing_newline(typ: Any, good: str) -> None:
    assert msgspec.convert(good, typ) == good
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(good + "\n", typ)


def test_identities_subjects_and_paths_refuse_a_trailing_newline(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument):
        FunctionRef.parse("acme.minilm\n")
    with pytest.raises(InvalidArgument):
        Device.parse("gpu:0\n")
    with pytest.raises(InvalidArgument):
        Device.from_token("gpu0\n")
    with pytest.raises(ValueError, match="token"):
        subjects.token("node-1\n")
    with pytest.raises(ValueError, match="not valid"):
        subjects.event_filter("function.*\n")
    with pytest.raises(InvalidArgument):
        under(tmp_path, "tubes/x\n")
