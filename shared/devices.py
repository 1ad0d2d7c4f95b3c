"""What devices a node has: real GPUs (probed once), simulated GPUs, or the host alone.

``sim:N`` takes the first N GPUs of a topology file (capacities and a link model);
``auto`` probes NVML once and falls back to the host when there is no GPU.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Final, Literal

from gpufaas.shared.errors import InvalidArgument
from gpufaas.shared.messages import DeviceInfo, LinkInfo

DEFAULT_TOPOLOGY: Final = "dgx1-v100"


@dataclass(frozen=True, slots=True)
class Link:
    """One link of the link model (bandwidth in GB/s per direction, latency in µs)."""

    a: str
    b: str
    kind: str
    gbps: float
    latency_us: float
    shared: str | None = None  # host links through one PCIe switch share its uplink


@dataclass(frozen=True, slots=True)
class Topology:
    """A node's devices and links, as read from a topology file or discovered."""

    name: str
    gpus: list[dict[str, Any]]
    links: list[Link] = field(default_factory=list)

    def link(self, a: str, b: str) -> Link | None:
        for ln in self.links:
            if {ln.a, ln.b} == {a, b}:
                return ln
        return None


@dataclass(frozen=True, slots=True)
class NodeDevices:
    """The devices of this node and how they were found."""

    backend: Literal["cuda", "sim", "cpu"]
    devices: list[DeviceInfo]
    topology: Topology | None = None


def load_topology(name_or_path: str = "") -> Topology:
    """A packaged topology by name (``dgx1-v100``, ``dgx-h100``, ``pcie-1gpu``) or a file path."""
    spec = name_or_path or DEFAULT_TOPOLOGY
    if os.sep in spec or spec.endswith(".json"):
        try:
            raw = json.loads(Path(spec).read_text())
        except (OSError, ValueError) as exc:
            raise InvalidArgument(f"cannot read topology {spec}: {exc}", field="topology") from None
    else:
        files = resources.files("gpufaas.shared") / "topologies"
        target = files / f"{spec}.json"
        if not target.is_file():
            names = sorted(p.name.removesuffix(".json") for p in files.iterdir())
            raise InvalidArgument(
                f"unknown topology {spec!r}; packaged ones: {', '.join(names)}", field="topology"
            )
        raw = json.loads(target.read_text())
    try:
        links = [
            Link(
                a=ln["a"],
                b=ln["b"],
                kind=ln["kind"],
                gbps=float(ln["gbps"]),
                latency_us=float(ln["latency_us"]),
                shared=ln.get("shared"),
            )
            for ln in raw["links"]
        ]
        return Topology(name=str(raw["name"]), gpus=list(raw["gpus"]), links=links)
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidArgument(f"topology {spec} is malformed: {exc!r}", field="topology") from None


def links_between_gpus(devices: NodeDevices) -> list[LinkInfo]:
    """The links between two GPUs of ``devices`` (NVLink and the like; not host links)."""
    if devices.topology is None:
        return []
    gpus = {d.name for d in devices.devices if d.kind != "host"}
    return [
        LinkInfo(a=ln.a, b=ln.b, kind=ln.kind, gbps=ln.gbps)
        for ln in devices.topology.links
        if ln.a in gpus and ln.b in gpus
    ]


def host_device() -> DeviceInfo:
    """The host tier as a device (capacity: physical memory)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return DeviceInfo(name="host", kind="host", model="host memory", memory_bytes=total)


def parse_devices(spec: str, topology: str = "") -> NodeDevices:
    """Resolve a ``--devices`` value: ``auto``, ``cpu`` or ``sim:N``."""
    spec = spec.strip().lower()
    if spec == "cpu":
        return NodeDevices(backend="cpu", devices=[host_device()])
    if spec == "auto":
        return probe_cuda() or NodeDevices(backend="cpu", devices=[host_device()])
    if spec.startswith("sim:"):
        try:
            n = int(spec[4:])
        except ValueError:
            n = -1
        topo = load_topology(topology)
        if not 1 <= n <= len(topo.gpus):
            raise InvalidArgument(
                f"devices {spec!r}: N must be 1..{len(topo.gpus)} for topology {topo.name}",
                field="devices",
            )
        gpus = topo.gpus[:n]
        keep = {"host"} | {f"gpu:{g['index']}" for g in gpus}
        sub = Topology(
            name=topo.name, gpus=gpus, links=[ln for ln in topo.links if {ln.a, ln.b} <= keep]
        )
        devices = [host_device()] + [
            DeviceInfo(
                name=f"gpu:{g['index']}",
                kind="sim",
                model=str(g["model"]),
                memory_bytes=int(g["memory_bytes"]),
            )
            for g in gpus
        ]
        return NodeDevices(backend="sim", devices=devices, topology=sub)
    raise InvalidArgument(f"devices {spec!r}: use auto, cpu or sim:N", field="devices")


@contextlib.contextmanager
def nvml_session() -> Iterator[Any]:
    """The initialised ``pynvml`` module, or None without the library, a driver or NVML."""
    try:
        import pynvml  # noqa: PLC0415 - optional `gpu` extra, probed once at start-up
    except ImportError:
        yield None
        return
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        yield None
        return
    try:
        yield pynvml
    finally:
        pynvml.nvmlShutdown()


def probe_cuda() -> NodeDevices | None:
    """Real GPUs through NVML, or ``None`` when there is no driver, library or GPU."""
    with nvml_session() as pynvml:
        if pynvml is None:
            return None
        count = pynvml.nvmlDeviceGetCount()
        devices = [host_device()]
        for i in range(count):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            devices.append(
                DeviceInfo(
                    name=f"gpu:{i}",
                    kind="cuda",
                    model=name.decode() if isinstance(name, bytes) else str(name),
                    memory_bytes=int(mem.total),
                    used_bytes=int(mem.used),
                )
            )
        return NodeDevices(backend="cuda", devices=devices) if count else None
