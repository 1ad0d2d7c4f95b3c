"""Model manifests shared between the nodes' tensor stores through the tensors bucket.

A store that reads a model file publishes its manifest (tensor ids and sizes) under
``m.<model key>``; another node's store then knows what the file holds without reading
it, and answers the scheduler's locality question (θ) from it.
"""

from __future__ import annotations

from pathlib import Path

import nats.errors
import structlog

from gpufaas.shared.kv import Bucket
from gpufaas.shared.messages import ModelManifest
from gpufaas.tensorstore.store import Registration, model_key

log = structlog.get_logger()


def manifest_key(weights: Path, private_to: str | None) -> str | None:
    """The record's key, or None when the file cannot be read (then nothing is shared)."""
    try:
        return f"m.{model_key(weights, private_to)}"
    except OSError:
        return None


class SharedManifests:
    """Reads (cached: a file's manifest never changes under its key) and publishes them."""

    def __init__(self, bucket: Bucket[ModelManifest]) -> None:
        self.bucket = bucket
        self._cache: dict[str, ModelManifest] = {}  # key -> another store's manifest

    async def get(self, weights: Path, private_to: str | None) -> ModelManifest | None:
        """The manifest another store published for this file (None: none has read it)."""
        key = manifest_key(weights, private_to)
        if key is None:
            return None
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        try:
            manifest = await self.bucket.value(key)
        except nats.errors.Error as exc:  # JetStream errors included: θ is then unknown
            log.info("tensorstore.peer_manifest_unavailable", error=repr(exc))
            return None
        if manifest is not None:
            self._cache[key] = manifest
        return manifest

    async def publish(self, weights: Path, private_to: str | None, reg: Registration) -> None:
        """Share a manifest this store has just computed (best effort)."""
        key = manifest_key(weights, private_to)
        if key is None:
            return
        manifest = ModelManifest(
            ids={n: r.id for n, r in reg.manifest.items()},
            sizes={r.id: r.nbytes for r in reg.manifest.values()},
        )
        try:
            await self.bucket.put(key, manifest)
        except nats.errors.Error as exc:
            log.info("tensorstore.manifest_not_shared", error=repr(exc))
