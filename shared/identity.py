"""Identities with one type and one spelling: a function, a device.

A function is ``FunctionRef(tenant, name)`` everywhere; its one encoding,
``"<tenant>.<name>"``, is its KV key, the token it has in queue views and memory
reservations, and how logs name it (both parts are names that hold no dot).

A device is ``Device``: ``host``, ``gpu:<N>`` (a real or simulated GPU), ``object``
(the durable tier) or ``cpu`` (a node without GPUs computing on its host), parsed once
from its name; ``device.token`` is its spelling inside a KV key or a directory name
(``gpu0``), and ``device.index`` its CUDA index.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, NamedTuple

from gpufaas.shared.errors import InvalidArgument

_NAME: Final = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}\Z")  # \Z: no trailing newline


class FunctionRef(NamedTuple):
    """A deployed function (or workflow): its tenant and its name."""

    tenant: str
    name: str

    @property
    def key(self) -> str:
        """``tenant.name``: the KV key, queue token and log spelling."""
        return f"{self.tenant}.{self.name}"

    def __str__(self) -> str:
        return self.key

    @classmethod
    def parse(cls, key: str) -> FunctionRef:
        """The inverse of :attr:`key`; a malformed one is ``InvalidArgument``."""
        tenant, dot, name = key.partition(".")
        if not dot or not _NAME.match(tenant) or not _NAME.match(name):
            raise InvalidArgument(f"{key!r} is not a function reference (tenant.name)")
        return cls(tenant, name)


HOST: Final = "host"
OBJECT: Final = "object"
CPU: Final = "cpu"
GPU: Final = "gpu"
_DEVICE: Final = re.compile(r"^(host|object|cpu|gpu:(0|[1-9][0-9]{0,3}))\Z")
_TOKEN: Final = re.compile(r"^(host|object|cpu|gpu(0|[1-9][0-9]{0,3}))\Z")


@dataclass(frozen=True, slots=True)
class Device:
    """A place bytes live or compute runs: ``host``, ``object``, ``cpu`` or ``gpu:N``."""

    kind: str
    index: int | None = None

    @property
    def name(self) -> str:
        """``gpu:0``, ``host``, ...: the spelling of messages and placements."""
        return self.kind if self.index is None else f"{self.kind}:{self.index}"

    @property
    def token(self) -> str:
        """``gpu0``, ``host``, ...: the spelling inside a KV key or a file name."""
        return self.kind if self.index is None else f"{self.kind}{self.index}"

    @property
    def is_gpu(self) -> bool:
        return self.kind == GPU

    def __str__(self) -> str:
        return self.name

    @classmethod
    def gpu(cls, index: int) -> Device:
        return cls(GPU, index)

    @classmethod
    def parse(cls, name: str, field: str = "device") -> Device:
        """``gpu:3`` -> ``Device("gpu", 3)``; anything else is ``InvalidArgument``."""
        if not isinstance(name, str) or not _DEVICE.match(name):
            raise InvalidArgument(
                f"{name!r} is not a device (host, object, cpu, gpu:N)", field=field
            )
        kind, _, index = name.partition(":")
        return cls(kind, int(index) if index else None)

    @classmethod
    def from_token(cls, token: str) -> Device:
        """The inverse of :attr:`token` (``gpu0`` -> ``gpu:0``)."""
        if not _TOKEN.match(token):
            raise InvalidArgument(f"{token!r} is not a device token (host, object, cpu, gpuN)")
        if token.startswith(GPU):
            return cls(GPU, int(token[len(GPU) :]))
        return cls(token)


def gpu_number(name: str | None) -> int:
    """N of ``gpu:N``, to order GPUs by number rather than by name: -1 for None or a device
    that is no GPU, after every GPU for a name that is no device (a peer's report)."""
    if name is None:
        return -1
    try:
        index = Device.parse(name).index
    except InvalidArgument:
        return 2**31
    return -1 if index is None else index


def is_gpu(name: str) -> bool:
    """Whether a device name names a GPU (cheap: for filters over placements)."""
    return name.startswith("gpu:")
