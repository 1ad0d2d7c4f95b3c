"""Per-tenant quotas (``shared/quotas.py``): parsing, what counts, and each refusal."""

from __future__ import annotations

import json

import pytest

from gpufaas.gateway.admission import parse_limits
from gpufaas.shared.config import Config
from gpufaas.shared.errors import InvalidArgument, QuotaExceeded, http_status
from gpufaas.shared.messages import FunctionRecord, FunctionSpec, ModelSource
from gpufaas.shared.quotas import Quotas, TenantQuota, check_deploy, gpu_bytes, over_gpu_memory

pytestmark = pytest.mark.unit

MB = 10**6


def record(
    name: str, model_bytes: int = 100 * MB, nodes: int = 1, tenant: str = "a"
) -> FunctionRecord:
    return FunctionRecord(
        spec=FunctionSpec(name=name, model=ModelSource(builtin="m"), tenant=tenant),
        inputs=[],
        outputs=[],
        model_bytes=model_bytes,
        tensor_count=1,
        nodes=[f"n{i}" for i in range(nodes)],
        created_at=0,
    )


def quotas(**settings: object) -> Quotas:
    return Quotas.from_config(Config().replace(**settings))


def test_defaults_and_a_tenants_override_beside_the_gateways_limits() -> None:
    limits = {"big": {"max_functions": 5, "max_inflight": 3}, "fast": {"rate": 5.0}}
    q = quotas(tenant_max_functions=2, tenant_limits=json.dumps(limits))
    assert q.of("anyone") == TenantQuota(max_functions=2, gpu_memory_bytes=0)
    assert q.of("big") == TenantQuota(max_functions=5, gpu_memory_bytes=0)
    assert q.of("fast") == q.default  # only gateway limits: the default quotas
    # The gateway reads the same JSON and leaves the quota keys to the scheduler.
    _, per = parse_limits(Config(tenant_limits=json.dumps(limits)))
    assert per["big"].max_inflight == 3


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"tenant_limits": '{"t": {"max_functions": "many"}}'}, "GPUFAAS_TENANT_LIMITS"),
        ({"tenant_limits": '{"t": {"gpu_memory_bytes": -1}}'}, "GPUFAAS_TENANT_LIMITS"),
        ({"tenant_limits": "[1"}, "GPUFAAS_TENANT_LIMITS"),
        ({"tenant_max_functions": -1}, "GPUFAAS_TENANT_MAX_FUNCTIONS"),
        ({"tenant_gpu_memory_bytes": -1}, "GPUFAAS_TENANT_GPU_MEMORY_BYTES"),
    ],
)
def test_a_malformed_setting_is_named(settings: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        quotas(**settings)
    assert err.value.field == field


def test_gpu_memory_is_model_bytes_per_instance_at_least_one() -> None:
    assert gpu_bytes(record("f", nodes=0)) == 100 * MB  # scaled to zero: back on a request
    assert gpu_bytes(record("f", nodes=3)) == 300 * MB
    assert gpu_bytes(record("f", nodes=3), instances=4) == 400 * MB


def test_the_function_quota_counts_other_functions_only() -> None:
    q = quotas(tenant_max_functions=2)
    have = [record("f1"), record("f2"), record("f1", tenant="b")]
    check_deploy(q, "a", "f1", have, 0)  # f1 itself: not one more
    with pytest.raises(QuotaExceeded) as err:
        check_deploy(q, "a", "f3", have, 0)
    assert err.value.field == "GPUFAAS_TENANT_MAX_FUNCTIONS"
    assert "has 2 functions deployed" in err.value.message
    assert http_status(err.value) == 403
    check_deploy(q, "b", "f3", have, 0)  # another tenant's records do not count
    check_deploy(quotas(tenant_max_functions=0), "a", "f3", have * 50, 0)  # 0: no quota


def test_the_gpu_memory_quota_counts_every_instance() -> None:
    q = quotas(tenant_gpu_memory_bytes=350 * MB, tenant_max_functions=0)
    have = [record("f1", nodes=2), record("f2", model_bytes=50 * MB)]  # 250 MB
    check_deploy(q, "a", "f3", have, 100 * MB)
    with pytest.raises(QuotaExceeded) as err:
        check_deploy(q, "a", "f3", have, 101 * MB)
    assert err.value.field == "GPUFAAS_TENANT_GPU_MEMORY_BYTES"
    assert "(250000000 in use, 101000000 more" in err.value.message
    # A third instance of f1: the others hold 50 MB, f1 would hold 300 MB.
    assert over_gpu_memory(q, "a", have[1:], gpu_bytes(have[0], 3)) is None
    assert over_gpu_memory(q, "a", have[1:], gpu_bytes(have[0], 4)) is not None
    check_deploy(quotas(), "a", "f3", have, 10**15)  # the default: no GPU memory quota


def test_an_overridden_quota_says_where_it_is_set() -> None:
    q = quotas(tenant_limits=json.dumps({"a": {"max_functions": 1}}))
    with pytest.raises(QuotaExceeded) as err:
        check_deploy(q, "a", "f2", [record("f1")], 0)
    assert "max_functions of tenant 'a' in GPUFAAS_TENANT_LIMITS" in err.value.message
