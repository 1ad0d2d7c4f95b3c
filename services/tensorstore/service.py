"""The tensor store service of one node: host and device tiers, leases and the reclaimer.

All changes to the store (registrations, placements on GPUs, leases, reclaiming) run on
one executor thread, in order, so the reclaimer never races a registration.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import nats.errors
import nats.js.errors
import structlog

from gpufaas.shared import subjects
from gpufaas.shared.catalog import model_file
from gpufaas.shared.config import Config
from gpufaas.shared.devices import parse_devices
from gpufaas.shared.errors import (
    InvalidArgument,
    ModelInvalid,
    NotFound,
    PlatformError,
    ResourceExhausted,
    Unavailable,
)
from gpufaas.shared.memory_client import MemoryClient
from gpufaas.shared.messages import (
    DeviceInfo,
    DevicePlacement,
    DeviceResidency,
    EvictModelReply,
    EvictModelRequest,
    LocalityReply,
    LocalityRequest,
    MemAllocation,
    ModelItem,
    ModelManifest,
    ModelQuery,
    PrefetchReply,
    PrefetchRequest,
    RegisterReply,
    RegisterRequest,
    ReleaseReply,
    ReleaseRequest,
    RenewReply,
    RenewRequest,
    ResidencyReply,
    ResidencyRequest,
    ResidentModel,
    StoreStats,
    StoreStatsRequest,
    TensorRef,
    decode_json,
    encode_json,
)
from gpufaas.shared.service import Service
from gpufaas.shared.shm import SegmentCache, new_id
from gpufaas.tensorstore.device_tier import DeviceTier, NeedsRoom
from gpufaas.tensorstore.store import HostStore, Registration, model_key

log = structlog.get_logger()
T = TypeVar("T")


class TensorStoreService(Service):
    """Registers models' tensors content-addressed in host shared memory, once per node."""

    name = "tensorstore"

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.store = HostStore(config.shm_dir, config.node_id)
        node_devices = parse_devices(config.devices, config.topology)
        self.device_info = {d.name: d for d in node_devices.devices if d.kind != "host"}
        cuda = node_devices.backend == "cuda"
        self.tiers = {
            d.name: DeviceTier(d.name, i, d.memory_bytes, cuda=cuda, budgeted=True)
            for i, d in enumerate(self.device_info.values())
        }
        # Our blocks in the memory service's pools; a new process is a new owner, so a
        # dead one's blocks lapse while ours are fresh.
        owner = f"tensorstore@{config.node_id}/{os.getpid()}/{time.time():.6f}"
        self.memory = MemoryClient(lambda: self.nc, config.node_id, owner, timeout_s=5)
        self._host_maps = SegmentCache(config.shm_dir)  # the source of copies to a GPU
        self._peer_manifests: dict[str, ModelManifest] = {}  # KV key -> another store's
        # One thread: registrations are serialised, so two loads of one model never race.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tensorstore")
        self._lock = threading.Lock()  # held by every change to the store

    async def on_start(self) -> None:
        await self._run(self.store.recover, time.time())
        log.info("tensorstore.recovered", tensors=len(self.store.index))
        node = self.config.node_id
        for verb, req_type, handler in (
            (subjects.TENSORSTORE_REGISTER, RegisterRequest, self.register),
            (subjects.TENSORSTORE_STATS, StoreStatsRequest, self.stats),
            (subjects.TENSORSTORE_RENEW, RenewRequest, self.renew),
            (subjects.TENSORSTORE_RELEASE, ReleaseRequest, self.release),
            (subjects.TENSORSTORE_LOCALITY, LocalityRequest, self.locality),
            (subjects.TENSORSTORE_RESIDENCY, ResidencyRequest, self.residency),
            (subjects.TENSORSTORE_EVICT, EvictModelRequest, self.evict),
            (subjects.TENSORSTORE_PREFETCH, PrefetchRequest, self.prefetch),
        ):
            await self.serve(subjects.node(node, self.name, verb), req_type, handler)  # type: ignore[arg-type]
        self.spawn(self._reclaim_loop(), "reclaimer")
        if self.tiers:
            lease = self.memory.keep_alive(lambda: self.looping, self.config.heartbeat_s)
            self.spawn(lease, "memory-lease")

    async def on_stop(self) -> None:
        # Off the loop: a registration still hashing finishes in its thread.
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)

    def devices(self) -> list[DeviceInfo]:
        """Heartbeat: each GPU with the bytes its device tier holds."""
        return [
            msgspec.structs.replace(self.device_info[name], used_bytes=tier.used)
            for name, tier in self.tiers.items()
        ]

    async def register(self, req: RegisterRequest) -> RegisterReply:
        tier = None
        if req.device is not None:
            tier = self.tiers.get(req.device)
            if tier is None or req.lease is None:
                raise InvalidArgument(
                    f"device {req.device!r} is not a GPU of node {self.config.node_id} "
                    f"(it has {sorted(self.tiers) or 'none'}), or no lease was given",
                    field="device",
                )
        weights = model_file(req.source)
        model_dir = weights.parent
        if not weights.is_file():
            raise ModelInvalid(f"{model_dir} has no {weights.name}", field="model")
        t0 = time.perf_counter()
        private = req.tenant if req.source.private else None

        def place(reg: Registration, block: MemAllocation | None) -> DevicePlacement | NeedsRoom:
            assert tier is not None
            assert req.lease is not None
            try:
                return tier.place(
                    req.lease,
                    req.holder,
                    reg.manifest,
                    self._read_host,
                    expires_at=self._lease_expiry(),
                    now=time.time(),
                    block=block,
                )
            except NeedsRoom as room:  # first a block from the memory service (below)
                return room
            except BaseException:
                self.store.leases.drop(req.lease)  # all or nothing
                raise

        def register_and_lease() -> tuple[Registration, DevicePlacement | NeedsRoom | None]:
            # One call under the store's lock: the reclaimer cannot free the tensors
            # between their registration and the lease that keeps them.
            reg = self.store.register_file(Path(weights), private)
            if req.lease is None:
                return reg, None
            ids = [ref.id for ref in reg.manifest.values()]
            self.store.lease(req.lease, req.holder, ids, self._lease_expiry())
            return reg, (None if tier is None else place(reg, None))

        # The common cold start, a model whose tensors are all resident, is a few dict
        # look-ups: done inline when the store thread is idle, saving a thread hop.
        resident = self.store.resident(weights, private)
        cheap = resident is not None and (tier is None or not tier.cuda or tier.holds(resident))
        done = self._inline(register_and_lease) if cheap else None
        reg, placed = done if done is not None else await self._run(register_and_lease)
        placement = None if isinstance(placed, NeedsRoom) else placed
        if isinstance(placed, NeedsRoom):  # new copies on the GPU: room from its budget first
            assert tier is not None
            assert req.lease is not None
            try:
                placement = await self._place_with_room(tier, reg, placed.nbytes, place)
            except BaseException:
                await self._run(self.store.leases.drop, req.lease)  # all or nothing
                raise
        took_us = int((time.perf_counter() - t0) * 1e6)
        self.after_reply(self._announce(req, model_dir, reg, took_us))
        return RegisterReply(
            model_dir=str(model_dir),
            manifest=reg.manifest,
            model_bytes=reg.model_bytes,
            bytes_stored=reg.bytes_stored,
            bytes_deduplicated=reg.bytes_deduplicated,
            register_us=took_us,
            file_read=reg.file_read,
            placement=placement,
            program=reg.program,
        )

    async def _place_with_room(
        self,
        tier: DeviceTier,
        reg: Registration,
        nbytes: int,
        place: Callable[[Registration, MemAllocation | None], DevicePlacement | NeedsRoom],
        *,
        evict: bool = True,
    ) -> DevicePlacement:
        """Get a block of the GPU's budget from the memory service, evicting this tier's idle
        copies (least recently used first) while it has none, then place the copies.

        ``evict=False`` (a prefetch): no room is a 507, nothing evicted; the memory manager,
        which asked, makes room first by its own order. On a real GPU the copies are
        written into the block (see ``device_tier``)."""
        keep = {ref.id for ref in reg.manifest.values()}
        for _ in range(3):  # a concurrent eviction may have made the need grow meanwhile
            block = await self._reserve(tier, nbytes, keep, evict=evict)
            try:
                placed = await self._run(place, reg, block)
            finally:  # a failed placement gave its block back too
                await self._release_blocks(tier)
            if not isinstance(placed, NeedsRoom):
                return placed
            await self.memory.free(tier.name, block.id)
            nbytes = placed.nbytes
        raise Unavailable(f"{tier.name} kept changing while placing the model; retry")

    async def _reserve(
        self, tier: DeviceTier, nbytes: int, keep: set[str], *, evict: bool = True
    ) -> MemAllocation:
        while True:
            try:
                block = await self.memory.alloc(tier.name, nbytes)
            except ResourceExhausted as full:
                if not evict:
                    raise ResourceExhausted(
                        f"{tier.name} has no room for the model's {nbytes} new bytes "
                        f"({full.message})",
                        field="device",
                    ) from None
                used = tier.used
                evicted = await self._run(tier.evict_one_idle, time.time(), keep)
                await self._release_blocks(tier)
                if evicted:
                    await self.publish_event(
                        "memory.evicted",
                        {
                            "node": self.config.node_id,
                            "device": tier.name,
                            "bytes": used - tier.used,
                            "reason": "room for a model's copies",
                            "what": "idle model copies",
                        },
                    )
                if not evicted:
                    raise ResourceExhausted(
                        f"{tier.name} has no room for the model's {nbytes} new bytes, and no "
                        f"idle copy of ours to evict ({full.message})",
                        field="model",
                    ) from None
            else:
                return block

    async def _release_blocks(self, tier: DeviceTier) -> None:
        while tier.released_blocks:
            await self.memory.free(tier.name, tier.released_blocks.pop())

    async def _peer_manifest(self, weights: Path, private_to: str | None) -> ModelManifest | None:
        """The manifest another store published for this file (None: none has read it)."""
        try:
            key = f"m.{model_key(weights, private_to)}"
        except OSError:
            return None
        cached = self._peer_manifests.get(key)
        if cached is not None:
            return cached
        try:
            entry = await self.buckets.tensors.get(key)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        except (nats.errors.Error, nats.js.errors.Error) as exc:
            log.info("tensorstore.peer_manifest_unavailable", error=repr(exc))
            return None
        if entry.value is None:
            return None
        manifest = decode_json(entry.value, ModelManifest)
        self._peer_manifests[key] = manifest
        return manifest

    async def _publish_manifest(self, req: RegisterRequest, reg: Registration) -> None:
        """Share a manifest this store has just computed (see ``locality``)."""
        private_to = req.tenant if req.source.private else None
        try:
            key = f"m.{model_key(model_file(req.source), private_to)}"
        except OSError:
            return
        manifest = ModelManifest(
            ids={n: r.id for n, r in reg.manifest.items()},
            sizes={r.id: r.nbytes for r in reg.manifest.values()},
        )
        try:
            await self.buckets.tensors.put(key, encode_json(manifest))
        except (nats.errors.Error, nats.js.errors.Error) as exc:
            log.info("tensorstore.manifest_not_shared", error=repr(exc))

    async def _announce(
        self, req: RegisterRequest, model_dir: Path, reg: Registration, took_us: int
    ) -> None:
        """Log a registration, share a manifest just computed, and publish what it
        deduplicated (after the reply went out)."""
        log.info(
            "tensorstore.registered",
            model=str(model_dir),
            stored=reg.bytes_stored,
            deduplicated=reg.bytes_deduplicated,
            us=took_us,
            file_read=reg.file_read,
        )
        if reg.file_read:
            await self._publish_manifest(req, reg)
        if reg.bytes_deduplicated:
            await self.publish_event(
                "tensor.deduplicated",
                {
                    "node": self.config.node_id,
                    "model": str(model_dir),
                    "bytes_saved": reg.bytes_deduplicated,
                    "tenant": req.tenant,
                },
            )

    def _read_host(self, ref: TensorRef) -> memoryview:
        """A tensor's bytes in its host segment (the source of a copy to a GPU)."""
        return memoryview(self._host_maps.map(ref.segment))[ref.offset : ref.offset + ref.nbytes]

    async def locality(self, req: LocalityRequest) -> LocalityReply:
        """θ for the scheduler: how much of a model is resident here, without reading it.

        A file this store never read is known by the manifest another node's store
        published when it read it (``ModelManifest``): θ then counts what this store holds
        of the same tensors (another model's, a fine-tuned variant's or base's)."""
        weights = model_file(req.source)
        private_to = req.tenant if req.source.private else None
        known, total, resident = self.store.locality(weights, private_to)
        if not known and total:
            peer = await self._peer_manifest(weights, private_to)
            if peer is not None:
                known = True
                total, resident = self.store.resident_bytes(peer.ids.values(), peer.sizes)
        return LocalityReply(
            known=known,
            model_bytes=total,
            resident_bytes=resident,
            bytes_to_load=total - resident,
            theta=resident / total if total else 0.0,
        )

    async def stats(self, _: StoreStatsRequest) -> StoreStats:
        def collect() -> StoreStats:
            s = self.store
            referenced = sum(r.nbytes for t, r in s.index.items() if s.leases.refcount(t))
            private = sum(
                s.index[t].nbytes for lease in s.leases.leases.values() for t in lease.tensors
            )
            return StoreStats(
                devices=[t.stats() for t in self.tiers.values()],
                node=self.config.node_id,
                tensors=len(s.index),
                segments=len(s.segments),
                bytes_stored=s.bytes_stored,
                bytes_requested=s.bytes_requested,
                leases=len(s.leases.leases),
                bytes_referenced=referenced,
                bytes_without_sharing=private,
            )

        return await self._run(collect)

    # --- the memory manager's verbs: residency, evict, prefetch -----------------------

    def _tier(self, device: str) -> DeviceTier:
        tier = self.tiers.get(device)
        if tier is None:
            raise InvalidArgument(
                f"device {device!r} is not a GPU of node {self.config.node_id} "
                f"(it has {sorted(self.tiers) or 'none'})",
                field="device",
            )
        return tier

    async def residency(self, req: ResidencyRequest) -> ResidencyReply:
        """Per GPU, the models complete on it (the memory manager's items), and what the
        queried models are called and weigh."""

        def collect() -> ResidencyReply:
            now = time.time()
            devices = []
            for name, tier in self.tiers.items():
                models = []
                for key, nbytes, last, pinned in tier.resident_models(self.store.models, now):
                    file, tenant = self.store.sources.get(key, ("", None))
                    models.append(
                        ResidentModel(
                            item=key,
                            nbytes=nbytes,
                            last_used=last,
                            leased=pinned,
                            file=file,
                            tenant=tenant,
                        )
                    )
                devices.append(
                    DeviceResidency(
                        device=name,
                        capacity_bytes=tier.capacity,
                        used_bytes=tier.used,
                        models=models,
                    )
                )
            return ResidencyReply(
                node=self.config.node_id,
                owner=self.memory.owner,
                devices=devices,
                models=[self._model_item(q) for q in req.models],
            )

        return await self._run(collect)

    def _model_item(self, query: ModelQuery) -> ModelItem:
        """(On the store thread.) A queried model's item and size, or why it has none."""
        try:
            weights = model_file(query.source)
        except PlatformError as exc:
            return ModelItem(item="", nbytes=0, known=False, error=exc.message)
        private = query.tenant if query.source.private else None
        try:
            key, nbytes, known = self.store.model_item(weights, private)
        except OSError as exc:
            return ModelItem(
                item="", nbytes=0, known=False, error=f"cannot read {weights.name}: {exc.strerror}"
            )
        return ModelItem(item=key, nbytes=nbytes, known=known)

    async def evict(self, req: EvictModelRequest) -> EvictModelReply:
        """Drop a model's idle copies from a GPU, all or nothing; never a leased copy.

        Idempotent: a model not (or no longer) resident frees nothing. Its host tensors stay.
        """
        tier = self._tier(req.device)

        def drop() -> int | None:
            ids = self.store.models.get(req.item)
            if ids is None:
                raise NotFound(f"no model {req.item!r} on node {self.config.node_id}", field="item")
            return tier.evict_tensors(set(ids.values()), time.time())

        freed = await self._run(drop)
        await self._release_blocks(tier)  # the freed copies' room, back to the GPU budget
        if freed is None:
            return EvictModelReply(evicted=False, nbytes=0, reason="leased")
        if freed == 0:
            return EvictModelReply(evicted=False, nbytes=0, reason="not resident")
        log.info("tensorstore.evicted", device=tier.name, item=req.item, bytes=freed)
        return EvictModelReply(evicted=True, nbytes=freed)

    async def prefetch(self, req: PrefetchRequest) -> PrefetchReply:
        """Place a model's copies on a GPU without a lease (the register path's placement):
        kept as idle copies, so the next instance built there copies nothing.

        Room comes from the GPU's budget without evicting (507 when there is none); all or
        nothing. Idempotent: a model already resident copies nothing.
        """
        tier = self._tier(req.device)
        weights = model_file(req.source)
        if not weights.is_file():
            raise ModelInvalid(f"{weights.parent} has no {weights.name}", field="source")
        private = req.tenant if req.source.private else None
        hold = f"prefetch:{new_id(12)}"  # keeps the host tensors until the copies are made

        def place(reg: Registration, block: MemAllocation | None) -> DevicePlacement | NeedsRoom:
            try:
                return tier.prefetch(reg.manifest, self._read_host, now=time.time(), block=block)
            except NeedsRoom as room:
                return room

        def register_and_place() -> tuple[Registration, DevicePlacement | NeedsRoom]:
            reg = self.store.register_file(Path(weights), private)
            ids = [ref.id for ref in reg.manifest.values()]
            self.store.lease(hold, "prefetch", ids, self._lease_expiry())
            return reg, place(reg, None)

        try:
            reg, placed = await self._run(register_and_place)
            if isinstance(placed, NeedsRoom):
                placed = await self._place_with_room(tier, reg, placed.nbytes, place, evict=False)
        finally:
            await self._run(self.store.leases.drop, hold)
        key, nbytes, _ = await self._run(self.store.model_item, Path(weights), private)
        log.info("tensorstore.prefetched", device=tier.name, item=key, copied=placed.bytes_copied)
        return PrefetchReply(
            item=key, nbytes=nbytes, bytes_copied=placed.bytes_copied, used_bytes=placed.used_bytes
        )

    # --- leases and reclaiming ---------------------------------------------------------

    def _lease_expiry(self) -> float:
        # A worker renews every heartbeat; a lease survives a few missed renewals.
        return time.time() + self.config.node_ttl_s

    async def renew(self, req: RenewRequest) -> RenewReply:
        def put_all() -> RenewReply:
            expiry, now = self._lease_expiry(), time.time()
            missing: list[str] = []
            lost: list[str] = []
            for claim in req.leases:
                gone = self.store.lease(claim.id, req.holder, claim.tensors, expiry)
                missing += gone
                tier = self.tiers.get(claim.device) if claim.device else None
                if tier is None:
                    continue
                refs = {tid: self.store.index[tid] for tid in claim.tensors if tid not in gone}
                if gone or not tier.renew(
                    claim.id, req.holder, refs, self._read_host, expires_at=expiry, now=now
                ):
                    lost.append(claim.id)
            return RenewReply(missing=missing, lost=lost)

        return await self._run(put_all)

    async def release(self, req: ReleaseRequest) -> ReleaseReply:
        def drop() -> bool:
            now = time.time()
            on_devices = [tier.release(req.lease, now) for tier in self.tiers.values()]
            return self.store.leases.drop(req.lease) or any(on_devices)

        return ReleaseReply(released=await self._run(drop))

    async def reclaim_once(self, now: float) -> list[tuple[str, str, int, str]]:
        """One reclaimer pass over every tier (also called by tests with a chosen ``now``).

        Returns (tier, segment, bytes, reason) for each segment freed.
        """

        def reclaim() -> list[tuple[str, str, int, str]]:
            keep = self.config.tensor_keep_alive_s
            freed = [
                (name, *seg) for name, t in self.tiers.items() for seg in t.reclaim_once(now, keep)
            ]
            # Device copies first: a device lease that lapsed may have been the last user.
            host = self.store.reclaim_once(
                now,
                keep_alive_s=keep,
                capacity_bytes=self.config.host_tensor_bytes,
                grace_s=self.config.node_ttl_s,
            )
            for seg, _, _ in host:
                self._host_maps.forget(f"{self.store.reldir}/{seg}")
            return freed + [("host", *seg) for seg in host]

        freed = await self._run(reclaim)
        for t in self.tiers.values():  # give the freed copies' room back to the GPU budget
            await self._release_blocks(t)
        for tier, seg, nbytes, reason in freed:
            log.info("tensorstore.reclaimed", tier=tier, segment=seg, bytes=nbytes, reason=reason)
            await self.publish_event(
                "tensor.reclaimed",
                {"node": self.config.node_id, "tier": tier, "bytes": nbytes, "reason": reason},
            )
        return freed

    async def _reclaim_loop(self) -> None:
        while self.looping:
            await asyncio.sleep(self.config.reclaim_interval_s)
            await self.reclaim_once(time.time())

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run store work on the store's one thread, in order with every other change."""

        def locked() -> T:
            with self._lock:
                return fn(*args)

        return await asyncio.get_running_loop().run_in_executor(self._executor, locked)

    def _inline(self, fn: Callable[[], T]) -> T | None:
        """Run short store work on the event loop if the store thread is idle, else None.

        The lock keeps it apart from the thread's work; it is never waited for here.
        """
        if not self._lock.acquire(blocking=False):
            return None
        try:
            return fn()
        finally:
            self._lock.release()
