"""Identity types: one spelling of a function and of a device."""

from __future__ import annotations

import pytest

from gpufaas.shared.errors import InvalidArgument
from gpufaas.shared.identity import Device, FunctionRef, is_gpu
from gpufaas.shared.stats import EndpointCounter, LoopCounter, percentile

pytestmark = pytest.mark.unit


def test_a_function_has_one_spelling() -> None:
    ref = FunctionRef("acme", "minilm")
    assert ref.key == str(ref) == "acme.minilm"
    assert FunctionRef.parse(ref.key) == ref
    assert {ref: 1}[FunctionRef("acme", "minilm")] == 1


@pytest.mark.parametrize("bad", ["acme", "acme/minilm", "acme.", ".x", "Acme.x", "a.b.c", ""])
def test_a_malformed_function_reference_is_refused(bad: str) -> None:
    with pytest.raises(InvalidArgument):
        FunctionRef.parse(bad)


def test_devices_parse_once() -> None:
    gpu = Device.parse("gpu:3")
    assert (gpu.kind, gpu.index, gpu.name, gpu.token, gpu.is_gpu) == (
        "gpu",
        3,
        "gpu:3",
        "gpu3",
        True,
    )
    assert Device.from_token("gpu3") == gpu == Device.gpu(3)
    host = Device.parse("host")
    assert (host.index, host.name, host.token, host.is_gpu) == (None, "host", "host", False)
    assert Device.from_token("object") == Device.parse("object")
    assert is_gpu("gpu:0")
    assert not is_gpu("host")


@pytest.mark.parametrize("bad", ["gpu", "gpu:", "gpu:-1", "gpu:01", "gpu:x", "sim:0", "../x", ""])
def test_a_malformed_device_is_refused_naming_the_field(bad: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        Device.parse(bad, field="tier")
    assert err.value.field == "tier"


def test_endpoint_counters_and_percentiles() -> None:
    assert percentile([], 0.5) == 0
    assert percentile([1, 2, 3, 4, 100], 0.5) == 3
    assert percentile([1, 2, 3, 4, 100], 0.99) == 100
    counter = EndpointCounter("run", "gpufaas.v1.x.run")
    for i in range(2000):
        counter.record(i / 1e6, error=i % 10 == 0)
    snap = counter.snapshot()
    assert (snap.requests, snap.errors) == (2000, 200)
    assert 1400 <= snap.p50_us <= 1600  # over the last 1024 only
    assert snap.p99_us >= 1980


def test_loop_backoff_doubles_and_is_capped() -> None:
    loop = LoopCounter("x")
    assert loop.backoff(1.0, 30) == 1.0
    loop.failed(TimeoutError())
    assert loop.backoff(1.0, 30) == 2.0
    for _ in range(10):
        loop.failed(TimeoutError())
    assert loop.backoff(1.0, 30) == 30
    loop.ok()
    assert loop.backoff(1.0, 30) == 1.0
    assert (loop.runs, loop.failures) == (12, 11)
