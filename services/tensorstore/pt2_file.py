"""Reading a .pt2 archive (``torch.export.save``): its weights by name, its program apart.

A .pt2 file is a zip of stored (uncompressed) records: the program as torch's JSON schema
(``models/model.json``), each weight's raw storage bytes, and JSON configs that map weight
names to records with dtype, shape and strides. Parsed here, without torch or pickle, so
that an untrusted file can only fail with a clear error, and so that weight bytes are sliced
from one mapping (not copied) for the content-addressed store to share with other models.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
import zipfile
import zlib
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final

from gpufaas.shared.errors import ModelInvalid
from gpufaas.tensorstore.safetensors_file import Entry

# Record paths under the archive's root folder, for the program torch.export.save names
# "model" (torch.export.pt2_archive.constants, checked against torch by the unit tests).
FORMAT_RECORD: Final = "archive_format"
VERSION_RECORD: Final = "archive_version"
BYTEORDER_RECORD: Final = "byteorder"
PROGRAM_RECORD: Final = "models/model.json"
WEIGHTS_CONFIG: Final = "data/weights/model_weights_config.json"
CONSTANTS_CONFIG: Final = "data/constants/model_constants_config.json"
WEIGHTS_DIR: Final = "data/weights/"
CONSTANTS_DIR: Final = "data/constants/"
LEGACY_WEIGHTS: Final = "data/weights/model.pt"  # torch < 2.8: one pickle of all weights
SUPPORTED_VERSION: Final = b"0"

# tensor_meta.dtype (torch._export.serde.schema.ScalarType) -> (torch dtype name, size);
# the names are those of safetensors_file.DTYPES.
SCALAR_TYPES: Final[dict[int, tuple[str, int]]] = {
    1: ("uint8", 1),
    2: ("int8", 1),
    3: ("int16", 2),
    4: ("int32", 4),
    5: ("int64", 8),
    6: ("float16", 2),
    7: ("float32", 4),
    8: ("float64", 8),
    12: ("bool", 1),
    13: ("bfloat16", 2),
}
_UNSUPPORTED_NAMES: Final = {
    9: "complex32",
    10: "complex64",
    11: "complex128",
    28: "uint16",
    29: "float8_e4m3fn",
    30: "float8_e5m2",
    31: "float8_e4m3fnuz",
    32: "float8_e5m2fnuz",
    33: "float8_e8m0fnu",
    34: "uint32",
    35: "uint64",
}
STRIDED: Final = 7  # tensor_meta.layout of a dense tensor (schema.Layout.Strided)
_LOCAL_HEADER: Final = struct.Struct("<4s5H3L2H")
_LOCAL_MAGIC: Final = b"PK\x03\x04"
_ZIP_ERRORS: Final = (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError)


class Pt2File:
    """A mapped .pt2 archive: ``entries`` (its weights), ``program`` (its graph, no weights).

    ``view(entry)`` slices a weight's bytes from the mapping without copying; only a weight
    stored with non-contiguous strides is gathered into a contiguous copy first. Every
    record read is checked against its zip CRC, so corrupt bytes fail here, not in a model.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._copies: dict[str, bytes] = {}
        self._checked: dict[str, tuple[int, int]] = {}
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed below, after the directory is read
        except OSError as exc:
            raise ModelInvalid(f"cannot read {path.name}: {exc}", field="model") from None
        with f:
            try:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as exc:
                raise ModelInvalid(f"cannot read {path.name}: {exc}", field="model") from None
            try:
                self.program, self.entries = self._parse(f)
            except BaseException:
                self._map.close()
                raise

    def __enter__(self) -> Pt2File:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _bad(self, why: str) -> ModelInvalid:
        return ModelInvalid(f"{self.path.name} is not a valid pt2 archive: {why}", field="model")

    def _parse(self, f: IO[bytes]) -> tuple[bytes, list[Entry]]:
        try:
            with zipfile.ZipFile(f) as archive:
                infos = archive.infolist()
        except _ZIP_ERRORS as exc:
            raise self._bad(f"it is not a readable zip file ({exc})") from None
        records = self._index(infos)
        if FORMAT_RECORD not in records or self._read(records[FORMAT_RECORD]) != b"pt2":
            raise self._bad("it has no archive_format 'pt2' (not written by torch.export.save)")
        if VERSION_RECORD in records and self._read(records[VERSION_RECORD]) != SUPPORTED_VERSION:
            raise self._bad("its archive_version is not one this reader supports")
        if BYTEORDER_RECORD in records and self._read(records[BYTEORDER_RECORD]) != b"little":
            raise self._bad("its tensors are not little-endian")
        if LEGACY_WEIGHTS in records:
            raise self._bad("it uses an older, pickled weight format; export it again")
        if PROGRAM_RECORD not in records:
            raise self._bad(f"it holds no exported program ({PROGRAM_RECORD})")
        program = self._read(records[PROGRAM_RECORD])
        entries = self._payloads(records, WEIGHTS_CONFIG, WEIGHTS_DIR)
        entries += self._payloads(records, CONSTANTS_CONFIG, CONSTANTS_DIR)
        names = [e.name for e in entries]
        if len(set(names)) != len(names):
            raise self._bad("a tensor name appears twice")
        self._check_signature(program, set(names))
        return program, entries

    def _index(self, infos: list[zipfile.ZipInfo]) -> dict[str, zipfile.ZipInfo]:
        """Records by path below the root folder (named after the saved file, so arbitrary)."""
        if not infos:
            raise self._bad("the zip file is empty")
        root = infos[0].filename.partition("/")[0]
        records: dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            top, sep, rest = info.filename.partition("/")
            if not sep or top != root:
                raise self._bad(f"record {info.filename!r} is outside the root folder {root!r}")
            records[rest] = info
        return records

    def _span(self, info: zipfile.ZipInfo) -> tuple[int, int]:
        """Byte range of a record's data in the mapping, after checking its CRC once."""
        span = self._checked.get(info.filename)
        if span is not None:
            return span
        name, size, offset = info.filename, len(self._map), info.header_offset
        if info.compress_type != zipfile.ZIP_STORED:
            raise self._bad(f"record {name!r} is compressed (torch.export.save stores records)")
        if offset + _LOCAL_HEADER.size > size:
            raise self._bad(f"record {name!r} is truncated")
        magic, *_, name_len, extra_len = _LOCAL_HEADER.unpack_from(self._map, offset)
        if magic != _LOCAL_MAGIC:
            raise self._bad(f"record {name!r} has no local zip header")
        start = offset + _LOCAL_HEADER.size + name_len + extra_len
        end = start + info.file_size
        if info.compress_size != info.file_size or end > size:
            raise self._bad(f"record {name!r} is truncated")
        with memoryview(self._map) as view:
            crc = zlib.crc32(view[start:end])
        if crc != info.CRC:
            raise self._bad(f"record {name!r} is corrupt (CRC mismatch)")
        self._checked[info.filename] = (start, end)
        return start, end

    def _read(self, info: zipfile.ZipInfo) -> bytes:
        start, end = self._span(info)
        return self._map[start:end]

    def _json(self, info: zipfile.ZipInfo, what: str) -> dict[str, Any]:
        try:
            doc = json.loads(self._read(info))
        except ValueError as exc:
            raise self._bad(f"{what} is not JSON ({exc})") from None
        if not isinstance(doc, dict):
            raise self._bad(f"{what} is not a JSON object")
        return doc

    def _payloads(
        self, records: dict[str, zipfile.ZipInfo], config_path: str, directory: str
    ) -> list[Entry]:
        """The tensors a weights or constants config lists, in its order."""
        if config_path not in records:
            raise self._bad(f"it lacks {config_path}")
        config = self._json(records[config_path], config_path).get("config")
        if not isinstance(config, dict):
            raise self._bad(f"{config_path} has no 'config' object")
        entries = []
        for name, meta in config.items():
            try:
                path_name, use_pickle, tensor_meta = (
                    meta["path_name"],
                    meta["use_pickle"],
                    meta["tensor_meta"],
                )
            except (KeyError, TypeError):
                raise self._bad(f"tensor {name!r} lacks path_name/use_pickle/tensor_meta") from None
            if use_pickle is not False:
                raise self._bad(
                    f"{name!r} is pickled (a tensor subclass or a script object), "
                    "which is not supported"
                )
            if not isinstance(path_name, str) or directory + path_name not in records:
                raise self._bad(f"tensor {name!r} refers to a missing record {path_name!r}")
            start, end = self._span(records[directory + path_name])
            entries.append(self._entry(name, tensor_meta, start, end))
        return entries

    def _entry(self, name: str, meta: Any, start: int, end: int) -> Entry:
        """The entry of one tensor: a slice of its record, or a contiguous copy if strided."""
        try:
            code, layout = meta["dtype"], meta["layout"]
            shape = tuple(_as_int(d) for d in meta["sizes"])
            strides = tuple(_as_int(d) for d in meta["strides"])
            offset = _as_int(meta["storage_offset"])
        except (KeyError, TypeError, ValueError, AttributeError):
            raise self._bad(f"tensor {name!r} has a malformed tensor_meta") from None
        if type(code) is not int or code not in SCALAR_TYPES:
            known = _UNSUPPORTED_NAMES.get(code) if type(code) is int else None
            raise self._bad(f"tensor {name!r} has unsupported dtype {known or repr(code)}")
        if layout != STRIDED:
            raise self._bad(f"tensor {name!r} is not a dense (strided) tensor")
        dtype, itemsize = SCALAR_TYPES[code]
        if len(strides) != len(shape) or min((*shape, *strides, offset), default=0) < 0:
            raise self._bad(f"tensor {name!r} has a malformed shape, strides or offset")
        count = math.prod(shape)
        if count == 0:
            return Entry(name, dtype, shape, start, start)
        last = offset + sum((d - 1) * s for d, s in zip(shape, strides, strict=True))
        if (end - start) % itemsize or (last + 1) * itemsize > end - start:
            raise self._bad(f"tensor {name!r} reaches past the end of its record")
        if _is_contiguous(shape, strides):
            first = start + offset * itemsize
            return Entry(name, dtype, shape, first, first + count * itemsize)
        self._copies[name] = self._gather(
            start, end, itemsize=itemsize, shape=shape, strides=strides, offset=offset
        )
        return Entry(name, dtype, shape, 0, count * itemsize)

    def _gather(
        self,
        start: int,
        end: int,
        *,
        itemsize: int,
        shape: tuple[int, ...],
        strides: tuple[int, ...],
        offset: int,
    ) -> bytes:
        """Row-major bytes of a strided view of a record (elements as opaque items)."""
        import numpy as np  # noqa: PLC0415 - rare; the store process otherwise needs no numpy

        kind = np.dtype((np.void, itemsize))
        items = np.frombuffer(self._map, kind, count=(end - start) // itemsize, offset=start)
        view = np.lib.stride_tricks.as_strided(
            items[offset:],
            shape=shape,
            strides=tuple(s * itemsize for s in strides),
            writeable=False,
        )
        data = np.ascontiguousarray(view).tobytes()
        del items, view  # release the mapping's buffer before close() can be called
        return data

    def _check_signature(self, program: bytes, names: set[str]) -> None:
        """The program must take exactly the weights the configs list, and no script objects."""
        try:
            doc = json.loads(program)
            specs = doc["graph_module"]["signature"]["input_specs"]
            wanted: set[str] = set()
            for spec in specs:
                ((kind, value),) = spec.items()
                if kind in ("parameter", "buffer", "tensor_constant"):
                    wanted.add(value[f"{kind}_name"])
                elif kind != "user_input":
                    raise self._bad(f"the program takes a {kind} input, which is not supported")
        except (ValueError, KeyError, TypeError, AttributeError):
            raise self._bad(f"{PROGRAM_RECORD} is not an exported program") from None
        if wanted != names:
            missing, extra = sorted(wanted - names), sorted(names - wanted)
            raise self._bad(
                f"the program and its weights disagree (weights missing: {missing[:3]}, "
                f"not used by the program: {extra[:3]})"
            )

    def view(self, entry: Entry) -> memoryview:
        """The tensor's contiguous bytes (release the view before ``close()``)."""
        copy = self._copies.get(entry.name)
        if copy is not None:
            return memoryview(copy)
        return memoryview(self._map)[entry.start : entry.end]

    def close(self) -> None:
        self._map.close()


def _as_int(value: Any) -> int:
    """A concrete SymInt of the schema (``{"as_int": n}``); weights have no symbolic sizes."""
    (kind, n), *rest = value.items()
    if kind != "as_int" or rest or type(n) is not int:
        raise ValueError(value)
    return n


def _is_contiguous(shape: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    """Row-major without gaps (the stride of a size-1 dimension does not matter)."""
    expected = 1
    for size, stride in zip(reversed(shape), reversed(strides), strict=True):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True
