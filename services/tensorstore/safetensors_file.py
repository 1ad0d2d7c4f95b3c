"""Reading a safetensors file's header and tensor bytes, with clear errors.

Parsed here (8-byte length, JSON header, raw data) so that a truncated or corrupt
file is reported precisely and tensor bytes are sliced from one mapping, not copied.
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from gpufaas.shared.errors import ModelInvalid

# safetensors dtype -> (torch dtype name, element size)
DTYPES: Final[dict[str, tuple[str, int]]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}
MAX_HEADER: Final = 100 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Entry:
    """One tensor of the file: dtype, shape and its byte range in the mapping."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


class SafetensorsFile:
    """A mapped safetensors file; ``view(entry)`` slices its bytes without copying."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with open(path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:
            raise ModelInvalid(f"cannot read {path.name}: {exc}", field="model") from None
        try:
            self.entries = self._parse()
        except BaseException:
            self._map.close()
            raise

    def _bad(self, why: str) -> ModelInvalid:
        return ModelInvalid(
            f"{self.path.name} is not a valid safetensors file: {why}", field="model"
        )

    def _parse(self) -> list[Entry]:
        size = len(self._map)
        if size < 8:
            raise self._bad("shorter than its 8-byte header length")
        (hlen,) = struct.unpack("<Q", self._map[:8])
        if hlen > MAX_HEADER or 8 + hlen > size:
            raise self._bad(f"header length {hlen} exceeds the file size {size}")
        try:
            header = json.loads(self._map[8 : 8 + hlen])
        except ValueError as exc:
            raise self._bad(f"header is not JSON ({exc})") from None
        if not isinstance(header, dict):
            raise self._bad("header is not a JSON object")
        base = 8 + hlen
        entries = []
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype, shape, (start, end) = meta["dtype"], meta["shape"], meta["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise self._bad(f"tensor {name!r} lacks dtype/shape/data_offsets") from None
            if not (
                isinstance(dtype, str)
                and isinstance(shape, list)
                and all(type(d) is int and d >= 0 for d in shape)
                and type(start) is int
                and type(end) is int
            ):
                raise self._bad(f"tensor {name!r} has malformed dtype/shape/data_offsets")
            if dtype not in DTYPES:
                raise self._bad(f"tensor {name!r} has unsupported dtype {dtype!r}")
            count = 1
            for d in shape:
                count *= int(d)
            if end - start != count * DTYPES[dtype][1] or start < 0 or base + end > size:
                raise self._bad(
                    f"tensor {name!r} data range [{start}, {end}) is truncated or wrong"
                )
            entries.append(Entry(name, DTYPES[dtype][0], tuple(shape), base + start, base + end))
        if not entries:
            raise self._bad("it holds no tensors")
        return entries

    def view(self, entry: Entry) -> memoryview:
        return memoryview(self._map)[entry.start : entry.end]

    def close(self) -> None:
        self._map.close()
