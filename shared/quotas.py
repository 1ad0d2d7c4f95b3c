"""Per-tenant quotas: functions deployed and the GPU memory their instances' models take.

The scheduler enforces them (at deploy, and before the autoscaler adds an instance);
defaults from ``GPUFAAS_TENANT_MAX_FUNCTIONS`` and ``GPUFAAS_TENANT_GPU_MEMORY_BYTES``
(either 0: no such quota), overrides for some tenants in ``GPUFAAS_TENANT_LIMITS`` beside the
gateway's limits (keys ``max_functions`` and ``gpu_memory_bytes``; the gateway ignores
them, this reads only them). A function's GPU memory is its model's bytes once per
instance, at least one (a function scaled to zero comes back on its next request):
weights two functions share are counted for each.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

import msgspec
import orjson

from gpufaas.shared.config import Config
from gpufaas.shared.errors import InvalidArgument, QuotaExceeded
from gpufaas.shared.messages import FunctionRecord
from gpufaas.shared.registry import instance_count

LIMITS_ENV: Final = "GPUFAAS_TENANT_LIMITS"
FUNCTIONS_ENV: Final = "GPUFAAS_TENANT_MAX_FUNCTIONS"
GPU_MEMORY_ENV: Final = "GPUFAAS_TENANT_GPU_MEMORY_BYTES"


class TenantQuota(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One tenant's quotas (0: none)."""

    max_functions: int
    gpu_memory_bytes: int


QUOTA_KEYS: Final = frozenset(f.name for f in msgspec.structs.fields(TenantQuota))


@dataclass(frozen=True, slots=True)
class Quotas:
    """The default quota and the per-tenant overrides."""

    default: TenantQuota
    overrides: dict[str, TenantQuota]

    @classmethod
    def from_config(cls, config: Config) -> Quotas:
        """From the settings; a malformed or negative value is ``InvalidArgument`` naming
        its variable (the service does not start)."""
        default = TenantQuota(
            max_functions=config.tenant_max_functions,
            gpu_memory_bytes=config.tenant_gpu_memory_bytes,
        )
        overrides: dict[str, TenantQuota] = {}
        if config.tenant_limits.strip():
            try:
                raw = msgspec.convert(orjson.loads(config.tenant_limits), dict[str, dict[str, Any]])
                base = msgspec.structs.asdict(default)
                overrides = {
                    t: msgspec.convert(
                        {**base, **{k: v for k, v in d.items() if k in QUOTA_KEYS}}, TenantQuota
                    )
                    for t, d in raw.items()
                }
            except (orjson.JSONDecodeError, msgspec.ValidationError) as exc:
                raise InvalidArgument(
                    f"{LIMITS_ENV} is malformed: {exc}", field=LIMITS_ENV
                ) from None
        if default.max_functions < 0:
            raise InvalidArgument(f"{FUNCTIONS_ENV} must be 0 or more", field=FUNCTIONS_ENV)
        if default.gpu_memory_bytes < 0:
            raise InvalidArgument(f"{GPU_MEMORY_ENV} must be 0 or more", field=GPU_MEMORY_ENV)
        for tenant, q in overrides.items():
            if q.max_functions < 0 or q.gpu_memory_bytes < 0:
                raise InvalidArgument(
                    f"the quotas of tenant {tenant!r} must be 0 or more: {q}", field=LIMITS_ENV
                )
        return cls(default, overrides)

    def of(self, tenant: str) -> TenantQuota:
        return self.overrides.get(tenant, self.default)


def gpu_bytes(record: FunctionRecord, instances: int | None = None) -> int:
    """The GPU memory ``record`` counts for: its model's bytes per instance (``instances``,
    else its record's: one per GPU it names on each node), at least one."""
    n = instance_count(record) if instances is None else instances
    return record.model_bytes * max(n, 1)


def _where(tenant: str, quotas: Quotas, setting: str, key: str) -> str:
    if tenant in quotas.overrides:
        return f"{key} of tenant {tenant!r} in {LIMITS_ENV}"
    return setting


def over_functions(quotas: Quotas, tenant: str, others: Iterable[FunctionRecord]) -> str | None:
    """Why one more function of ``tenant`` is refused (``others``: its functions but the
    one deployed); None when it fits."""
    quota = quotas.of(tenant).max_functions
    have = sum(1 for _ in others)
    if quota == 0 or have < quota:
        return None
    where = _where(tenant, quotas, FUNCTIONS_ENV, "max_functions")
    return f"tenant {tenant!r} has {have} functions deployed; its quota ({where}) is {quota}"


def over_gpu_memory(
    quotas: Quotas, tenant: str, others: Iterable[FunctionRecord], adding: int
) -> str | None:
    """Why ``adding`` more bytes of GPU memory for ``tenant`` are refused (``others``: its
    functions but the one growing); None when they fit or there is no quota."""
    quota = quotas.of(tenant).gpu_memory_bytes
    held = sum(gpu_bytes(r) for r in others)
    if quota == 0 or held + adding <= quota:
        return None
    where = _where(tenant, quotas, GPU_MEMORY_ENV, "gpu_memory_bytes")
    return (
        f"tenant {tenant!r} would hold {held + adding} bytes of GPU memory ({held} in use, "
        f"{adding} more for this instance); its quota ({where}) is {quota}"
    )


def check_deploy(
    quotas: Quotas, tenant: str, name: str, deployed: Iterable[FunctionRecord], adding: int
) -> None:
    """``QuotaExceeded`` naming the quota when deploying ``name`` (a function not yet
    deployed, ``adding`` bytes of model; 0 when not known yet) would take ``tenant`` past
    one of its quotas. ``deployed``: the tenant's records (``name``'s own is skipped)."""
    others = [r for r in deployed if r.spec.tenant == tenant and r.spec.name != name]
    why = over_functions(quotas, tenant, others)
    if why is not None:
        raise QuotaExceeded(why, field=FUNCTIONS_ENV)
    why = over_gpu_memory(quotas, tenant, others, adding)
    if why is not None:
        raise QuotaExceeded(why, field=GPU_MEMORY_ENV)
