"""KServe v2 tensor datatypes: element types, raw byte layouts and validation.

Raw layout is little-endian row-major; ``BYTES`` elements are each a 4-byte
little-endian length followed by the bytes (the inference protocol's binary form).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any, Final

import numpy as np

from gpufaas.shared.errors import InvalidArgument

NUMPY_DTYPES: Final[dict[str, str]] = {
    "BOOL": "|b1",
    "UINT8": "<u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
    "INT8": "<i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "FP16": "<f2",
    "FP32": "<f4",
    "FP64": "<f8",
}


# BF16 has no numpy type: it travels as its 16 bits, and as float32 values in JSON.
ITEM_SIZES: Final[dict[str, int]] = {
    **{d: np.dtype(t).itemsize for d, t in NUMPY_DTYPES.items()},
    "BF16": 2,
}


def element_count(shape: Sequence[int]) -> int:
    return math.prod(shape)


def check_shape(shape: Any, field: str) -> list[int]:
    """A list of non-negative ints, else ``InvalidArgument`` naming ``field``."""
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise InvalidArgument(f"{field} must be a list of non-negative integers", field=field)
    return shape


def encode_bytes_elements(items: Sequence[bytes]) -> bytes:
    """Length-prefixed concatenation of ``BYTES`` elements."""
    out = bytearray()
    for item in items:
        out += struct.pack("<I", len(item))
        out += item
    return bytes(out)


def decode_bytes_elements(raw: bytes | memoryview, count: int, field: str = "data") -> list[bytes]:
    """Inverse of :func:`encode_bytes_elements`, checking the element count and framing."""
    view = memoryview(raw)
    items: list[bytes] = []
    pos = 0
    while pos < len(view):
        if pos + 4 > len(view):
            raise InvalidArgument("truncated BYTES element length", field=field)
        (n,) = struct.unpack_from("<I", view, pos)
        pos += 4
        if pos + n > len(view):
            raise InvalidArgument("truncated BYTES element", field=field)
        items.append(bytes(view[pos : pos + n]))
        pos += n
    if len(items) != count:
        raise InvalidArgument(f"expected {count} BYTES elements, got {len(items)}", field=field)
    return items


def _flatten(data: Any, shape: list[int], field: str) -> list[Any]:
    """Row-major elements of flat or nested ``data``; nesting must follow ``shape``."""
    if not isinstance(data, list):
        raise InvalidArgument("data must be a JSON array", field=field)
    if not any(isinstance(x, list) for x in data):
        return data
    row = element_count(shape[1:])
    if not shape or len(data) != shape[0] or not all(isinstance(x, list) for x in data):
        raise InvalidArgument(f"nested data does not follow shape {shape}", field=field)
    out: list[Any] = []
    for sub in data:
        flat = _flatten(sub, shape[1:], field)
        if len(flat) != row:
            raise InvalidArgument(f"nested data does not follow shape {shape}", field=field)
        out += flat
    return out


def json_to_raw(datatype: str, shape: list[int], data: Any, field: str) -> bytes:
    """Raw bytes of a JSON ``data`` array (flat or nested), validated against datatype and shape."""
    flat = _flatten(data, shape, field)
    count = element_count(shape)
    if len(flat) != count:
        raise InvalidArgument(
            f"shape {shape} needs {count} elements but data has {len(flat)}", field=field
        )
    if datatype == "BYTES":
        items: list[bytes] = []
        for x in flat:
            if not isinstance(x, str):
                raise InvalidArgument("BYTES elements must be strings", field=field)
            items.append(x.encode())
        return encode_bytes_elements(items)
    if datatype not in ITEM_SIZES:
        raise InvalidArgument(f"datatype {datatype} is not supported in JSON", field=field)
    if datatype == "BOOL":
        ok = all(isinstance(x, bool) for x in flat)
    elif datatype.startswith("FP") or datatype == "BF16":
        ok = all(isinstance(x, int | float) and not isinstance(x, bool) for x in flat)
    else:
        ok = all(isinstance(x, int) and not isinstance(x, bool) for x in flat)
    if not ok:
        raise InvalidArgument(f"data elements do not match datatype {datatype}", field=field)
    try:
        with np.errstate(over="raise"):
            if datatype == "BF16":
                return _bf16_bits(np.asarray(flat, dtype=np.float32)).tobytes()
            arr = np.asarray(flat, dtype=np.dtype(NUMPY_DTYPES[datatype]))
    except (OverflowError, FloatingPointError):
        raise InvalidArgument(f"a value is out of range for {datatype}", field=field) from None
    return arr.tobytes()


def _bf16_bits(values: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """The bfloat16 nearest each float32 (ties to even), as little-endian 16-bit words."""
    bits = values.astype("<f4").view("<u4").astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    nan = np.isnan(values)
    return np.where(nan, 0x7FC0, rounded).astype("<u2")


def raw_to_json(datatype: str, shape: list[int], raw: bytes | memoryview) -> list[Any]:
    """Flat JSON list of a raw tensor (the protocol's row-major ``data``)."""
    count = element_count(shape)
    if datatype == "BYTES":
        return [b.decode("utf-8", errors="replace") for b in decode_bytes_elements(raw, count)]
    nbytes = raw_nbytes(datatype, shape)
    if len(raw) != nbytes:
        raise InvalidArgument(f"{datatype} {shape} needs {nbytes} bytes, got {len(raw)}")
    if datatype == "BF16":
        words = np.frombuffer(raw, dtype="<u2", count=count)
        return (words.astype("<u4") << 16).view("<f4").tolist()  # type: ignore[no-any-return]
    arr = np.frombuffer(raw, dtype=np.dtype(NUMPY_DTYPES[datatype]), count=count)
    return arr.tolist()  # type: ignore[no-any-return]


def check_raw(datatype: str, shape: list[int], data: bytes | memoryview, field: str) -> None:
    """Raw bytes that fit ``datatype`` and ``shape``: their size, or for ``BYTES`` exactly
    as many length-prefixed elements as the shape holds, filling ``data`` (walked without
    copying them out); else ``InvalidArgument`` naming ``field``."""
    nbytes = raw_nbytes(datatype, shape)
    if nbytes is not None:
        if len(data) != nbytes:
            raise InvalidArgument(
                f"{datatype} of shape {shape} is {nbytes} bytes; {len(data)} given", field=field
            )
        return
    count, pos = element_count(shape), 0
    for _ in range(count):
        if pos + 4 > len(data):
            break
        pos += 4 + struct.unpack_from("<I", data, pos)[0]
    else:
        if pos == len(data):
            return
    raise InvalidArgument(
        f"not {count} BYTES elements, each a 4-byte little-endian length then its bytes",
        field=field,
    )


def raw_nbytes(datatype: str, shape: list[int]) -> int | None:
    """Bytes a fixed-size tensor occupies (``None`` for ``BYTES``)."""
    if datatype == "BYTES":
        return None
    return element_count(shape) * ITEM_SIZES[datatype]
