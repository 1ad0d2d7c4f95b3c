"""A function's effective configuration: its complete profile's choice, else its spec's."""

from __future__ import annotations

import pytest

from gpufaas.scheduler.profiles import (
    EffectiveConfig,
    compute_s,
    effective_config,
    service_rps,
)
from gpufaas.shared.messages import (
    FunctionOptions,
    FunctionSpec,
    ModelSource,
    ProfilePointMsg,
    ProfileRecord,
)

pytestmark = pytest.mark.unit

SPEC = FunctionSpec(
    name="f", model=ModelSource(builtin="m"), options=FunctionOptions(max_batch_size=16)
)


def profile(*, complete: bool, batch: int = 4, concurrency: int = 2) -> ProfileRecord:
    points = [
        ProfilePointMsg(batch=1, concurrency=1, latency_s=0.01, memory_bytes=0),
        ProfilePointMsg(batch=4, concurrency=2, latency_s=0.04, memory_bytes=0),
    ]
    return ProfileRecord(
        spec=SPEC,
        device="gpu:0",
        points=points,
        batch=batch,
        concurrency=concurrency,
        reason="test",
        complete=complete,
        measured_at=0.0,
    )


def test_a_complete_profile_decides() -> None:
    config = effective_config(profile(complete=True), SPEC)
    assert config == EffectiveConfig(4, 2, profiled=True)
    assert config.capacity == 8


@pytest.mark.parametrize("record", [None, profile(complete=False)])
def test_without_a_complete_profile_the_spec_decides(record: ProfileRecord | None) -> None:
    config = effective_config(record, SPEC)
    assert config == EffectiveConfig(16, 1, profiled=False)
    assert config.capacity == 16


def test_service_rate_comes_from_the_chosen_point_only() -> None:
    done = profile(complete=True)
    assert service_rps(done, effective_config(done, SPEC)) == pytest.approx(8 / 0.04)
    assert service_rps(None, effective_config(None, SPEC)) == 0.0
    partial = profile(complete=False)
    assert service_rps(partial, effective_config(partial, SPEC)) == 0.0
    unmeasured = profile(complete=True, batch=8, concurrency=1)  # no point at (8, 1)
    assert service_rps(unmeasured, effective_config(unmeasured, SPEC)) == 0.0


def test_compute_time_per_request() -> None:
    assert compute_s(None) is None
    assert compute_s(profile(complete=True)) == pytest.approx(0.04 / 8)
    # The chosen point was not measured: the smallest batch stands in.
    assert compute_s(profile(complete=False, batch=16, concurrency=1)) == pytest.approx(0.01)
