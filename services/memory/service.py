"""The memory service of one node: a pool of segments per GPU, allocations, and leases.

One budget per GPU: allocations are sub-allocated from segments added as demand grows
and given back after an idle keep-alive (``pool.py``). Every change is written to the
``memory`` KV bucket before the reply (segments and allocations, one key each), so a
restarted manager rebuilds its pools exactly and loses nothing. Allocations belong to an
owner that renews them; an owner that stops (a worker that died) has its allocations
freed once its lease lapses (after the node TTL, and never during the grace period
after a restart, while owners re-announce).

Intermediates get elastic reservations: workers report each request's start and end
(``observe``), and every reconcile pass holds, per function and GPU, ``R_size · R_con``
bytes (p95 size times peak concurrency over a sliding window; ``reservations.py``), resized
as the load changes and released when the function goes idle, so an idle platform holds
little memory. A reservation is a *hold* of the pool, room of the budget with no memory
behind it: the worker's allocator (torch's caching allocator on a real GPU, emptied when
the worker is idle) makes the intermediates there, so they are counted once. Holds are
not kept in KV: a restarted manager sizes them again from the requests it sees.

Queue-aware residency of model copies and tube copies (``policy.py``, snapshot from
``planner.py``): every pass also reads what each GPU's tensor store holds, which of the
pool's blocks hold tube copies (the transfer service names them when it allocates), and
what the scheduler's queue views say queued and running requests will touch (their
functions' models, their input tubes); it evicts what no queued request needs first (LRU
among them), then what is needed latest, never a leased model copy; a tube's copy goes
to the host tier (the transfer service's ``release``: swapped there first when the node
has no host copy). It prefetches a queued request's model and input tubes before it
reaches the head of its queue, and refuses (announces) working sets that can never fit.
The latest view of each replica is kept in KV with the rejections and the published
model cache, so a restarted manager decides as before and repeats nothing.

The backend is chosen once, by the node's probed devices: on a simulated GPU the pool
accounts the capacity (``SimBackend``); on a real GPU its segments are real ``cudaMalloc``
allocations (``CudaBackend``, 256 MiB or the request if larger, blocks aligned to 512 B),
and every allocation reply carries the segment's CUDA IPC handle with the block's offset:
the tensor store and the transfer service write their copies there, and workers map them
by (handle, offset). Segment creation and release are device calls: they run on one thread
per GPU, never on the event loop. A manager restarted on a real GPU cannot take over the
old process's memory: restored segments are new memory with new handles (same ids, sizes
and blocks), and what holders had written there is gone.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Final, TypeVar

import nats.errors
import nats.js.errors
import structlog

from gpufaas.memory import planner, policy
from gpufaas.memory.pool import (
    CUDA_ALIGN_BYTES,
    Allocation,
    CudaBackend,
    HostBackend,
    PoolEvent,
    SegmentPool,
    SimBackend,
)
from gpufaas.memory.reservations import Reservation, ReservationTracker
from gpufaas.shared import subjects
from gpufaas.shared.config import Config
from gpufaas.shared.constants import KV_MEMORY
from gpufaas.shared.devices import NodeDevices, parse_devices
from gpufaas.shared.errors import (
    InvalidArgument,
    NotFound,
    PlatformError,
    ResourceExhausted,
    Unavailable,
)
from gpufaas.shared.jetstream import bucket_keys
from gpufaas.shared.memory_client import TUBE_ITEM
from gpufaas.shared.messages import (
    CachedModel,
    CapacityReply,
    CapacityRequest,
    DeviceInfo,
    EnsureReply,
    EnsureRequest,
    EvictModelReply,
    EvictModelRequest,
    M,
    MemAllocation,
    MemAllocRequest,
    MemFreeReply,
    MemFreeRequest,
    MemListReply,
    MemListRequest,
    MemObserve,
    MemPoolStats,
    MemRejection,
    MemRenewReply,
    MemRenewRequest,
    MemStatsReply,
    MemStatsRequest,
    MemViewAck,
    ModelCache,
    Msg,
    PrefetchReply,
    PrefetchRequest,
    QueueView,
    ResidencyReply,
    ResidencyRequest,
    TubeReleaseReply,
    TubeReleaseRequest,
    decode_json,
    encode_json,
)
from gpufaas.shared.rpc import request
from gpufaas.shared.service import Service
from gpufaas.shared.shm import HOST_POOL_DIR

log = structlog.get_logger()
T = TypeVar("T")

# The owner of an older manager's reservation blocks (reservations are holds now, see
# _resize_reservations): freed when found in KV on restore.
RESERVATION_OWNER = "reservation:"
RESERVATION_WINDOW_S = 60.0
HOST_SEGMENT_BYTES: Final = 64 << 20  # the host pool's segments (/dev/shm files)
DEFAULT_H2D_BPS: Final = 12e9  # host->GPU rate when the topology names no link (PCIe 3 x16)
STORE_TIMEOUT_S: Final = 5.0  # residency and evictions: bookkeeping on the store's thread
VIEW_TICKS: Final = 3  # a replica's queue view older than this many ticks is dropped


def _dev(device: str) -> str:
    return device.replace(":", "")  # "gpu:0" -> "gpu0": a KV key token


def _token(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", name)  # a replica or function as one KV key token


class MemoryService(Service):
    """Owns the node's device budgets: pools, allocations and their owners' leases."""

    name = "memory"

    def __init__(self, config: Config, *, cuda_segment_bytes: int | None = None) -> None:
        super().__init__(config)
        self.node_devices: NodeDevices = parse_devices(config.devices, config.topology)
        gpus = [d for d in self.node_devices.devices if d.kind != "host"]
        self.cuda = self.node_devices.backend == "cuda"
        if self.cuda:  # real memory, by IPC handle; its device calls on a thread per GPU
            self.pools = {
                d.name: SegmentPool(
                    d.name,
                    d.memory_bytes,
                    CudaBackend(_index(d.name)),
                    segment_bytes=cuda_segment_bytes or config.memory_segment_bytes,
                    align_bytes=CUDA_ALIGN_BYTES,
                    clock=time.time,
                )
                for d in gpus
            }
        else:
            self.pools = {
                d.name: SegmentPool(d.name, d.memory_bytes, SimBackend(), clock=time.time)
                for d in gpus
            }
        # The host tier's pool: where GPUs swap out what has no host copy (only on a node
        # with GPUs). Its segments are /dev/shm files, kept across our restarts.
        self.host_pool: SegmentPool | None = None
        if gpus:
            host = next(d for d in self.node_devices.devices if d.kind == "host")
            backend = HostBackend(config.shm_dir / HOST_POOL_DIR / config.node_id)
            self.host_pool = SegmentPool(
                "host",
                config.host_pool_bytes or _default_host_pool(host, backend.root),
                backend,
                segment_bytes=HOST_SEGMENT_BYTES,
                clock=time.time,
            )
        self._device_threads = {
            d: ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"memory-{_dev(d)}")
            for d in [*(self.pools if self.cuda else ()), *(["host"] if self.host_pool else [])]
        }
        self._expiry: dict[str, float] = {}  # owner -> when its lease lapses
        # A request lasts until its deadline at most (request_timeout_s): one that never
        # reports its end (a dead worker) stops counting after twice that.
        self.observed = {
            d: ReservationTracker(
                window_s=RESERVATION_WINDOW_S, max_request_s=2 * config.request_timeout_s
            )
            for d in self.pools
        }
        self._reserved: dict[tuple[str, str], int] = {}  # (device, fn) -> bytes held
        self._short: dict[tuple[str, str], int] = {}  # (device, fn) -> bytes the pool refused
        # Movable blocks (tube copies), for the policy: (device, block) -> (item, when made,
        # bytes moving it to the host would copy).
        self._items: dict[tuple[str, int], tuple[str, float, int]] = {}
        self._lock = asyncio.Lock()  # pool changes and their KV writes, in order
        # The queue-aware residency pass (see _policy_pass); never under ``_lock``: the store
        # it calls gives blocks back to this service while it evicts.
        self._policy_lock = asyncio.Lock()
        self._views: dict[str, QueueView] = {}  # scheduler replica -> its latest view of us
        self._rejected: dict[tuple[str, str], MemRejection] = {}  # (device, fn) -> announced
        self._cache: dict[str, list[CachedModel]] = {}  # device -> the published model cache
        self._pressed: set[str] = set()  # devices whose pressure was announced
        self.typical_compute_s = planner.TYPICAL_COMPUTE_S
        topo = self.node_devices.topology
        self._h2d_bps = {
            d: (ln.gbps * 1e9 if (ln := topo.link("host", d)) else DEFAULT_H2D_BPS)
            if topo is not None
            else DEFAULT_H2D_BPS
            for d in self.pools
        }

    def devices(self) -> list[DeviceInfo]:
        return self.node_devices.devices

    async def on_start(self) -> None:
        await self._restore()
        node = self.config.node_id
        for verb, req_type, handler in (
            (subjects.MEMORY_CAPACITY, CapacityRequest, self.capacity),
            (subjects.MEMORY_ALLOC, MemAllocRequest, self.alloc),
            (subjects.MEMORY_FREE, MemFreeRequest, self.free),
            (subjects.MEMORY_RENEW, MemRenewRequest, self.renew),
            (subjects.MEMORY_STATS, MemStatsRequest, self.stats),
            (subjects.MEMORY_LIST, MemListRequest, self.list_allocations),
            (subjects.MEMORY_OBSERVE, MemObserve, self.observe),
            (subjects.MEMORY_QUEUE_VIEW, QueueView, self.queue_view),
        ):
            await self.serve(subjects.node(node, self.name, verb), req_type, handler)  # type: ignore[arg-type]
        self.spawn(self._reconcile_loop(), "reconcile")

    async def on_stop(self) -> None:
        """A real GPU's segments go back to the driver (a restart re-creates them from KV);
        the host pool's files stay, with what was swapped into them (a restart adopts them)."""
        if self.cuda:
            async with self._lock:
                for pool in self.pools.values():
                    await self._on_device(pool, pool.close)
        for executor in self._device_threads.values():
            await asyncio.to_thread(executor.shutdown, wait=True)

    async def _on_device(self, pool: SegmentPool, fn: Callable[..., T], *args: object) -> T:
        """Run pool work that may call the device (grow, release) on the GPU's thread;
        a simulated pool's bookkeeping runs inline (a few microseconds)."""
        executor = self._device_threads.get(pool.device)
        if executor is None:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    async def capacity(self, _: CapacityRequest) -> CapacityReply:
        return CapacityReply(node=self.config.node_id, devices=self.node_devices.devices)

    # --- requests ----------------------------------------------------------------------------

    def _all_pools(self) -> dict[str, SegmentPool]:
        """Every pool: the GPUs' (``self.pools``) and the host tier's."""
        host = {"host": self.host_pool} if self.host_pool is not None else {}
        return {**self.pools, **host}

    def _pool(self, device: str) -> SegmentPool:
        pools = self._all_pools()
        pool = pools.get(device)
        if pool is None:
            raise InvalidArgument(
                f"device {device!r} has no pool on node {self.config.node_id} "
                f"(it has {', '.join(sorted(pools)) or 'none'})",
                field="device",
            )
        return pool

    async def alloc(self, req: MemAllocRequest) -> MemAllocation:
        pool = self._pool(req.device)
        async with self._lock:
            a = await self._alloc(pool, req.nbytes, req.owner, req.item, req.swap_bytes)
            self._expiry.setdefault(req.owner, time.time() + self.config.node_ttl_s)
        return self._msg(req.device, a)

    async def _alloc(
        self, pool: SegmentPool, nbytes: int, owner: str, item: str = "", swap_bytes: int = 0
    ) -> Allocation:
        """(Under the lock.) Allocate and record it in KV; pressure is announced."""
        try:
            if pool.fits(nbytes):  # the common case: bookkeeping only, inline
                a = pool.alloc(nbytes, owner)
            else:
                a = await self._on_device(pool, pool.alloc, nbytes, owner)
        except ResourceExhausted as exc:
            await self._persist_events(pool)  # idle segments it gave back trying to grow
            self.after_reply(
                self.publish_event(
                    "memory.pressure",
                    {
                        "node": self.config.node_id,
                        "device": pool.device,
                        "bytes": nbytes,
                        "reason": exc.message,
                    },
                )
            )
            raise
        await self._persist_events(pool)
        if item:
            self._items[(pool.device, a.id)] = (item, time.time(), swap_bytes)
        key, value = self._alloc_key(pool.device, a), encode_json(self._msg(pool.device, a))
        await self.buckets.memory.put(key, value)
        return a

    async def _free(self, pool: SegmentPool, alloc_id: int) -> None:
        """(Under the lock.) Free and forget it in KV."""
        a = pool.get(alloc_id)
        pool.free(alloc_id)
        self._items.pop((pool.device, alloc_id), None)
        await self.buckets.memory.delete(self._alloc_key(pool.device, a))
        await self._persist_events(pool)

    async def observe(self, req: MemObserve) -> MemFreeReply:
        """A worker's report of a request starting or ending (fed to the reservations)."""
        tracker = self.observed.get(req.device)
        if tracker is None:
            return MemFreeReply(freed=False)
        if req.phase == "start":
            tracker.observe_start(req.function, req.request_id, req.nbytes, time.time())
        else:
            tracker.observe_end(req.function, req.request_id, time.time())
        return MemFreeReply(freed=True)

    async def queue_view(self, view: QueueView) -> MemViewAck:
        """A scheduler replica's view of this node's queued and running work (each tick).

        The latest per replica is kept, in KV too: a restarted manager still knows what the
        queued requests need before the next tick."""
        if view.node != self.config.node_id:
            return MemViewAck(accepted=False)
        held = self._views.get(view.replica)
        if held is not None and held.at > view.at:
            return MemViewAck(accepted=False)  # arrived out of order
        self._views[view.replica] = view
        await self.buckets.memory.put(self._view_key(view.replica), encode_json(view))
        return MemViewAck(accepted=True)

    async def free(self, req: MemFreeRequest) -> MemFreeReply:
        pool = self._pool(req.device)
        async with self._lock:
            try:
                await self._free(pool, req.id)
            except NotFound:  # unknown or already freed: idempotent
                return MemFreeReply(freed=False)
        return MemFreeReply(freed=True)

    async def renew(self, req: MemRenewRequest) -> MemRenewReply:
        self._expiry[req.owner] = time.time() + self.config.node_ttl_s
        held = sum(
            1 for p in self._all_pools().values() for a in p.allocations() if a.owner == req.owner
        )
        return MemRenewReply(allocations=held)

    async def list_allocations(self, req: MemListRequest) -> MemListReply:
        pool = self._pool(req.device)
        return MemListReply(
            allocations=[
                self._msg(req.device, a) for a in pool.allocations() if a.owner == req.owner
            ]
        )

    async def stats(self, _: MemStatsRequest) -> MemStatsReply:
        return MemStatsReply(
            node=self.config.node_id,
            pools=[
                MemPoolStats(**dataclasses.asdict(p.stats())) for p in self._all_pools().values()
            ],
            reserved={f"{d} {fn}": n for (d, fn), n in sorted(self._reserved.items())},
        )

    # --- the reconcile loop -------------------------------------------------------------------

    async def reconcile_once(self, now: float, *, horizon_s: float = 0.0) -> policy.Actions:
        """Free lapsed owners' allocations, resize the reservations, give back segments idle
        for the keep-alive; then the queue-aware residency pass (:meth:`policy_once`).

        Tests call it with a chosen ``now``. Returns the residency actions carried out.
        """
        async with self._lock:
            lapsed = [o for o, t in self._expiry.items() if t < now]
            for owner in lapsed:
                del self._expiry[owner]
                for pool in self._all_pools().values():
                    for a in [a for a in pool.allocations() if a.owner == owner]:
                        await self._free(pool, a.id)
                log.info("memory.owner_lapsed", owner=owner)
            for device, pool in self.pools.items():
                await self._resize_reservations(pool, self.observed[device].snapshot(now))
            for pool in self._all_pools().values():
                await self._on_device(pool, pool.release_idle, now, self.config.tensor_keep_alive_s)
                await self._persist_events(pool)
        return await self.policy_once(now, horizon_s=horizon_s)

    async def _resize_reservations(self, pool: SegmentPool, wanted: dict[str, Reservation]) -> None:
        """(Under the lock.) Hold R_size · R_con per function: grow at once, shrink when the
        want falls below half of what is held, release when idle.

        A reservation is a hold of the pool (room of the GPU's budget, no memory): the
        worker's allocator (torch's, on a real GPU) makes the intermediates in it, so the
        bytes are counted once, where they really are."""
        for key in [k for k in self._reserved if k[0] == pool.device and k[1] not in wanted]:
            del self._reserved[key]
            pool.hold(key[1], 0)
        for key in [k for k in self._short if k[0] == pool.device and k[1] not in wanted]:
            del self._short[key]
        for fn, r in wanted.items():
            key, held = (pool.device, fn), self._reserved.get((pool.device, fn))
            self._short.pop(key, None)
            if held is not None and r.desired_bytes <= held < 2 * r.desired_bytes:
                continue
            try:
                await self._on_device(pool, pool.hold, fn, r.desired_bytes)
            except ResourceExhausted:
                # Announced as pressure; requests still run, growing the pool. The
                # residency pass counts the bytes as wanted: idle copies make way.
                pool.hold(fn, 0)
                self._reserved.pop(key, None)
                self._short[key] = r.desired_bytes
                continue
            finally:
                await self._persist_events(pool)  # empty segments it gave back
            if r.desired_bytes:
                self._reserved[key] = r.desired_bytes
            else:
                self._reserved.pop(key, None)

    async def _reconcile_loop(self) -> None:
        """The residency pass at the queue views' pace, the pool upkeep every reclaim interval.

        Each pass prefetches what falls due before the next one (``horizon_s``)."""
        tick = min(self.config.reclaim_interval_s, self.config.autoscale_interval_s)
        upkeep_at = time.time() + self.config.reclaim_interval_s
        while self.looping:
            await asyncio.sleep(tick)
            now = time.time()
            if now >= upkeep_at:
                upkeep_at = now + self.config.reclaim_interval_s
                await self.reconcile_once(now, horizon_s=tick)
            else:
                await self.policy_once(now, horizon_s=tick)

    # --- queue-aware residency -------------------------------------------------------------

    async def policy_once(self, now: float, *, horizon_s: float = 0.0) -> policy.Actions:
        """One queue-aware residency pass at ``now``: evict, prefetch, reject; publish the
        model cache. Idempotent: a second pass at the same ``now`` does nothing.

        ``horizon_s``: the time to the next pass; prefetches due before it start now.
        Returns the actions carried out.
        """
        if not self.pools:
            return policy.Actions()
        async with self._policy_lock:
            try:
                return await self._policy_pass(now, horizon_s)
            except Unavailable as exc:  # no tensor store (yet): nothing to decide on
                log.info("memory.residency_pass_skipped", error=exc.message)
                return policy.Actions()
            except (PlatformError, nats.errors.Error) as exc:
                code = exc.code if isinstance(exc, PlatformError) else "nats"
                log.warning("memory.residency_pass_failed", code=code, error=str(exc))
                return policy.Actions()

    def _fresh_views(self, now: float) -> list[QueueView]:
        max_age = VIEW_TICKS * self.config.autoscale_interval_s + 1.0
        for replica in [r for r, v in self._views.items() if now - v.at > max_age]:
            del self._views[replica]
            self.after_reply(self._forget(self._view_key(replica)))
        return list(self._views.values())

    async def _forget(self, key: str) -> None:
        try:
            await self.buckets.memory.delete(key)
        except nats.errors.Error as exc:
            log.warning("memory.kv_delete_failed", key=key, error=repr(exc))

    async def _store(self, verb: str, msg: Msg, reply: type[M], timeout: float) -> M:
        subject = subjects.node(self.config.node_id, "tensorstore", verb)
        return await request(
            self.nc, subject, msg, reply, timeout=timeout, what="tensor store of this node"
        )

    async def _transfer(self, verb: str, msg: Msg, reply: type[M], timeout: float) -> M:
        subject = subjects.node(self.config.node_id, "transfer", verb)
        return await request(
            self.nc, subject, msg, reply, timeout=timeout, what="transfer service of this node"
        )

    def _budgets(self, store_owner: str) -> dict[str, planner.Budget]:
        """Per GPU: the blocks the store's copies do not account for, and the tube copies
        (movable items of the policy, by the ``item`` their allocation named)."""
        out = {}
        for device, pool in self.pools.items():
            align = pool.align
            foreign = 0
            tubes: dict[str, policy.Resident] = {}
            for a in pool.allocations():
                nbytes = -(-a.nbytes // align) * align
                item, at, swap = self._items.get((device, a.id), ("", 0.0, 0))
                if item.startswith(TUBE_ITEM) and item not in tubes:
                    tubes[item] = policy.Resident(item, nbytes, at, swap)
                elif a.owner != store_owner:
                    foreign += nbytes
            foreign += pool.stats().held_bytes  # reservations for intermediates
            foreign += sum(n for (d, _), n in self._short.items() if d == device)
            out[device] = planner.Budget(
                device, pool.capacity, self._h2d_bps[device], foreign, tuple(tubes.values()), align
            )
        return out

    def _running_on(self, functions: list[str]) -> dict[str, str]:
        return {
            fn: device
            for device, tracker in self.observed.items()
            for fn in functions
            if tracker.in_flight(fn)
        }

    async def _policy_pass(self, now: float, horizon_s: float) -> policy.Actions:
        demands = planner.merge_views(self._fresh_views(now))
        residency = await self._store(
            subjects.TENSORSTORE_RESIDENCY,
            ResidencyRequest(models=[d.query for d in demands]),
            ResidencyReply,
            STORE_TIMEOUT_S,
        )
        plan = planner.build(
            now,
            demands,
            residency,
            self._budgets(residency.owner),
            running_on=self._running_on([d.function for d in demands]),
            typical_compute_s=self.typical_compute_s,
        )
        for fn, why in plan.unresolved.items():
            log.info("memory.model_unresolved", function=fn, error=why)
        slack = policy.DEFAULT_SLACK_S + horizon_s
        evicted: list[policy.Evict] = []
        prefetched: list[policy.Prefetch] = []
        rejected: list[policy.Rejected] = []
        for device in plan.state.devices:
            actions = policy.reconcile_once(now, policy.MemoryState((device,)), slack_s=slack)
            rejected += actions.rejected
            done_evict, done_prefetch = await self._carry_out(plan, actions, now)
            evicted += done_evict
            prefetched += done_prefetch
            await self._announce_pressure(device, actions)
        rejected = await self._announce_rejections(plan, rejected, now)
        if evicted or prefetched:
            residency = await self._store(
                subjects.TENSORSTORE_RESIDENCY, ResidencyRequest(), ResidencyReply, STORE_TIMEOUT_S
            )
        await self._publish_cache(residency, now)
        return policy.Actions(
            tuple(evicted),
            tuple(prefetched),
            tuple(rejected),
            any(d.name in self._pressed for d in plan.state.devices),
        )

    async def _carry_out(
        self, plan: planner.Plan, actions: policy.Actions, now: float
    ) -> tuple[list[policy.Evict], list[policy.Prefetch]]:
        """Evictions first, then prefetches (into the room they made), in the policy's order.

        Model copies are the tensor store's to drop and place; a tube's copy is the transfer
        service's (``release``: swapped to the host tier first when it has no host copy;
        ``ensure``: copied back). An eviction refused because the item is in use (a model
        copy leased meanwhile, a tube being copied) leaves no room for the prefetches: they
        wait for the next pass, as does any after a prefetch that failed.
        """
        evicted: list[policy.Evict] = []
        for e in actions.evict:
            done, nbytes, detail = await self._evict(e)
            if done is None:
                return evicted, []
            if not done:
                continue
            evicted.append(e)
            await self.publish_event(
                "memory.evicted",
                {
                    "node": self.config.node_id,
                    "device": e.device,
                    "bytes": nbytes,
                    "reason": e.reason,
                    "item": e.item,
                    "needed_at": e.needed_at_s,
                    **detail,
                },
            )
        prefetched: list[policy.Prefetch] = []
        for p in actions.prefetch:
            demand = plan.demand_of[p.request]
            try:
                copied = await self._prefetch(plan, p, demand)
            except PlatformError as exc:
                log.warning(
                    "memory.prefetch_failed",
                    device=p.device,
                    function=demand.function,
                    item=p.item,
                    code=exc.code,
                    error=exc.message,
                )
                break
            prefetched.append(p)
            await self.publish_event(
                "memory.prefetched",
                {
                    "node": self.config.node_id,
                    "device": p.device,
                    "bytes": p.nbytes,
                    "bytes_copied": copied,
                    "reason": "queued request",
                    "item": p.item,
                    "function": demand.function,
                    "tenant": demand.tenant,
                    "what": "tube" if p.item.startswith(TUBE_ITEM) else "model",
                    "needed_at": p.needed_at_s,
                    "lead_s": p.lead_s,
                    "early_s": p.needed_at_s - now,
                },
            )
        return evicted, prefetched

    async def _evict(self, e: policy.Evict) -> tuple[bool | None, int, dict[str, object]]:
        """Carry out one eviction: (done, GPU bytes given back, event details); done None:
        refused because the item is in use, so stop this pass's actions."""
        if e.item.startswith(TUBE_ITEM):
            tube_id = e.item.removeprefix(TUBE_ITEM)
            try:
                released = await self._transfer(
                    subjects.TRANSFER_RELEASE,
                    TubeReleaseRequest(tube_id=tube_id, tier=e.device),
                    TubeReleaseReply,
                    self.config.request_timeout_s,
                )
            except PlatformError as exc:  # the host pool is full, the transfer service away
                log.warning(
                    "memory.evict_failed",
                    device=e.device,
                    item=e.item,
                    code=exc.code,
                    error=exc.message,
                )
                return None, 0, {}
            if not released.released:
                log.info(
                    "memory.evict_refused", device=e.device, item=e.item, reason=released.reason
                )
                return (None if released.reason == "copy in flight" else False), 0, {}
            return (
                True,
                released.nbytes,
                {"what": "tube copy", "tube": tube_id, "swapped_bytes": released.swapped_bytes},
            )
        reply = await self._store(
            subjects.TENSORSTORE_EVICT,
            EvictModelRequest(device=e.device, item=e.item),
            EvictModelReply,
            STORE_TIMEOUT_S,
        )
        if not reply.evicted:
            log.info("memory.evict_refused", device=e.device, item=e.item, reason=reply.reason)
            return (False if reply.reason == "not resident" else None), 0, {}
        return True, reply.nbytes, {"what": "idle model copies"}

    async def _prefetch(
        self, plan: planner.Plan, p: policy.Prefetch, demand: planner.Demand
    ) -> int:
        """Carry out one prefetch; returns the bytes copied (0: it was resident)."""
        tube = plan.tube_of.get(p.item)
        if tube is not None:  # the transfer service copies it back from the host tier
            ensure = EnsureRequest(tube_id=tube.id, tenant=tube.tenant, tier=p.device)
            timeout = self.config.request_timeout_s
            return (
                await self._transfer(subjects.TRANSFER_ENSURE, ensure, EnsureReply, timeout)
            ).nbytes
        place = PrefetchRequest(device=p.device, source=demand.source, tenant=demand.tenant)
        verb, timeout = subjects.TENSORSTORE_PREFETCH, self.config.deploy_timeout_s
        return (await self._store(verb, place, PrefetchReply, timeout)).bytes_copied

    async def _announce_pressure(self, device: policy.DeviceState, actions: policy.Actions) -> None:
        """``memory.pressure`` when a device becomes short of memory (not again while it is)."""
        if not actions.pressure:
            self._pressed.discard(device.name)
            return
        if device.name in self._pressed:
            return
        self._pressed.add(device.name)
        gone = {e.item for e in actions.evict}
        held = device.used_bytes - sum(e.nbytes for e in actions.evict)
        held += sum(p.nbytes for p in actions.prefetch)
        wanted = {i.id: i.nbytes for q in device.queue for i in q.items}
        resident = {r.id for r in device.resident} - gone
        missing = sum(
            n
            for i, n in wanted.items()
            if i not in resident and i not in {p.item for p in actions.prefetch}
        )
        short = max(0, held + missing - device.capacity_bytes)
        await self.publish_event(
            "memory.pressure",
            {
                "node": self.config.node_id,
                "device": device.name,
                "bytes": short,
                "reason": (
                    f"queued and running requests need {short} bytes more than "
                    f"{device.name} holds; copies in use stay"
                ),
            },
        )

    async def _announce_rejections(
        self, plan: planner.Plan, rejected: list[policy.Rejected], now: float
    ) -> list[policy.Rejected]:
        """Announce (once, and in KV) working sets that can never fit; forget the others.

        Returns those announced now."""
        announced = []
        current = {(r.device, r.function): r for r in rejected}
        for key in [k for k in self._rejected if k not in current]:
            del self._rejected[key]
            await self._forget(self._rejection_key(*key))
        for key, r in current.items():
            held = self._rejected.get(key)
            if held is not None and held.working_set_bytes == r.working_set_bytes:
                continue
            record = MemRejection(
                device=r.device,
                function=r.function,
                working_set_bytes=r.working_set_bytes,
                capacity_bytes=r.capacity_bytes,
                reason=r.reason,
                at=now,
            )
            await self.buckets.memory.put(self._rejection_key(*key), encode_json(record))
            self._rejected[key] = record
            announced.append(r)
            demand = plan.demand_of[r.request]
            log.warning(
                "memory.rejected",
                device=r.device,
                function=r.function,
                bytes=r.working_set_bytes,
                reason=r.reason,
            )
            await self.publish_event(
                "memory.rejected",
                {
                    "node": self.config.node_id,
                    "device": r.device,
                    "function": r.function,
                    "tenant": demand.tenant,
                    "bytes": r.working_set_bytes,
                    "capacity_bytes": r.capacity_bytes,
                    "reason": r.reason,
                },
            )
        return announced

    async def _publish_cache(self, residency: ResidencyReply, now: float) -> None:
        """The model cache: per GPU, the models complete on it, in KV and as an event when it
        changes (what the scheduler can place by)."""
        for dev in residency.devices:
            if dev.device not in self.pools:
                continue
            models = sorted(
                (
                    CachedModel(
                        item=m.item, nbytes=m.nbytes, leased=m.leased, file=m.file, tenant=m.tenant
                    )
                    for m in dev.models
                ),
                key=lambda m: m.item,
            )
            if self._cache.get(dev.device) == models:
                continue
            cache = ModelCache(node=self.config.node_id, device=dev.device, at=now, models=models)
            await self.buckets.memory.put(self._cache_key(dev.device), encode_json(cache))
            self._cache[dev.device] = models
            # Items are opaque keys; files and tenants stay in KV (a tenant's private model
            # is not shown to others on the event stream).
            await self.publish_event(
                "memory.residency",
                {
                    "node": self.config.node_id,
                    "device": dev.device,
                    "bytes": sum(m.nbytes for m in models),
                    "reason": "changed",
                    "models": [
                        {"item": m.item, "bytes": m.nbytes, "leased": m.leased} for m in models
                    ],
                },
            )

    # --- state in KV ----------------------------------------------------------------------------

    def _msg(self, device: str, a: Allocation) -> MemAllocation:
        item, at, swap = self._items.get((device, a.id), ("", 0.0, 0))
        return MemAllocation(
            id=a.id,
            device=device,
            segment=a.segment,
            offset=a.offset,
            nbytes=a.nbytes,
            owner=a.owner,
            handle=a.handle,
            item=item,
            at=at,
            swap_bytes=swap,
        )

    def _prefix(self, device: str) -> str:
        return f"{self.config.node_id}.{_dev(device)}"

    def _alloc_key(self, device: str, a: Allocation) -> str:
        return f"{self._prefix(device)}.a.{a.id}"

    def _view_key(self, replica: str) -> str:
        return f"{self.config.node_id}.v.{_token(replica)}"

    def _rejection_key(self, device: str, function: str) -> str:
        return f"{self._prefix(device)}.r.{_token(function)}"

    def _cache_key(self, device: str) -> str:
        return f"{self._prefix(device)}.m"

    async def _persist_events(self, pool: SegmentPool) -> None:
        for ev in pool.drain_events():
            key = f"{self._prefix(pool.device)}.s.{ev.segment}"
            if ev.kind == "grow":
                await self.buckets.memory.put(key, str(ev.segment_bytes).encode())
            else:
                await self.buckets.memory.delete(key)
            self.after_reply(self._resized(ev))

    async def _resized(self, ev: PoolEvent) -> None:
        await self.publish_event(
            "memory.pool.resized",
            {
                "node": self.config.node_id,
                "device": ev.device,
                "kind": ev.kind,
                "bytes": ev.segment_bytes,
                "reserved_bytes": ev.reserved_bytes,
            },
        )

    async def _get(self, key: str) -> bytes | None:
        try:
            entry = await self.buckets.memory.get(key)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        return entry.value

    async def _restore(self) -> None:
        """Rebuild the pools from KV; owners get a grace period to renew. Then the residency
        pass's state: each replica's latest queue view, the rejections and the model cache
        announced (so none is announced again)."""
        grace = time.time() + self.config.node_ttl_s
        keys = await bucket_keys(self.js, KV_MEMORY, prefix=f"{self.config.node_id}.")
        for device, pool in self._all_pools().items():
            prefix = f"{self._prefix(device)}."
            segments: dict[str, int] = {}
            allocs: list[Allocation] = []
            for key in keys:
                if not key.startswith(prefix):
                    continue
                value = await self._get(key)
                if value is None:
                    continue
                kind, _, rest = key[len(prefix) :].partition(".")
                if kind == "s":
                    segments[rest] = int(value)
                elif kind == "a":
                    allocs.append(self._restored_alloc(device, value))
                else:
                    self._restore_state(device, kind, value)
            await self._on_device(pool, pool.restore, segments, sorted(allocs, key=lambda a: a.id))
            for a in allocs:
                if a.owner.startswith(RESERVATION_OWNER):  # an older manager's: holds now
                    await self._free(pool, a.id)
                else:
                    self._expiry[a.owner] = grace
            if segments:
                log.info(
                    "memory.restored",
                    device=device,
                    segments=len(segments),
                    allocations=len(allocs),
                )
        if self.host_pool is not None:
            await asyncio.to_thread(self._remove_orphans, self.host_pool)
        await self._restore_views(keys)

    def _remove_orphans(self, pool: SegmentPool) -> None:
        """Delete host pool files no restored segment names (their KV record is gone)."""
        assert isinstance(pool.backend, HostBackend)
        known = pool.segments()
        for f in pool.backend.root.iterdir():
            if f.is_file() and f.name not in known:
                f.unlink(missing_ok=True)
                log.info("memory.orphan_removed", file=str(f))

    def _restore_state(self, device: str, kind: str, value: bytes) -> None:
        """The residency pass's state: a rejection announced, the model cache published."""
        if kind == "r":
            r = decode_json(value, MemRejection)
            self._rejected[(r.device, r.function)] = r
        elif kind == "m":
            self._cache[device] = decode_json(value, ModelCache).models

    def _restored_alloc(self, device: str, value: bytes) -> Allocation:
        m = decode_json(value, MemAllocation)
        if m.item:
            self._items[(device, m.id)] = (m.item, m.at, m.swap_bytes)
        return Allocation(m.id, m.segment, m.offset, m.nbytes, m.owner)

    async def _restore_views(self, keys: list[str]) -> None:
        views = f"{self.config.node_id}.v."
        for key in keys:
            value = await self._get(key) if key.startswith(views) else None
            if value is not None:
                view = decode_json(value, QueueView)
                self._views[view.replica] = view


def _default_host_pool(host: DeviceInfo, root: Path) -> int:
    """A quarter of the host's memory, and no more than half of the shared-memory file
    system it lives on (a container's /dev/shm is often much smaller than the host)."""
    fs = os.statvfs(root)
    return min(host.memory_bytes // 4, fs.f_blocks * fs.f_frsize // 2)


def _index(device: str) -> int:
    return int(device.removeprefix("gpu:"))  # a probed GPU "gpu:N" is CUDA device N
