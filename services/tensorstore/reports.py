"""What the tensor store reports: its figures, and per GPU the models resident on it.

Pure reads of the host store and the device tiers, run on the store's thread (see
``store_thread``) so that they see no change half made.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from gpufaas.shared.catalog import model_file
from gpufaas.shared.errors import PlatformError
from gpufaas.shared.messages import (
    DeviceResidency,
    ModelItem,
    ModelQuery,
    ResidencyReply,
    ResidentModel,
    StoreStats,
)
from gpufaas.tensorstore.device_tier import DeviceTier
from gpufaas.tensorstore.store import HostStore


def store_stats(store: HostStore, tiers: Mapping[str, DeviceTier], node: str) -> StoreStats:
    """The host tier's figures (and each device tier's): what is stored, leased, shared."""
    referenced = sum(r.nbytes for t, r in store.index.items() if store.leases.refcount(t))
    private = sum(
        store.index[t].nbytes for lease in store.leases.leases.values() for t in lease.tensors
    )
    return StoreStats(
        devices=[t.stats() for t in tiers.values()],
        node=node,
        tensors=len(store.index),
        segments=len(store.segments),
        bytes_stored=store.bytes_stored,
        bytes_requested=store.bytes_requested,
        leases=len(store.leases.leases),
        bytes_referenced=referenced,
        bytes_without_sharing=private,
    )


def device_residency(store: HostStore, name: str, tier: DeviceTier, now: float) -> DeviceResidency:
    """The models complete on one GPU (the memory manager's items) and the GPU's use."""
    models = []
    for key, nbytes, last, pinned in tier.resident_models(store.models, now):
        file, tenant = store.sources.get(key, ("", None))
        models.append(
            ResidentModel(
                item=key, nbytes=nbytes, last_used=last, leased=pinned, file=file, tenant=tenant
            )
        )
    return DeviceResidency(
        device=name, capacity_bytes=tier.capacity, used_bytes=tier.used, models=models
    )


def residency(
    store: HostStore,
    tiers: Mapping[str, DeviceTier],
    *,
    node: str,
    owner: str,
    queries: list[ModelQuery],
    now: float,
    data_dir: Path | None = None,
) -> ResidencyReply:
    """Per GPU, the models complete on it, and what the queried models are called and weigh."""
    return ResidencyReply(
        node=node,
        owner=owner,
        devices=[device_residency(store, name, tier, now) for name, tier in tiers.items()],
        models=[model_item(store, q, data_dir) for q in queries],
    )


def model_item(store: HostStore, query: ModelQuery, data_dir: Path | None = None) -> ModelItem:
    """A queried model's item and size, or why it has none (an uploaded model is found
    under ``data_dir``, where this node unpacked it)."""
    try:
        weights = model_file(query.source, tenant=query.tenant, data_dir=data_dir)
    except PlatformError as exc:
        return ModelItem(item="", nbytes=0, known=False, error=exc.message)
    private = query.tenant if query.source.private else None
    try:
        key, nbytes, known = store.model_item(weights, private)
    except OSError as exc:
        return ModelItem(
            item="", nbytes=0, known=False, error=f"cannot read {weights.name}: {exc.strerror}"
        )
    return ModelItem(item=key, nbytes=nbytes, known=known)
