"""Per-tenant quotas through the gateway: functions deployed and GPU memory (sim GPUs)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from gpufaas.scheduler.service import SchedulerService
from gpufaas.shared.identity import FunctionRef
from gpufaas.shared.registry import instance_count, records
from gpufaas.worker.service import WorkerService
from tests.integration.conftest import DEMO_BODY, Platform, PlatformFactory, bearer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MIB = 1 << 20
# MiniLM's weights: 22.7 M float32 parameters, about 87 MiB (asserted below).
MINILM_LOW, MINILM_HIGH = 80 * MIB, 95 * MIB


def body(name: str) -> dict[str, Any]:
    return {**DEMO_BODY, "name": name}


async def deploy(p: Platform, key: str, name: str) -> tuple[int, dict[str, Any]]:
    resp = await p.client.post("/v1/functions", json=body(name), headers=bearer(key))
    return resp.status, await resp.json()


def refused(status: int, reply: dict[str, Any], setting: str) -> None:
    assert status == 403, reply
    assert reply["code"] == "quota_exceeded", reply
    assert reply["field"] == setting, reply
    assert setting in reply["error"] or "GPUFAAS_TENANT_LIMITS" in reply["error"], reply


def sched_of(p: Platform) -> SchedulerService:
    sched = p.services["scheduler"]
    assert isinstance(sched, SchedulerService)
    return sched


def loaded(p: Platform, tenant: str, name: str) -> bool:
    """An instance of the function is built in a worker of the platform."""
    ref = FunctionRef(tenant, name)
    return any(
        ref in svc.instances for svc in p.services.values() if isinstance(svc, WorkerService)
    )


async def names(p: Platform, tenant: str) -> list[str]:
    return [r.spec.name for r in await records(sched_of(p).kv.functions, tenant)]


async def test_functions_per_tenant(platform_factory: PlatformFactory) -> None:
    """The third function of a tenant with a quota of two is refused, naming the quota,
    leaving nothing behind; a redeploy of one it has is no new function; another tenant
    deploys as before; a delete makes room."""
    p = await platform_factory(tenant_max_functions=2)
    a, b = await p.key_for("a"), await p.key_for("b")
    assert (await deploy(p, a, "f1"))[0] == 201
    assert (await deploy(p, a, "f2"))[0] == 201
    refused(*await deploy(p, a, "f3"), "GPUFAAS_TENANT_MAX_FUNCTIONS")
    assert await names(p, "a") == ["f1", "f2"]
    assert not loaded(p, "a", "f3")
    status, reply = await deploy(p, a, "f1")  # the same spec again: not a new function
    assert status == 200, reply
    for name in ("f1", "f3"):
        assert (await deploy(p, b, name))[0] == 201  # b: its own quota, a's full one aside
    resp = await p.client.delete("/v1/functions/f2", headers=bearer(a))
    assert resp.status == 200, await resp.text()
    assert (await deploy(p, a, "f3"))[0] == 201


async def test_a_tenants_override_and_the_gateway_limits_beside_it(
    platform_factory: PlatformFactory,
) -> None:
    """GPUFAAS_TENANT_LIMITS gives one tenant more functions, beside its gateway limits
    (the gateway ignores the quota keys, the scheduler the others)."""
    limits = {"big": {"max_functions": 2, "max_inflight": 4}}
    p = await platform_factory(tenant_max_functions=1, tenant_limits=json.dumps(limits))
    small, big = await p.key_for("small"), await p.key_for("big")
    assert (await deploy(p, small, "f1"))[0] == 201
    refused(*await deploy(p, small, "f2"), "GPUFAAS_TENANT_MAX_FUNCTIONS")
    assert (await deploy(p, big, "f1"))[0] == 201
    assert (await deploy(p, big, "f2"))[0] == 201
    status, reply = await deploy(p, big, "f3")
    refused(status, reply, "GPUFAAS_TENANT_MAX_FUNCTIONS")
    assert "max_functions of tenant 'big' in GPUFAAS_TENANT_LIMITS" in reply["error"]


async def test_concurrent_deploys_never_pass_the_quota(platform_factory: PlatformFactory) -> None:
    """Deploys that each fit alone, sent at once: the quota holds (the ones that saw each
    other are undone), every refusal names it, and nothing refused is left loaded."""
    p = await platform_factory(tenant_max_functions=2)
    a = await p.key_for("a")
    assert (await deploy(p, a, "first"))[0] == 201  # the weights are in the store: fast
    results = await asyncio.gather(*(deploy(p, a, f"f{i}") for i in range(4)))
    created = {f"f{i}" for i, (status, _) in enumerate(results) if status == 201}
    for status, reply in results:
        if status != 201:
            refused(status, reply, "GPUFAAS_TENANT_MAX_FUNCTIONS")
    assert len(created) <= 1
    assert sorted(await names(p, "a")) == sorted({"first"} | created)
    for i in range(4):
        assert loaded(p, "a", f"f{i}") == (f"f{i}" in created)


async def test_gpu_memory_per_tenant(platform_factory: PlatformFactory) -> None:
    """A quota of 150 MiB of GPU memory (sim GPUs) holds one MiniLM (~87 MiB): a second
    function of it is refused naming the quota, leaving no instance; another tenant
    deploys as before."""
    p = await platform_factory(tenant_gpu_memory_bytes=150 * MIB)
    a, b = await p.key_for("a"), await p.key_for("b")
    status, first = await deploy(p, a, "f1")
    assert status == 201, first
    assert MINILM_LOW < first["model_bytes"] < MINILM_HIGH
    status, reply = await deploy(p, a, "f2")
    refused(status, reply, "GPUFAAS_TENANT_GPU_MEMORY_BYTES")
    assert f"({first['model_bytes']} in use" in reply["error"]
    assert not loaded(p, "a", "f2")
    assert await names(p, "a") == ["f1"]
    assert (await deploy(p, b, "f1"))[0] == 201  # b: its own quota, a's full one aside
    assert await names(p, "b") == ["f1"]


async def test_scaling_out_stops_at_the_gpu_memory_quota(platform_factory: PlatformFactory) -> None:
    """Two nodes: a function whose second instance would pass its tenant's GPU memory
    quota keeps one; a tenant with room gets two."""
    limits = {"roomy": {"gpu_memory_bytes": 300 * MIB}}
    p = await platform_factory(
        ["n1", "n2"], tenant_gpu_memory_bytes=150 * MIB, tenant_limits=json.dumps(limits)
    )
    sched = sched_of(p)
    for tenant in ("a", "roomy"):
        assert (await deploy(p, await p.key_for(tenant), "f"))[0] == 201
        record = await sched.functions.get(tenant, "f")
        assert record is not None
        await sched.leadership.scale(record, 2, "test", time.time())
    a = await sched.kv.functions.value(FunctionRef("a", "f").key)
    roomy = await sched.kv.functions.value(FunctionRef("roomy", "f").key)
    assert a is not None
    assert roomy is not None
    assert instance_count(a) == 1
    # The second instance: on another GPU of the node that holds the model's tensors
    # already (θ: cheaper than a node that must read them).
    assert instance_count(roomy) == 2
