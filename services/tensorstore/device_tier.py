"""The device tier: one copy of each tensor per GPU, shared by every instance placed there.

The tensor store owns the copies; workers hold leases on them, like on the host tier.
A placement packs the tensors not yet on the GPU into one new device segment; instances
of one model, and fine-tuned variants sharing tensors, reference the same copies, from
any worker process (on a real GPU through a CUDA IPC handle, see ``shared/cuda_ipc.py``).
A segment none of whose tensors is leased stays resident for a keep-alive, so a new
instance starts without copying; idle segments are evicted least recently used first
when a new model needs the room; a leased copy is never freed.

On a real GPU the segment's bytes are the block the memory service granted
(``MemAllocation``: a segment of its pool by IPC handle, and an offset): the store opens
the pool segment once per process and writes the copies at the block's offset, and the
placement names the pool segment's handle, with offsets counted from its start (block
offset + offset in the block), so workers map the same memory. The fall-back, when no
block comes with a handle (an unbudgeted tier: no memory service; or a memory service
that only budgets), is an allocation of the tier's own per segment (``CudaSegment``).

On a simulated GPU no bytes move (instances compute over the host pages) and only the
capacity is accounted, so placement, sharing and "out of memory" behave as on a GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gpufaas.shared.cuda_ipc import CudaSegment, open_segment, write_at
from gpufaas.shared.errors import ResourceExhausted
from gpufaas.shared.messages import (
    DevicePlacement,
    DeviceRef,
    DeviceSegment,
    DeviceTierStats,
    MemAllocation,
    TensorRef,
)
from gpufaas.shared.shm import new_id
from gpufaas.tensorstore.leases import LeaseTable

DEVICE_ALIGN = 256  # cudaMalloc's alignment: every tensor starts on it

if TYPE_CHECKING:
    import torch

ReadHost = Callable[[TensorRef], memoryview]


@dataclass(slots=True)
class _Segment:
    tensors: frozenset[str]
    nbytes: int
    memory: CudaSegment | None = None  # an allocation of our own (the fall-back)
    block: int | None = None  # its room in the memory service's pool of this GPU
    handle: bytes | None = None  # real GPU: the allocation the copies lie in (pool's or own)
    offset: int = 0  # where they start in it: the block's offset
    view: torch.Tensor | None = None  # real GPU: their bytes (keeps the allocation mapped)

    def describe(self, seg_id: str, device_index: int) -> DeviceSegment:
        return DeviceSegment(
            id=seg_id,
            nbytes=self.offset + self.nbytes,
            device_index=device_index,
            ipc_handle=self.handle,
            offset=self.offset,
        )


class DeviceTier:
    """Device copies on one GPU, leased by the instances that use them."""

    def __init__(
        self, name: str, index: int, capacity_bytes: int, *, cuda: bool, budgeted: bool = False
    ) -> None:
        self.name = name
        # Budgeted: new copies need a block from the node's memory service (one budget per
        # GPU for model tensors and intermediates); else only this tier's capacity counts.
        self.budgeted = budgeted
        self.index = index
        self.capacity = capacity_bytes
        self.cuda = cuda
        self.segments: dict[str, _Segment] = {}
        self.refs: dict[str, DeviceRef] = {}  # tensor id -> its copy
        self.sizes: dict[str, int] = {}  # tensor id -> bytes
        self.leases = LeaseTable()
        self.idle_since: dict[str, float] = {}  # segments no lease references
        self.released_blocks: list[int] = []  # memory-service blocks of freed segments

    @property
    def used(self) -> int:
        return sum(s.nbytes for s in self.segments.values())

    def place(
        self,
        lease_id: str,
        holder: str,
        manifest: Mapping[str, TensorRef],
        read: ReadHost,
        *,
        expires_at: float,
        now: float,
        block: MemAllocation | None = None,
    ) -> DevicePlacement:
        """Lease a model's tensors on this GPU, copying only those not resident.

        ``block`` is the room the memory service granted for the new copies (see
        ``missing_bytes``); it must cover them, and on a real GPU they are written into it.
        Idle segments are evicted (least recently used first) to make room. All or
        nothing: if the new bytes still do not fit, nothing is evicted, copied or leased
        (a block granted is then back in ``released_blocks``).
        """
        wanted = {ref.id: ref for ref in manifest.values()}
        new = [ref for tid, ref in wanted.items() if tid not in self.refs]
        layout, need = _pack(new)
        if need and (block is None or block.nbytes < need) and self.budgeted:
            raise NeedsRoom(need)
        try:
            self._make_room(
                need, set(wanted), now, model_bytes=sum(r.nbytes for r in wanted.values())
            )
            seg = self._copy(new, layout, need, read, block) if new else None
        except BaseException:
            if block is not None:
                self.released_blocks.append(block.id)
            raise
        if seg is not None:
            seg_id = new_id(12)
            self.segments[seg_id] = seg
            for ref, offset in layout:
                self.refs[ref.id] = DeviceRef(segment=seg_id, offset=seg.offset + offset)
                self.sizes[ref.id] = ref.nbytes
        elif block is not None:  # granted but not needed (placed meanwhile): give it back
            self.released_blocks.append(block.id)
        self.leases.put(lease_id, holder, list(wanted), expires_at)
        used_segments = {self.refs[tid].segment for tid in wanted}
        for seg_id in used_segments:
            self.idle_since.pop(seg_id, None)
        return DevicePlacement(
            device=self.name,
            refs={tid: self.refs[tid] for tid in wanted},
            segments=[self.segments[s].describe(s, self.index) for s in sorted(used_segments)],
            bytes_copied=need,
            used_bytes=self.used,
        )

    def missing_bytes(self, manifest: Mapping[str, TensorRef]) -> int:
        """Room the tensors of ``manifest`` not yet on this GPU would take."""
        wanted = {ref.id: ref for ref in manifest.values()}
        return _pack([ref for tid, ref in wanted.items() if tid not in self.refs])[1]

    def evict_one_idle(self, now: float, keep: set[str]) -> bool:
        """Free the least recently used idle segment holding none of ``keep``; False: none."""
        self.leases.expire(now)
        self._mark_idle(now)
        victims = sorted(
            (since, s)
            for s, since in self.idle_since.items()
            if not self.segments[s].tensors & keep
        )
        if not victims:
            return False
        self._free(victims[0][1])
        return True

    def holds(self, manifest: Mapping[str, TensorRef]) -> bool:
        """Whether every tensor of ``manifest`` has its copy here (placing it copies nothing)."""
        return all(ref.id in self.refs for ref in manifest.values())

    def renew(
        self,
        lease_id: str,
        holder: str,
        manifest: Mapping[str, TensorRef],
        read: ReadHost,
        *,
        expires_at: float,
        now: float,
    ) -> bool:
        """Renew a lease; False when its copies are gone and cannot come back as they were.

        After a restart of the store the new process knows none of the old copies: a
        budgeted GPU's blocks (a real GPU's bytes with them) lapse with the old store's
        memory lease, and an unbudgeted real GPU's own allocations died with the old
        process: the instance is rebuilt. Only an unbudgeted simulated tier re-accounts the
        copies (nothing moved).
        """
        if self.holds(manifest):
            self.leases.put(lease_id, holder, [r.id for r in manifest.values()], expires_at)
            return True
        if self.cuda or self.budgeted:
            return False
        try:
            self.place(lease_id, holder, manifest, read, expires_at=expires_at, now=now)
        except ResourceExhausted:
            return False
        return True

    def release(self, lease_id: str, now: float | None = None) -> bool:
        """Drop a lease; with ``now``, copies it leaves unreferenced are idle from ``now``
        (their last use, the order in which idle copies are evicted)."""
        dropped = self.leases.drop(lease_id)
        if dropped and now is not None:
            self._mark_idle(now)
        return dropped

    def prefetch(
        self,
        manifest: Mapping[str, TensorRef],
        read: ReadHost,
        *,
        now: float,
        block: MemAllocation | None = None,
    ) -> DevicePlacement:
        """Place a model's copies without a lease (ahead of a queued request): they stay as
        idle copies, last used ``now``, so the next instance built finds them resident.

        As :meth:`place` (``NeedsRoom``, all or nothing), placed under a lease dropped at once.
        """
        lease_id = f"prefetch:{new_id(12)}"
        placed = self.place(
            lease_id, "prefetch", manifest, read, expires_at=now, now=now, block=block
        )
        self.leases.drop(lease_id)
        self._mark_idle(now)  # ``place`` un-idled its segments: idle again, from now
        return placed

    def resident_models(
        self, models: Mapping[str, Mapping[str, str]], now: float
    ) -> list[tuple[str, int, float, bool]]:
        """(model, bytes, last use, pinned) of each of ``models`` (model -> parameter ->
        tensor id) whose every tensor has its copy here. Pinned: a segment holding one of its
        copies is leased, so evicting the model's copies would be refused."""
        self.leases.expire(now)
        self._mark_idle(now)
        out = []
        for key, ids in models.items():
            tids = set(ids.values())
            if not tids or not all(t in self.refs for t in tids):
                continue
            segs = {self.refs[t].segment for t in tids}
            pinned = any(s not in self.idle_since for s in segs)
            last = now if pinned else max(self.idle_since[s] for s in segs)
            out.append((key, sum(self.sizes[t] for t in tids), last, pinned))
        return out

    def evict_tensors(self, tensor_ids: Iterable[str], now: float) -> int | None:
        """Free every segment holding a copy of one of ``tensor_ids``, all or nothing.

        Returns the bytes freed (0: none was resident), or None when one of those segments
        is leased (nothing is freed then). A segment shared with another model goes too: that
        model's idle copies are incomplete afterwards, and come back with its next placement.
        """
        self.leases.expire(now)
        self._mark_idle(now)
        segs = {self.refs[t].segment for t in tensor_ids if t in self.refs}
        if any(s not in self.idle_since for s in segs):
            return None
        return sum(self._free(s) for s in sorted(segs))

    def reclaim_once(self, now: float, keep_alive_s: float) -> list[tuple[str, int, str]]:
        """Free segments unreferenced for ``keep_alive_s``; returns (segment, bytes, reason)."""
        self.leases.expire(now)
        self._mark_idle(now)
        expired = [s for s, since in self.idle_since.items() if now - since >= keep_alive_s]
        return [(s, self._free(s), "keep-alive expired") for s in expired]

    def stats(self) -> DeviceTierStats:
        stored = {tid for seg in self.segments.values() for tid in seg.tensors}
        return DeviceTierStats(
            device=self.name,
            capacity_bytes=self.capacity,
            tensors=len(stored),
            segments=len(self.segments),
            bytes_stored=self.used,
            leases=len(self.leases.leases),
            bytes_referenced=sum(self.sizes[t] for t in stored if self.leases.refcount(t)),
            bytes_without_sharing=sum(
                self.sizes.get(t, 0) for lease in self.leases.leases.values() for t in lease.tensors
            ),
        )

    # --- internals -----------------------------------------------------------------------

    def _copy(
        self,
        new: list[TensorRef],
        layout: list[tuple[TensorRef, int]],
        need: int,
        read: ReadHost,
        block: MemAllocation | None,
    ) -> _Segment:
        """A segment of ``need`` bytes holding ``new``: on a real GPU in the pool block
        granted (or, without a handle, an allocation of our own), the bytes copied in."""
        tensors = frozenset(r.id for r in new)
        room = block.id if block is not None else None
        if not self.cuda:
            return _Segment(tensors, need, block=room)
        if block is not None and block.handle is not None:
            base = open_segment(block.handle, block.offset + need, self.index)  # once: cached
            seg = _Segment(
                tensors,
                need,
                block=room,
                handle=block.handle,
                offset=block.offset,
                view=base.narrow(0, block.offset, need),
            )
        else:
            memory = CudaSegment(self.index, need)
            seg = _Segment(tensors, need, memory, room, memory.handle, 0, memory.tensor)
        assert seg.view is not None
        try:
            for ref, offset in layout:
                write_at(seg.view, offset, read(ref))
        except BaseException:
            if seg.memory is not None:
                seg.memory.free()
            raise
        return seg

    def _mark_idle(self, now: float) -> None:
        for seg_id, seg in self.segments.items():
            if self.leases.referenced(seg.tensors):
                self.idle_since.pop(seg_id, None)
            else:
                self.idle_since.setdefault(seg_id, now)

    def _make_room(self, need: int, wanted: set[str], now: float, *, model_bytes: int) -> None:
        if self.used + need <= self.capacity:
            return
        self.leases.expire(now)
        self._mark_idle(now)
        evictable = sorted(
            (since, s)
            for s, since in self.idle_since.items()
            if not self.segments[s].tensors & wanted
        )
        freeable = sum(self.segments[s].nbytes for _, s in evictable)
        if self.used - freeable + need > self.capacity:
            raise ResourceExhausted(
                f"{self.name} has {self.capacity - self.used + freeable} bytes free or "
                f"freeable; the model needs {need} more (of {model_bytes})",
                field="model",
            )
        for _, seg_id in evictable:
            if self.used + need <= self.capacity:
                break
            self._free(seg_id)

    def _free(self, seg_id: str) -> int:
        seg = self.segments.pop(seg_id)
        self.idle_since.pop(seg_id, None)
        for tid in seg.tensors:
            self.refs.pop(tid, None)
            self.sizes.pop(tid, None)
        seg.view = None  # the last view here unmaps a pool segment (its handle is closed)
        if seg.memory is not None:
            seg.memory.free()
        if seg.block is not None:
            self.released_blocks.append(seg.block)
        return seg.nbytes


class NeedsRoom(Exception):
    """The placement needs a block of at least ``nbytes`` from the memory service first."""

    def __init__(self, nbytes: int) -> None:
        super().__init__(nbytes)
        self.nbytes = nbytes


def _pack(refs: Iterable[TensorRef]) -> tuple[list[tuple[TensorRef, int]], int]:
    """Offsets of tensors packed into one segment, each aligned; and the segment's size."""
    layout: list[tuple[TensorRef, int]] = []
    offset = 0
    for ref in refs:
        offset = -(-offset // DEVICE_ALIGN) * DEVICE_ALIGN
        layout.append((ref, offset))
        offset += ref.nbytes
    return layout, offset
