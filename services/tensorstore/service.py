"""The tensor store service of one node: host and device tiers, leases and the reclaimer.

All changes to the store (registrations, placements on GPUs, leases, reclaiming) run on
one executor thread, in order, so the reclaimer never races a registration
(``store_thread``). Room on a GPU comes from the memory service (``gpu_room``); manifests
are shared between nodes through KV (``manifests``); reports are pure reads (``reports``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import msgspec
import structlog

from gpufaas.shared import subjects
from gpufaas.shared.catalog import model_file
from gpufaas.shared.config import Config
from gpufaas.shared.devices import parse_devices
from gpufaas.shared.errors import InvalidArgument, ModelInvalid, NotFound
from gpufaas.shared.identity import Device
from gpufaas.shared.kv import Codec
from gpufaas.shared.memory_client import MemoryClient
from gpufaas.shared.messages import (
    DeviceInfo,
    DevicePlacement,
    EvictModelReply,
    EvictModelRequest,
    LocalityReply,
    LocalityRequest,
    MemAllocation,
    ModelManifest,
    ModelSource,
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
    StoreStats,
    StoreStatsRequest,
    TensorRef,
)
from gpufaas.shared.paths import check_root
from gpufaas.shared.service import Endpoint, Service, endpoint
from gpufaas.shared.shm import SegmentCache, new_id
from gpufaas.shared.uploads import materialize
from gpufaas.tensorstore.device_tier import DeviceTier, NeedsRoom
from gpufaas.tensorstore.gpu_room import GpuRoom, Place
from gpufaas.tensorstore.manifests import SharedManifests
from gpufaas.tensorstore.reports import residency, store_stats
from gpufaas.tensorstore.store import HostStore, Registration
from gpufaas.tensorstore.store_thread import StoreThread

log = structlog.get_logger()


class TensorStoreService(Service):
    """Registers models' tensors content-addressed in host shared memory, once per node."""

    name = "tensorstore"

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        check_root(config.shm_dir)  # ours alone (0700), or refused: exit 2 naming it
        self.store = HostStore(config.shm_dir, config.node_id)
        node_devices = parse_devices(config.devices, config.topology)
        gpus = [(Device.parse(d.name), d) for d in node_devices.devices]
        self.device_info = {d.name: d for device, d in gpus if device.is_gpu}
        cuda = node_devices.backend == "cuda"
        self.tiers = {
            d.name: DeviceTier(d.name, device.index, d.memory_bytes, cuda=cuda, budgeted=True)
            for device, d in gpus
            if device.is_gpu and device.index is not None
        }
        # Our blocks in the memory service's pools; a new process is a new owner, so a
        # dead one's blocks lapse while ours are fresh.
        owner = f"tensorstore@{config.node_id}/{os.getpid()}/{time.time():.6f}"
        self.memory = MemoryClient(lambda: self.nc, config.node_id, owner, timeout_s=5)
        self._host_maps = SegmentCache(config.shm_dir)  # the source of copies to a GPU
        self.thread = StoreThread()  # every change to the store, in order
        self.room = GpuRoom(self.memory, self.thread, self.publish_event, config.node_id)
        self.manifests: SharedManifests  # from start: it needs the tensors bucket

    async def on_start(self) -> None:
        self.manifests = SharedManifests(self.kv.view(self.kv.tensors, Codec.json(ModelManifest)))
        await self.thread.run(self.store.recover, time.time())
        log.info("tensorstore.recovered", tensors=len(self.store.index))
        self.every(self.config.reclaim_interval_s, self._reclaim, "reclaimer")
        if self.tiers:
            beat = self.config.heartbeat_s
            self.every(beat, self.memory.renew_step, "memory-lease", first=0, backoff_cap=beat)

    def endpoints(self) -> list[Endpoint]:
        def verb(name: str) -> str:
            return subjects.node(self.config.node_id, self.name, name)

        return [
            endpoint(verb(subjects.TENSORSTORE_REGISTER), RegisterRequest, self.register),
            endpoint(verb(subjects.TENSORSTORE_STATS), StoreStatsRequest, self.stats),
            endpoint(verb(subjects.TENSORSTORE_RENEW), RenewRequest, self.renew),
            endpoint(verb(subjects.TENSORSTORE_RELEASE), ReleaseRequest, self.release),
            endpoint(verb(subjects.TENSORSTORE_LOCALITY), LocalityRequest, self.locality),
            endpoint(verb(subjects.TENSORSTORE_RESIDENCY), ResidencyRequest, self.residency),
            endpoint(verb(subjects.TENSORSTORE_EVICT), EvictModelRequest, self.evict),
            endpoint(verb(subjects.TENSORSTORE_PREFETCH), PrefetchRequest, self.prefetch),
        ]

    async def on_stop(self) -> None:
        await self.thread.shutdown()

    def devices(self) -> list[DeviceInfo]:
        """Heartbeat: each GPU with the bytes its device tier holds."""
        return [
            msgspec.structs.replace(self.device_info[name], used_bytes=tier.used)
            for name, tier in self.tiers.items()
        ]

    # --- registration --------------------------------------------------------------------

    async def register(self, req: RegisterRequest) -> RegisterReply:
        """Register a model file's tensors (once per node); with a lease, keep them, and
        with a device too, place copies of them on that GPU (all or nothing)."""
        tier = self._register_tier(req)
        weights = await self._weights(req.source, req.tenant, unpack=True)
        if not weights.is_file():
            raise ModelInvalid(f"{weights.parent} has no {weights.name}", field="model")
        t0 = time.perf_counter()
        private = req.tenant if req.source.private else None
        place = None if tier is None else self._leased_placer(tier, req)

        def register_and_lease() -> tuple[Registration, DevicePlacement | NeedsRoom | None]:
            return self._register_and_lease(weights, private, req, place)

        # The common cold start, a model whose tensors are all resident, is a few dict
        # look-ups: done inline when the store thread is idle, saving a thread hop.
        resident = self.store.resident(weights, private)
        cheap = resident is not None and (tier is None or not tier.cuda or tier.holds(resident))
        done = self.thread.inline(register_and_lease) if cheap else None
        reg, placed = done if done is not None else await self.thread.run(register_and_lease)
        if isinstance(placed, NeedsRoom):  # new copies on the GPU: room from its budget first
            placed = await self._place_leased(tier, req.lease, reg, placed, place)
        took_us = int((time.perf_counter() - t0) * 1e6)
        self.after_reply(self._announce(req, weights, reg, took_us))
        return RegisterReply(
            model_dir=str(weights.parent),
            manifest=reg.manifest,
            model_bytes=reg.model_bytes,
            bytes_stored=reg.bytes_stored,
            bytes_deduplicated=reg.bytes_deduplicated,
            register_us=took_us,
            file_read=reg.file_read,
            placement=placed,
            program=reg.program,
        )

    async def _weights(self, source: ModelSource, tenant: str, *, unpack: bool = False) -> Path:
        """The weights file of ``source`` on this node; a tenant's uploaded model is unpacked
        from the object tier first (once per node) when ``unpack``, else only named."""
        if unpack and source.upload is not None:
            await materialize(
                self.js,
                self.config.data_dir,
                tenant,
                source.upload,
                max_bytes=self.config.max_model_bytes,
            )
        return model_file(source, tenant=tenant, data_dir=self.config.data_dir)

    def _register_tier(self, req: RegisterRequest) -> DeviceTier | None:
        """The GPU a registration places copies on (None: host only), checked."""
        if req.device is None:
            return None
        tier = self.tiers.get(req.device)
        if tier is None or req.lease is None:
            raise InvalidArgument(
                f"device {req.device!r} is not a GPU of node {self.config.node_id} "
                f"(it has {sorted(self.tiers) or 'none'}), or no lease was given",
                field="device",
            )
        return tier

    def _leased_placer(self, tier: DeviceTier, req: RegisterRequest) -> Place:
        """(Runs on the store thread.) Places a registration's copies on ``tier`` under the
        request's lease; a failure other than needing room drops the lease."""
        lease = req.lease
        assert lease is not None

        def place(reg: Registration, block: MemAllocation | None) -> DevicePlacement | NeedsRoom:
            try:
                return tier.place(
                    lease,
                    req.holder,
                    reg.manifest,
                    self._read_host,
                    expires_at=self._lease_expiry(),
                    now=time.time(),
                    block=block,
                )
            except NeedsRoom as room:  # first a block from the memory service
                return room
            except BaseException:
                self.store.leases.drop(lease)  # all or nothing
                raise

        return place

    def _register_and_lease(
        self, weights: Path, private: str | None, req: RegisterRequest, place: Place | None
    ) -> tuple[Registration, DevicePlacement | NeedsRoom | None]:
        """(On the store thread, in one call under its lock: the reclaimer cannot free the
        tensors between their registration and the lease that keeps them.)"""
        reg = self.store.register_file(Path(weights), private)
        if req.lease is None:
            return reg, None
        ids = [ref.id for ref in reg.manifest.values()]
        self.store.lease(req.lease, req.holder, ids, self._lease_expiry())
        return reg, (None if place is None else place(reg, None))

    async def _place_leased(
        self,
        tier: DeviceTier | None,
        lease: str | None,
        reg: Registration,
        need: NeedsRoom,
        place: Place | None,
    ) -> DevicePlacement:
        """Room on the GPU's budget for a registration's new copies, then the copies; the
        lease is dropped if that fails (all or nothing)."""
        assert tier is not None
        assert lease is not None
        assert place is not None
        try:
            return await self.room.place(tier, reg, need.nbytes, place)
        except BaseException:
            await self.thread.run(self.store.leases.drop, lease)
            raise

    async def _announce(
        self, req: RegisterRequest, weights: Path, reg: Registration, took_us: int
    ) -> None:
        """Log a registration, share a manifest just computed, and publish what it
        deduplicated (after the reply went out)."""
        model_dir = weights.parent
        log.info(
            "tensorstore.registered",
            model=str(model_dir),
            stored=reg.bytes_stored,
            deduplicated=reg.bytes_deduplicated,
            us=took_us,
            file_read=reg.file_read,
        )
        if reg.file_read:
            await self.manifests.publish(weights, req.tenant if req.source.private else None, reg)
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
        weights = await self._weights(req.source, req.tenant)
        private_to = req.tenant if req.source.private else None
        known, total, resident = self.store.locality(weights, private_to)
        if not known and total:
            peer = await self.manifests.get(weights, private_to)
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
        """The store's figures per tier (``/v1/nodes``, ``gpufaas status``)."""
        return await self.thread.run(store_stats, self.store, self.tiers, self.config.node_id)

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
            return residency(
                self.store,
                self.tiers,
                node=self.config.node_id,
                owner=self.memory.owner,
                queries=req.models,
                data_dir=self.config.data_dir,
                now=time.time(),
            )

        return await self.thread.run(collect)

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

        freed = await self.thread.run(drop)
        await self.room.release_blocks(tier)  # the freed copies' room, back to the GPU budget
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
        weights = await self._weights(req.source, req.tenant, unpack=True)
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
            reg, placed = await self.thread.run(register_and_place)
            if isinstance(placed, NeedsRoom):
                placed = await self.room.place(tier, reg, placed.nbytes, place, evict=False)
        finally:
            await self.thread.run(self.store.leases.drop, hold)
        key, nbytes, _ = await self.thread.run(self.store.model_item, Path(weights), private)
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

        return await self.thread.run(put_all)

    async def release(self, req: ReleaseRequest) -> ReleaseReply:
        def drop() -> bool:
            now = time.time()
            on_devices = [tier.release(req.lease, now) for tier in self.tiers.values()]
            return self.store.leases.drop(req.lease) or any(on_devices)

        return ReleaseReply(released=await self.thread.run(drop))

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

        freed = await self.thread.run(reclaim)
        for t in self.tiers.values():  # give the freed copies' room back to the GPU budget
            await self.room.release_blocks(t)
        for tier, seg, nbytes, reason in freed:
            log.info("tensorstore.reclaimed", tier=tier, segment=seg, bytes=nbytes, reason=reason)
            await self.publish_event(
                "tensor.reclaimed",
                {"node": self.config.node_id, "tier": tier, "bytes": nbytes, "reason": reason},
            )
        return freed

    async def _reclaim(self) -> None:
        """The reclaimer's step (run by ``every``: a NATS failure is retried, not fatal)."""
        await self.reclaim_once(time.time())
