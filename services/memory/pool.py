"""A per-device segment pool: large segments held from the device, sub-allocated fast.

The pool is bookkeeping only. It asks a :class:`SegmentBackend` for whole segments
(a ``/dev/shm`` file, a simulated GPU's capacity, or on a real GPU one ``cudaMalloc``
exported by CUDA IPC handle, :class:`CudaBackend`) and hands out aligned blocks inside
them, so the request path never calls the device allocator. Each block names its
segment, its offset in it and the segment's IPC handle (None but on a real GPU): the
holder opens the handle once per segment and works at the offset.

Free blocks of every segment sit in one list sorted by ``(size, segment seq, offset)``:
an allocation bisects it for the smallest block that fits (best fit, older segments
first on a tie, so newer segments drain and can be given back), and a free merges the
block with its free neighbours, found in O(1) through per-segment maps of free starts
and ends. Both are a bisect plus a list insert or delete: a few microseconds with
thousands of live blocks. A segment left with no allocation is kept for a keep-alive
(:meth:`SegmentPool.release_idle`) so a burst does not pay a device allocation per
request; the grow and shrink events are queued for the memory service to publish.

A **hold** is room of the device's budget kept for memory another allocator takes: a
function's intermediates, which torch's allocator makes in the worker process. The pool
never grows a segment into held room, but holds no memory for it (no segment, no device
call): the budget counts those bytes once, where the worker really allocates them.
"""

from __future__ import annotations

import bisect
import dataclasses
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Final, Literal, Protocol

from gpufaas.shared import constants as c
from gpufaas.shared.cuda_ipc import CudaSegment
from gpufaas.shared.errors import InvalidArgument, NotFound, ResourceExhausted
from gpufaas.shared.paths import (
    allocate,
    create_new,
    make_dirs,
    name_under,
    regular_size,
    staging_name,
    sweep_staging,
)
from gpufaas.shared.shm import new_id

DEFAULT_SEGMENT_BYTES: Final = 64 << 20
DEFAULT_ALIGN_BYTES: Final = 256  # cudaMalloc's alignment: every block starts on it
# A real GPU's segments: few large cudaMalloc's (each one costs ~0.1-1 ms and an IPC
# open in every reader); a larger request gets a segment of its own size.
CUDA_SEGMENT_BYTES: Final = c.DEFAULT_MEMORY_SEGMENT_BYTES
# Blocks of a real GPU start on 512 B, as torch's caching allocator rounds its blocks
# (cudaMalloc guarantees 256): any dtype and vectorised kernel is happy there.
CUDA_ALIGN_BYTES: Final = 512
_CUDA_OUT_OF_MEMORY: Final = 2  # cudaErrorMemoryAllocation
EMPTY_SEGMENT: Final = ""  # the segment of a zero-byte allocation: it needs none

PoolEventKind = Literal["grow", "shrink"]


class SegmentBackend(Protocol):
    """Provides the memory behind a segment; the pool only does the bookkeeping."""

    def create(self, segment_id: str, nbytes: int) -> None:
        """Reserve ``nbytes`` of device memory as segment ``segment_id``."""

    def destroy(self, segment_id: str) -> None:
        """Give the segment's memory back to the device (idempotent)."""

    def handle(self, segment_id: str) -> bytes | None:
        """How other processes open the segment (a CUDA IPC handle); None: by its id."""


class SimBackend:
    """A simulated GPU: no bytes, only the capacity held, so pool behaviour is testable."""

    def __init__(self) -> None:
        self.segments: dict[str, int] = {}
        self.created = 0
        self.destroyed = 0

    @property
    def held_bytes(self) -> int:
        return sum(self.segments.values())

    def create(self, segment_id: str, nbytes: int) -> None:
        self.segments[segment_id] = nbytes
        self.created += 1

    def destroy(self, segment_id: str) -> None:
        if self.segments.pop(segment_id, None) is not None:
            self.destroyed += 1

    def handle(self, segment_id: str) -> bytes | None:
        return None


class HostBackend:
    """Host segments as files under ``root`` (``/dev/shm/...``): real, shareable memory.

    A segment file appears whole (sized under a temporary name, then renamed), so a
    process that maps it never sees a short file. With ``preallocate`` the pages are
    committed at creation, so a full tmpfs fails here as ``ResourceExhausted`` instead
    of as a SIGBUS on first touch in some worker.
    """

    def __init__(self, root: Path, *, preallocate: bool = True) -> None:
        self.root = root
        self.preallocate = preallocate
        make_dirs(root)
        sweep_staging(root, recursive=False)  # segments a crash left half made

    def path(self, segment_id: str) -> Path:
        """The file of a segment, for processes that map it (a segment id read back from KV
        is checked to be one plain name under the pool's directory)."""
        return name_under(self.root, segment_id)

    def create(self, segment_id: str, nbytes: int) -> None:
        path = self.path(segment_id)
        tmp = staging_name(path)
        try:
            fd = create_new(tmp)  # private (0600), new, never through a link
            try:
                os.ftruncate(fd, nbytes)
                if self.preallocate:
                    allocate(fd, nbytes, path, "host (host pool)")
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except ResourceExhausted:
            tmp.unlink(missing_ok=True)
            raise
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise ResourceExhausted(
                f"host segment of {nbytes} bytes cannot be created under {self.root}: {e.strerror}",
                field="nbytes",
            ) from e

    def adopt(self, segment_id: str, nbytes: int) -> None:
        """(A restarted manager.) Keep a segment's file, and the bytes in it, when it is
        there whole; make it anew otherwise."""
        if regular_size(self.path(segment_id)) == nbytes:
            return
        self.create(segment_id, nbytes)

    def destroy(self, segment_id: str) -> None:
        self.path(segment_id).unlink(missing_ok=True)

    def handle(self, segment_id: str) -> bytes | None:
        return None  # opened by path (``path``)


class CudaBackend:
    """A real GPU: each segment one ``cudaMalloc`` on GPU ``device_index``, exported once
    by CUDA IPC handle (``shared/cuda_ipc.CudaSegment``, cupy imported on first use).

    ``destroy`` is a ``cudaFree``: the driver gives the memory back once no other process
    has the handle open any more (readers close it with their last view). Memory of a
    previous process cannot be taken over: ``adopt`` (a restarted memory service) makes
    new memory under the old id, with a new handle; the old segment's bytes are gone.
    Blocking device calls: the memory service calls the pool off its event loop.
    """

    def __init__(self, device_index: int) -> None:
        self.device_index = device_index
        self.segments: dict[str, CudaSegment] = {}

    @property
    def held_bytes(self) -> int:
        return sum(s.nbytes for s in self.segments.values())

    def create(self, segment_id: str, nbytes: int) -> None:
        try:
            self.segments[segment_id] = CudaSegment(self.device_index, nbytes)
        except Exception as exc:  # cupy's CUDARuntimeError, imported lazily
            if getattr(exc, "status", None) != _CUDA_OUT_OF_MEMORY:
                raise
            raise ResourceExhausted(
                f"gpu:{self.device_index}: cudaMalloc of a {nbytes}-byte segment failed: "
                "out of memory (other processes hold the rest)",
                field="nbytes",
            ) from None

    def adopt(self, segment_id: str, nbytes: int) -> None:
        self.create(segment_id, nbytes)

    def destroy(self, segment_id: str) -> None:
        seg = self.segments.pop(segment_id, None)
        if seg is not None:
            seg.free()

    def handle(self, segment_id: str) -> bytes | None:
        return self.segments[segment_id].handle


@dataclasses.dataclass(frozen=True, slots=True)
class Allocation:
    """A block of a segment: ``nbytes`` as asked, starting at an aligned ``offset``.

    ``handle``: the segment's CUDA IPC handle on a real GPU (open it, work at ``offset``).
    """

    id: int
    segment: str  # EMPTY_SEGMENT for a zero-byte allocation
    offset: int
    nbytes: int
    owner: str
    handle: bytes | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class PoolEvent:
    """A segment taken from or given back to the device (published as ``memory.pool.resized``)."""

    kind: PoolEventKind
    device: str
    segment: str
    segment_bytes: int
    reserved_bytes: int  # the pool's total after the change
    at: float


@dataclasses.dataclass(frozen=True, slots=True)
class PoolStats:
    """A pool's figures; ``fragmentation`` = 1 - largest free block / free bytes."""

    device: str
    capacity_bytes: int
    reserved_bytes: int  # segments held from the device
    held_bytes: int  # room kept for other allocators (holds): no segment, but not free
    allocated_bytes: int  # aligned blocks handed out
    free_bytes: int  # inside held segments
    largest_free_block_bytes: int
    fragmentation: float
    segments: int
    allocations: int


@dataclasses.dataclass(slots=True)
class _Segment:
    id: str
    seq: int  # orders segments in the free list: older first
    nbytes: int
    handle: bytes | None = None  # the backend's, for the blocks' holders
    free_at: dict[int, int] = dataclasses.field(default_factory=dict)  # free block start -> size
    free_end: dict[int, int] = dataclasses.field(default_factory=dict)  # free block end -> start
    live: int = 0
    empty_since: float | None = None


def _align_up(n: int, align: int) -> int:
    return -(-n // align) * align


class SegmentPool:
    """Segments of one device, sub-allocated into aligned blocks by best fit."""

    def __init__(
        self,
        device: str,
        capacity_bytes: int,
        backend: SegmentBackend,
        *,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        align_bytes: int = DEFAULT_ALIGN_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if align_bytes <= 0 or align_bytes & (align_bytes - 1):
            raise InvalidArgument("align_bytes must be a power of two", field="align_bytes")
        if segment_bytes <= 0 or segment_bytes % align_bytes:
            raise InvalidArgument(
                f"segment_bytes must be a positive multiple of {align_bytes}",
                field="segment_bytes",
            )
        if capacity_bytes < 0:
            raise InvalidArgument("capacity_bytes must not be negative", field="capacity_bytes")
        self.device = device
        self.capacity = capacity_bytes
        self.backend = backend
        self.segment_bytes = segment_bytes
        self.align = align_bytes
        self.clock = clock
        self._segments: dict[str, _Segment] = {}
        self._by_seq: dict[int, _Segment] = {}
        self._free: list[tuple[int, int, int]] = []  # (size, segment seq, offset), sorted
        self._allocs: dict[int, Allocation] = {}
        self._owners: dict[str, set[int]] = {}
        self._events: list[PoolEvent] = []
        self._next_id = 1
        self._next_seq = 0
        self._reserved = 0
        self._allocated = 0
        self._holds: dict[str, int] = {}
        self._held = 0

    # -- holds --------------------------------------------------------------------

    def hold(self, key: str, nbytes: int) -> None:
        """Set ``key``'s hold to ``nbytes`` (0 lets it go): room no segment may grow into.

        Empty segments in their keep-alive are given back when that is what it takes (a
        device call on a real GPU). ``ResourceExhausted``, the hold unchanged, when the
        segments in use leave too little of the device.
        """
        if nbytes < 0:
            raise InvalidArgument(f"nbytes must not be negative, got {nbytes}", field="nbytes")
        held = self._held - self._holds.get(key, 0) + nbytes
        if self._reserved + held > self.capacity:
            self._release_empties(self.capacity - held, self.clock())
            if self._reserved + held > self.capacity:
                raise ResourceExhausted(
                    f"{self.device}: cannot hold {nbytes} bytes: segments in use take "
                    f"{self._reserved} of {self.capacity} bytes and other holds "
                    f"{held - nbytes}",
                    field="nbytes",
                )
        if nbytes:
            self._holds[key] = nbytes
        else:
            self._holds.pop(key, None)
        self._held = held

    def holds(self) -> dict[str, int]:
        """Every hold: key -> bytes."""
        return dict(self._holds)

    # -- allocation ---------------------------------------------------------------

    def alloc(self, nbytes: int, owner: str) -> Allocation:
        """A block of at least ``nbytes``, growing the pool by a segment if none fits."""
        if nbytes < 0:
            raise InvalidArgument(f"nbytes must not be negative, got {nbytes}", field="nbytes")
        need = _align_up(nbytes, self.align)
        if need > self.capacity:
            raise InvalidArgument(
                f"{self.device}: {nbytes} bytes asked is more than the whole device "
                f"({self.capacity} bytes)",
                field="nbytes",
            )
        if need == 0:
            return self._record(Allocation(self._take_id(), EMPTY_SEGMENT, 0, 0, owner))
        free = self._free
        i = bisect.bisect_left(free, (need,))
        if i == len(free):
            self._grow(need, nbytes)
            i = bisect.bisect_left(free, (need,))
        size, seq, offset = free.pop(i)
        seg = self._by_seq[seq]
        del seg.free_at[offset]
        del seg.free_end[offset + size]
        if size > need:
            self._add_free(seg, offset + need, size - need)
        seg.live += 1
        seg.empty_since = None
        self._allocated += need
        return self._record(Allocation(self._take_id(), seg.id, offset, nbytes, owner, seg.handle))

    def fits(self, nbytes: int) -> bool:
        """Whether ``alloc(nbytes)`` would find room in a held segment, calling no device."""
        need = _align_up(max(nbytes, 0), self.align)
        return need == 0 or (bool(self._free) and self._free[-1][0] >= need)

    def free(self, alloc_id: int) -> None:
        """Give a block back, merged with its free neighbours."""
        a = self._allocs.pop(alloc_id, None)
        if a is None:
            raise NotFound(
                f"{self.device}: allocation {alloc_id} is not live in this pool", field="alloc_id"
            )
        held = self._owners[a.owner]
        held.discard(alloc_id)
        if not held:
            del self._owners[a.owner]
        if a.nbytes == 0:
            return
        size = _align_up(a.nbytes, self.align)
        self._allocated -= size
        seg = self._segments[a.segment]
        start, end = a.offset, a.offset + size
        before = seg.free_end.get(start)
        if before is not None:
            self._remove_free(seg, before, start - before)
            start = before
        after = seg.free_at.get(end)
        if after is not None:
            self._remove_free(seg, end, after)
            end += after
        self._add_free(seg, start, end - start)
        seg.live -= 1
        if seg.live == 0:
            seg.empty_since = self.clock()

    def free_owner(self, owner: str) -> int:
        """Free everything ``owner`` holds (a worker that died); returns the count freed."""
        ids = sorted(self._owners.get(owner, ()))
        for alloc_id in ids:
            self.free(alloc_id)
        return len(ids)

    def get(self, alloc_id: int) -> Allocation:
        """A live allocation by id."""
        try:
            return self._allocs[alloc_id]
        except KeyError:
            raise NotFound(
                f"{self.device}: allocation {alloc_id} is not live in this pool", field="alloc_id"
            ) from None

    def allocations(self) -> list[Allocation]:
        """Every live allocation, in the order they were made."""
        return list(self._allocs.values())

    def handle(self, segment_id: str) -> bytes | None:
        """A held segment's IPC handle (None but on a real GPU)."""
        seg = self._segments.get(segment_id)
        if seg is None:
            raise NotFound(f"{self.device}: no segment {segment_id!r}", field="segment")
        return seg.handle

    # -- segments -----------------------------------------------------------------

    def release_idle(self, now: float, keep_alive_s: float) -> list[str]:
        """Give back segments empty for at least ``keep_alive_s``; returns their ids."""
        idle = [
            s
            for s in self._segments.values()
            if s.empty_since is not None and now - s.empty_since >= keep_alive_s
        ]
        for seg in idle:
            self._release(seg, now)
        return [s.id for s in idle]

    def restore(self, segments: Mapping[str, int], allocations: Iterable[Allocation]) -> None:
        """Rebuild a fresh pool from a saved table (a restarted manager loses nothing).

        ``segments`` maps segment id -> bytes; each allocation is carved out of its
        segment at its offset. The backend adopts the segments (``adopt`` if it has one,
        else ``create``): a simulated device's are accounting only; a real GPU's are new
        memory with new handles, which the restored allocations carry.
        """
        if self._segments or self._allocs:
            raise InvalidArgument("restore needs an empty pool", field="pool")
        adopt = getattr(self.backend, "adopt", self.backend.create)
        for seg_id, size in segments.items():
            adopt(seg_id, size)
            seg = _Segment(
                seg_id, self._next_seq, size, self.backend.handle(seg_id), empty_since=self.clock()
            )
            self._next_seq += 1
            self._segments[seg_id] = seg
            self._by_seq[seg.seq] = seg
            self._reserved += size
            self._add_free(seg, 0, size)
        for a in allocations:
            need = _align_up(a.nbytes, self.align)
            self._next_id = max(self._next_id, a.id + 1)
            if need:
                seg = self._segments[a.segment]
                start, size = next(
                    (st, sz) for st, sz in seg.free_at.items() if st <= a.offset < st + sz
                )
                self._remove_free(seg, start, size)
                if a.offset > start:
                    self._add_free(seg, start, a.offset - start)
                if start + size > a.offset + need:
                    self._add_free(seg, a.offset + need, start + size - a.offset - need)
                seg.live += 1
                seg.empty_since = None
                self._allocated += need
            # Its segment's handle now (a real GPU's restored segments are new memory).
            handle = self._segments[a.segment].handle if need else None
            self._record(dataclasses.replace(a, handle=handle))

    def drain_events(self) -> list[PoolEvent]:
        """The grow and shrink events since the last call, oldest first."""
        events, self._events = self._events, []
        return events

    def segments(self) -> dict[str, int]:
        """Held segments: id -> bytes."""
        return {s.id: s.nbytes for s in self._segments.values()}

    def close(self) -> None:
        """Give every segment back, live allocations included (the pool is going away)."""
        now = self.clock()
        for seg in list(self._segments.values()):
            self._release(seg, now)
        self._allocs.clear()
        self._owners.clear()
        self._allocated = 0

    def stats(self) -> PoolStats:
        """Capacity, reservation and fragmentation figures, in O(1)."""
        free_bytes = self._reserved - self._allocated
        largest = self._free[-1][0] if self._free else 0
        return PoolStats(
            device=self.device,
            capacity_bytes=self.capacity,
            reserved_bytes=self._reserved,
            held_bytes=self._held,
            allocated_bytes=self._allocated,
            free_bytes=free_bytes,
            largest_free_block_bytes=largest,
            fragmentation=1.0 - largest / free_bytes if free_bytes else 0.0,
            segments=len(self._segments),
            allocations=len(self._allocs),
        )

    # -- internals ----------------------------------------------------------------

    def _take_id(self) -> int:
        alloc_id = self._next_id
        self._next_id += 1
        return alloc_id

    def _record(self, a: Allocation) -> Allocation:
        self._allocs[a.id] = a
        self._owners.setdefault(a.owner, set()).add(a.id)
        return a

    def _add_free(self, seg: _Segment, start: int, size: int) -> None:
        seg.free_at[start] = size
        seg.free_end[start + size] = start
        bisect.insort(self._free, (size, seg.seq, start))

    def _remove_free(self, seg: _Segment, start: int, size: int) -> None:
        del seg.free_at[start]
        del seg.free_end[start + size]
        key = (size, seg.seq, start)
        i = bisect.bisect_left(self._free, key)
        del self._free[i]

    def _grow(self, need: int, nbytes: int) -> None:
        """Add a segment with room for ``need``: a full one, or what the capacity leaves.

        Empty segments still in their keep-alive are given back first when that is what
        it takes to fit (they are too small for ``need``, else the free list had found them).
        """
        room = self.capacity - self._held - self._reserved
        reclaimable = room + sum(s.nbytes for s in self._empties())
        size = max(need, self.segment_bytes)
        if size > reclaimable:
            size = reclaimable - reclaimable % self.align
        if size < need:
            free_bytes = self.capacity - self._held - self._allocated
            largest = self._free[-1][0] if self._free else 0
            held = f", {self._held} held for other allocators" if self._held else ""
            raise ResourceExhausted(
                f"{self.device}: cannot allocate {nbytes} bytes: {free_bytes} of "
                f"{self.capacity} bytes free, the largest free block {largest} bytes and "
                f"{max(room, 0)} bytes not yet reserved{held}",
                field="nbytes",
            )
        now = self.clock()
        self._release_empties(self.capacity - self._held - size, now)
        seg_id = new_id(9)
        self.backend.create(seg_id, size)
        seg = _Segment(seg_id, self._next_seq, size, self.backend.handle(seg_id))
        self._next_seq += 1
        self._segments[seg_id] = seg
        self._by_seq[seg.seq] = seg
        self._reserved += size
        self._add_free(seg, 0, size)
        self._events.append(PoolEvent("grow", self.device, seg_id, size, self._reserved, now))

    def _empties(self) -> list[_Segment]:
        """Segments with no allocation, the longest empty first."""
        return sorted(
            (s for s in self._segments.values() if s.empty_since is not None),
            key=lambda s: (s.empty_since or 0.0, s.seq),
        )

    def _release_empties(self, reserved_at_most: int, now: float) -> None:
        """Give back empty segments, the longest empty first, until the segments held take
        at most ``reserved_at_most`` bytes (or none is empty)."""
        for seg in self._empties():
            if self._reserved <= reserved_at_most:
                break
            self._release(seg, now)

    def _release(self, seg: _Segment, now: float) -> None:
        for start, size in list(seg.free_at.items()):
            self._remove_free(seg, start, size)
        del self._segments[seg.id]
        del self._by_seq[seg.seq]
        self._reserved -= seg.nbytes
        self.backend.destroy(seg.id)
        self._events.append(
            PoolEvent("shrink", self.device, seg.id, seg.nbytes, self._reserved, now)
        )
