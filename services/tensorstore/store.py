"""The host tier of the tensor store: content-addressed tensors in shared segments.

Each registration packs the tensors not yet present into one new segment, and writes
the segment's index beside it after the segment itself, so a crash leaves either a
whole segment with its index or an orphan that recovery deletes. The index is the
set of ``*.idx.json`` files: a restarted store rebuilds its state from them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import blake3
import structlog

from gpufaas.shared.constants import SEGMENT_ALIGN
from gpufaas.shared.errors import ModelInvalid
from gpufaas.shared.messages import TensorRef, decode_json, encode_json
from gpufaas.shared.paths import make_dirs, read_file, sweep_staging, write_private
from gpufaas.shared.shm import TENSORS_DIR, new_id, write_segment
from gpufaas.tensorstore.leases import LeaseTable
from gpufaas.tensorstore.pt2_file import Pt2File
from gpufaas.tensorstore.safetensors_file import Entry, SafetensorsFile

log = structlog.get_logger()

MODELS_DIR = "models"
KEYS_DIR = "keys"


def tensor_id(
    dtype: str, shape: tuple[int, ...], data: memoryview, key: bytes | None = None
) -> str:
    """Content address: blake3 over dtype, shape and bytes; keyed for a tenant's private tensors.

    A keyed id never equals another tenant's (or a public) id for the same bytes, so a
    private tensor is shared only within its tenant, and nobody else can observe it
    through deduplication (no bytes saved, no time saved).
    """
    h = blake3.blake3() if key is None else blake3.blake3(key=key)
    h.update(f"{dtype}|{','.join(map(str, shape))}|".encode())
    h.update(data)
    return h.hexdigest()


@dataclass(frozen=True, slots=True)
class Registration:
    """Outcome of registering one model file."""

    manifest: dict[str, TensorRef]
    model_bytes: int
    bytes_stored: int
    bytes_deduplicated: int
    file_read: bool = True
    program: str | None = None  # an exported program's graph, without weights (shm path)


def model_key(path: Path, private_to: str | None = None) -> str:
    """Identity of a model file as found on disk (path, size, modification time), per scope:
    public, or one tenant's private registration."""
    st = path.stat()
    scope = "" if private_to is None else f"private:{private_to}"
    ident = f"{_resolved(str(path))}|{st.st_size}|{st.st_mtime_ns}|{scope}"
    return blake3.blake3(ident.encode()).hexdigest()[:32]


@functools.lru_cache(maxsize=4096)
def _resolved(path: str) -> str:
    """A model file's real path (cached: it is on every cold start's path)."""
    return str(Path(path).resolve())


class HostStore:
    """Content-addressed tensors of one node's host tier."""

    def __init__(self, root: Path, node_id: str) -> None:
        self.root = root
        self.reldir = f"{TENSORS_DIR}/{node_id}"
        self.dir = root / self.reldir
        self.index: dict[str, TensorRef] = {}
        self.bytes_requested = 0
        # model file identity -> parameter name -> tensor id, so that a model whose tensors
        # are all resident is registered again without reading its file.
        self.models: dict[str, dict[str, str]] = {}
        self.sizes: dict[str, int] = {}  # tensor id -> bytes, for every manifest's tensors
        self.programs: set[str] = set()  # models (by key) that are exported programs
        # model key -> (file, tenant of a private model), for models registered since start
        self.sources: dict[str, tuple[str, str | None]] = {}
        self.files_read = 0
        self.segment_ids: dict[str, set[str]] = {}  # segment -> the tensors packed in it
        self.leases = LeaseTable()
        self.idle_since: dict[str, float] = {}  # unreferenced segment -> when first seen so
        self.recovered_at = 0.0
        self.secret: bytes | None = None

    @property
    def segments(self) -> set[str]:
        """The stored segments (derived from what each one packs)."""
        return set(self.segment_ids)

    @property
    def bytes_stored(self) -> int:
        return sum(ref.nbytes for ref in self.index.values())

    def recover(self, now: float = 0.0) -> None:
        """Rebuild the index from disk; delete segments without an index and stray temp files.

        Leases are not on disk: workers re-announce them when they renew, and the
        reclaimer frees nothing for a grace period after ``now`` so that they can.
        """
        self.recovered_at = now
        make_dirs(self.dir)
        for idx in self.dir.glob("*.idx.json"):
            seg = idx.name.removesuffix(".idx.json")
            if not (self.dir / seg).is_file():
                idx.unlink()
                continue
            ids = self.segment_ids.setdefault(seg, set())
            for raw in json.loads(read_file(idx)):
                ref = decode_json(json.dumps(raw), TensorRef)
                self.index.setdefault(ref.id, ref)
                ids.add(ref.id)
        models = self.dir / MODELS_DIR
        make_dirs(models)
        sweep_staging(models, time.time())  # crashed writes of model records and programs
        for path in models.glob("*.json"):
            body = json.loads(read_file(path))
            self.models[path.stem] = body["ids"]
            self.sizes.update(body["sizes"])
            if body.get("program"):
                self.programs.add(path.stem)
        for path in self.dir.iterdir():
            name = path.name
            if path.is_dir():
                continue
            if name.startswith(".") or (
                not name.endswith(".idx.json") and name not in self.segment_ids
            ):
                path.unlink(missing_ok=True)
                log.info("tensorstore.orphan_removed", file=name)

    def tenant_key(self, tenant: str) -> bytes:
        """The hashing key of a tenant's private tensors (from this store's secret)."""
        return blake3.blake3(self._secret() + tenant.encode()).digest()

    def _secret(self) -> bytes:
        if self.secret is None:
            path = self.dir / KEYS_DIR / "tenant-secret"
            # Private from its first byte (a new 0600 file, linked into place: never
            # replaced, and never readable by anyone else between a write and a chmod).
            with contextlib.suppress(FileExistsError):
                write_private(path, [os.urandom(32)], replace=False)
            self.secret = read_file(path)
        return self.secret

    def register_file(self, path: Path, private_to: str | None = None) -> Registration:
        """Hash every tensor of a model file and store those not yet present.

        A safetensors file, or a ``torch.export`` program (.pt2) whose weights are split
        out: they are stored like any tensors, and the graph is kept beside the manifest.
        With ``private_to`` the tensors are the tenant's own (keyed ids, see tensor_id). A
        file registered before whose tensors are all still resident is not read again.
        """
        try:
            key = model_key(path, private_to)
        except OSError as exc:
            raise ModelInvalid(f"cannot read {path.name}: {exc.strerror}", field="model") from None
        self.sources[key] = (str(path), private_to)
        manifest = self._resident(key)
        if manifest is not None:
            model_bytes = sum(ref.nbytes for ref in manifest.values())
            self.bytes_requested += model_bytes
            program = self._program(key) if key in self.programs else None
            return Registration(
                manifest, model_bytes, 0, model_bytes, file_read=False, program=program
            )
        key_bytes = None if private_to is None else self.tenant_key(private_to)
        f = Pt2File(path) if path.suffix == ".pt2" else SafetensorsFile(path)
        self.files_read += 1
        try:
            reg = self._register(f, key_bytes)
            if isinstance(f, Pt2File):  # the graph first: a manifest never names a lost one
                write_segment(self.root, self._program(key), [f.program])
                reg = dataclasses.replace(reg, program=self._program(key))
                self.programs.add(key)
        finally:
            f.close()
        ids = {name: ref.id for name, ref in reg.manifest.items()}
        sizes = {ref.id: ref.nbytes for ref in reg.manifest.values()}
        body = json.dumps({"ids": ids, "sizes": sizes, "program": reg.program is not None})
        write_segment(self.root, f"{self.reldir}/{MODELS_DIR}/{key}.json", [body.encode()])
        self.sizes.update(sizes)
        self.models[key] = ids
        return reg

    def _program(self, key: str) -> str:
        return f"{self.reldir}/{MODELS_DIR}/{key}.program"

    def resident(self, path: Path, private_to: str | None = None) -> dict[str, TensorRef] | None:
        """The manifest of a model file whose tensors are all stored, else None (no changes)."""
        try:
            return self._resident(model_key(path, private_to))
        except OSError:
            return None

    def _resident(self, key: str) -> dict[str, TensorRef] | None:
        ids = self.models.get(key)
        if ids is None or not all(tid in self.index for tid in ids.values()):
            return None
        return {name: self.index[tid] for name, tid in ids.items()}

    def model_item(self, path: Path, private_to: str | None = None) -> tuple[str, int, bool]:
        """(model key, bytes of its tensors each once, known) of a model file; not known: the
        store has no manifest for it, and the bytes are the file's size (an estimate).
        ``OSError`` when the file cannot be read."""
        key = model_key(path, private_to)
        ids = self.models.get(key)
        if ids is None:
            return key, path.stat().st_size, False
        return key, sum(self.sizes.get(t, 0) for t in set(ids.values())), True

    def _register(self, f: SafetensorsFile | Pt2File, key: bytes | None) -> Registration:
        ids: dict[str, str] = {}
        new: dict[str, Entry] = {}
        model_bytes = 0
        for e in f.entries:
            tid = tensor_id(e.dtype, e.shape, f.view(e), key)
            ids[e.name] = tid
            model_bytes += e.end - e.start
            if tid not in self.index and tid not in new:
                new[tid] = e
        seg = new_id(12)
        refs: dict[str, TensorRef] = {}
        offset = 0
        layout: list[tuple[str, Entry, int]] = []
        for tid, e in new.items():
            offset = -(-offset // SEGMENT_ALIGN) * SEGMENT_ALIGN
            layout.append((tid, e, offset))
            refs[tid] = TensorRef(
                id=tid,
                dtype=e.dtype,
                shape=list(e.shape),
                nbytes=e.end - e.start,
                segment=f"{self.reldir}/{seg}",
                offset=offset,
            )
            offset += e.end - e.start
        stored = 0
        if layout:
            write_segment(self.root, f"{self.reldir}/{seg}", self._chunks(f, layout))
            idx_body = b"[" + b",".join(encode_json(r) for r in refs.values()) + b"]"
            write_segment(self.root, f"{self.reldir}/{seg}.idx.json", [idx_body])
            self.segment_ids[seg] = set(refs)
            self.index.update(refs)
            stored = sum(r.nbytes for r in refs.values())
        self.bytes_requested += model_bytes
        manifest = {name: self.index[tid] for name, tid in ids.items()}
        return Registration(manifest, model_bytes, stored, model_bytes - stored)

    def locality(self, path: Path, private_to: str | None = None) -> tuple[bool, int, int]:
        """(known, model bytes, resident bytes) of a model file, from its manifest alone.

        Cheap (a stat and a lookup per tensor), so it runs on the event loop: it only
        reads dicts that the store thread replaces entry by entry.
        """
        try:
            key = model_key(path, private_to)
        except OSError:
            return False, 0, 0
        ids = self.models.get(key)
        if ids is None:
            return False, path.stat().st_size, 0
        return (True, *self.resident_bytes(ids.values(), self.sizes))

    def resident_bytes(self, ids: Iterable[str], sizes: Mapping[str, int]) -> tuple[int, int]:
        """(bytes, resident bytes) of tensors, each once; ``sizes`` for those not stored."""
        total = resident = 0
        for tid in set(ids):
            ref = self.index.get(tid)
            nbytes = ref.nbytes if ref is not None else sizes.get(tid, 0)
            total += nbytes
            resident += nbytes if ref is not None else 0
        return total, resident

    # --- references and reclaiming -------------------------------------------------------

    def lease(
        self, lease_id: str, holder: str, tensor_ids: Iterable[str], expires_at: float
    ) -> list[str]:
        """Take or renew a lease; returns the tensor ids that are not (or no longer) stored."""
        ids = list(tensor_ids)
        missing = [t for t in ids if t not in self.index]
        self.leases.put(lease_id, holder, [t for t in ids if t in self.index], expires_at)
        return missing

    def reclaim_once(
        self, now: float, *, keep_alive_s: float, capacity_bytes: int, grace_s: float
    ) -> list[tuple[str, int, str]]:
        """Free unreferenced segments: after ``keep_alive_s`` idle, then least recently used
        ones while the store exceeds ``capacity_bytes`` (0 = no limit). A referenced tensor is
        never freed. Returns (segment, bytes, reason) for each segment freed."""
        self.leases.expire(now)
        if now < self.recovered_at + grace_s:
            return []  # leases are still being re-announced after a restart
        idle: list[tuple[float, str]] = []
        for seg, ids in self.segment_ids.items():
            if self.leases.referenced(ids):
                self.idle_since.pop(seg, None)
            else:
                idle.append((self.idle_since.setdefault(seg, now), seg))
        idle.sort()
        freed: list[tuple[str, int, str]] = []
        stored = self.bytes_stored
        for since, seg in idle:
            if now - since >= keep_alive_s:
                reason = "keep-alive expired"
            elif capacity_bytes and stored > capacity_bytes:
                reason = "capacity"
            else:
                continue
            nbytes = self._free(seg)
            stored -= nbytes
            freed.append((seg, nbytes, reason))
        return freed

    def _free(self, seg: str) -> int:
        """Delete a segment: its index first, so a crash cannot bring it back half-freed."""
        ids = self.segment_ids.pop(seg)
        (self.dir / f"{seg}.idx.json").unlink(missing_ok=True)
        (self.dir / seg).unlink(missing_ok=True)
        self.idle_since.pop(seg, None)
        nbytes = 0
        for tid in ids:
            ref = self.index.pop(tid, None)
            nbytes += ref.nbytes if ref else 0
        return nbytes

    @staticmethod
    def _chunks(
        f: SafetensorsFile | Pt2File, layout: list[tuple[str, Entry, int]]
    ) -> Iterator[bytes | memoryview]:
        pos = 0
        for _, e, offset in layout:
            if offset > pos:
                yield bytes(offset - pos)
            yield f.view(e)
            pos = offset + (e.end - e.start)


def now_us() -> int:
    return int(time.perf_counter() * 1e6)
