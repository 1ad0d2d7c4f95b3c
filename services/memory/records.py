"""The memory bucket's records of one node: their keys, in one place, and their codecs.

A restarted manager must read what the old one wrote, so the layout is fixed:

* ``<node>.<dev>.s.<segment>``: a segment of a pool and its size (decimal text);
* ``<node>.<dev>.a.<id>``: an allocation (``MemAllocation``, JSON);
* ``<node>.<dev>.r.<function>``: a working set rejected on that GPU (``MemRejection``);
* ``<node>.<dev>.m``: the model cache published for that GPU (``ModelCache``);
* ``<node>.v.<replica>``: a scheduler replica's latest queue view (``QueueView``).

``<dev>`` is the device's token (``gpu0``, ``host``); functions and replicas are made
into one key token each (anything but ``[A-Za-z0-9_-]`` becomes ``-``).
"""

from __future__ import annotations

import re
from typing import Final, Protocol, TypeVar

from gpufaas.shared.identity import Device
from gpufaas.shared.kv import Codec
from gpufaas.shared.messages import MAX_BYTES, SEGMENT_ID_PATTERN

T = TypeVar("T")


def _size(data: bytes) -> int:
    """A segment's recorded size: a decimal in range (``ValueError``: a malformed record)."""
    n = int(data)
    if not 0 <= n <= MAX_BYTES:
        raise ValueError(f"segment size {n} is out of range")
    return n


# A segment's size, as the old manager wrote it: ``str(nbytes).encode()``.
SEGMENT_BYTES: Codec[int] = Codec(lambda n: str(n).encode(), _size)
# A segment's id in its key (``new_id``): one plain file name of the host pool.
SEGMENT_ID: Final = re.compile(SEGMENT_ID_PATTERN)


def token(name: str) -> str:
    """A replica's or function's name as one KV key token (a ``.`` or ``/`` becomes ``-``)."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", name)


class Store(Protocol[T]):
    """What the memory's state objects need of a KV bucket: a ``kv.Bucket`` (or a
    :class:`DictStore` in unit tests)."""

    async def value(self, key: str) -> T | None: ...

    async def put(self, key: str, value: T) -> int: ...

    async def delete(self, key: str) -> bool: ...

    async def keys(self, prefix: str = "") -> list[str]: ...


class DictStore(Store[T]):
    """An in-process :class:`Store` (unit tests, tools): a dict with revisions."""

    def __init__(self) -> None:
        self.data: dict[str, T] = {}
        self.revision = 0

    async def value(self, key: str) -> T | None:
        return self.data.get(key)

    async def put(self, key: str, value: T) -> int:
        self.data[key] = value
        self.revision += 1
        return self.revision

    async def delete(self, key: str) -> bool:
        self.data.pop(key, None)
        return True

    async def keys(self, prefix: str = "") -> list[str]:
        return sorted(k for k in self.data if k.startswith(prefix))


class MemoryKeys:
    """The keys of one node's records (see the module docstring)."""

    def __init__(self, node: str) -> None:
        self.node = node

    @property
    def node_prefix(self) -> str:
        """Every record of this node starts with it."""
        return f"{self.node}."

    def device_prefix(self, device: str) -> str:
        """The records of one device (a pool's segments and allocations, its rejections and
        model cache): ``<node>.<dev>.``."""
        return f"{self.node}.{Device.parse(device).token}."

    def segment(self, device: str, segment: str) -> str:
        return f"{self.device_prefix(device)}s.{segment}"

    def alloc(self, device: str, alloc_id: int) -> str:
        return f"{self.device_prefix(device)}a.{alloc_id}"

    def rejection(self, device: str, function: str) -> str:
        return f"{self.device_prefix(device)}r.{token(function)}"

    def cache(self, device: str) -> str:
        return f"{self.device_prefix(device)}m"

    @property
    def views_prefix(self) -> str:
        return f"{self.node}.v."

    def view(self, replica: str) -> str:
        return f"{self.views_prefix}{token(replica)}"

    def kind(self, device: str, key: str) -> tuple[str, str] | None:
        """``(kind, rest)`` of one of ``device``'s keys (``("s", segment)``, ``("a", id)``,
        ``("r", function)``, ``("m", "")``); None for another device's or a view's."""
        prefix = self.device_prefix(device)
        if not key.startswith(prefix):
            return None
        kind, _, rest = key[len(prefix) :].partition(".")
        return kind, rest
