"""A real node's topology: discovered with NVML, then calibrated by timing copies.

NVML gives the structure (each GPU's PCIe generation and width, which GPUs share a PCIe
switch, which NVLinks reach which peer, or an NVSwitch) and peak bandwidths from it; a
short copy per link at start-up replaces each peak by what the link really moves. The
result has the shape of a packaged topology file, so the link model reads both alike.

Runs only on a CUDA node (the transfer service calls it once at start); it has not run
on a GPU yet (see docs/ROADMAP.md).
"""

from __future__ import annotations

import time
from typing import Any

from gpufaas.shared.devices import Link, Topology, nvml_session
from gpufaas.shared.identity import Device

PCIE_GBPS_X16 = {3: 15.75, 4: 31.5, 5: 63.0, 6: 121.0}  # peak per direction
NVLINK_GBPS_PER_LINK = 25.0  # NVLink 2, 3 and 4 alike (reference/hardware.md)
CALIBRATION_BYTES = 256 * 2**20


def discover_topology() -> Topology | None:
    """The node's GPUs and links from NVML, or None without NVML or GPUs."""
    with nvml_session() as nvml:
        return None if nvml is None else _discover(nvml)


def _discover(nvml: Any) -> Topology | None:
    count = nvml.nvmlDeviceGetCount()
    if not count:
        return None
    handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
    bus = {_bus_id(nvml.nvmlDeviceGetPciInfo(h)): i for i, h in enumerate(handles)}
    switch = _switch_groups(nvml, handles)
    gpus: list[dict[str, Any]] = []
    links: list[Link] = []
    for i, h in enumerate(handles):
        name = nvml.nvmlDeviceGetName(h)
        gpus.append(
            {
                "index": i,
                "model": name.decode() if isinstance(name, bytes) else str(name),
                "memory_bytes": int(nvml.nvmlDeviceGetMemoryInfo(h).total),
                "pcie_switch": switch[i],
            }
        )
        gen = nvml.nvmlDeviceGetCurrPcieLinkGeneration(h)
        width = nvml.nvmlDeviceGetCurrPcieLinkWidth(h)
        gbps = PCIE_GBPS_X16.get(int(gen), 15.75) * int(width) / 16
        links.append(
            Link("host", Device.gpu(i).name, f"pcie{gen}", gbps, 10.0, f"switch{switch[i]}")
        )
    pairs = _nvlink_pairs(nvml, handles, bus)
    for (a, b), n in sorted(pairs.items()):
        links.append(
            Link(Device.gpu(a).name, Device.gpu(b).name, "nvlink", n * NVLINK_GBPS_PER_LINK, 5.0)
        )
    return Topology(name="discovered", gpus=gpus, links=links)


def _nvlink_pairs(nvml: Any, handles: list[Any], bus: dict[str, int]) -> dict[tuple[int, int], int]:
    """NVLinks per GPU pair; GPUs on an NVSwitch reach every other one of them."""
    pairs: dict[tuple[int, int], int] = {}
    to_switch: dict[int, int] = {}  # GPU -> its links to an NVSwitch
    for i, h in enumerate(handles):
        for link in range(nvml.NVML_NVLINK_MAX_LINKS):
            try:
                if nvml.nvmlDeviceGetNvLinkState(h, link) != nvml.NVML_FEATURE_ENABLED:
                    continue
                peer = bus.get(_bus_id(nvml.nvmlDeviceGetNvLinkRemotePciInfo_v2(h, link)))
            except nvml.NVMLError:
                continue
            if peer is None:  # the far end is an NVSwitch, not a GPU
                to_switch[i] = to_switch.get(i, 0) + 1
            elif i < peer:
                pairs[(i, peer)] = pairs.get((i, peer), 0) + 1
    for a, na in to_switch.items():  # every pair through the switch: the fewer links
        for b, nb in to_switch.items():
            if a < b:
                pairs.setdefault((a, b), min(na, nb))
    return pairs


def _bus_id(pci: Any) -> str:
    raw = pci.busId
    return (raw.decode() if isinstance(raw, bytes) else str(raw)).lower()[-12:]


def _switch_groups(nvml: Any, handles: list[Any]) -> list[int]:
    """Group GPUs behind one PCIe switch (they share its uplink to the CPU)."""
    group = list(range(len(handles)))
    for i in range(len(handles)):
        for j in range(i + 1, len(handles)):
            level = nvml.nvmlDeviceGetTopologyCommonAncestor(handles[i], handles[j])
            if level in (nvml.NVML_TOPOLOGY_SINGLE, nvml.NVML_TOPOLOGY_MULTIPLE):
                group[j] = group[i]
    names = {g: n for n, g in enumerate(dict.fromkeys(group))}
    return [names[g] for g in group]


def calibrate(topology: Topology) -> Topology:
    """The same topology with each link's bandwidth measured by one timed copy."""
    import torch  # noqa: PLC0415 - CUDA nodes only

    def timed(copy: Any) -> float:
        copy()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        copy()
        torch.cuda.synchronize()
        return CALIBRATION_BYTES / (time.perf_counter() - t0) / 1e9

    pinned = torch.empty(CALIBRATION_BYTES, dtype=torch.uint8, pin_memory=True)
    on: dict[str, torch.Tensor] = {}
    for g in topology.gpus:
        on[Device.gpu(int(g["index"])).name] = torch.empty(
            CALIBRATION_BYTES, dtype=torch.uint8, device=f"cuda:{g['index']}"
        )
    measured: list[Link] = []
    for link in topology.links:
        if link.a == "host":
            dst = on[link.b]
            gbps = timed(lambda d=dst: d.copy_(pinned, non_blocking=True))
        else:
            src, dst = on[link.a], on[link.b]
            gbps = timed(lambda s=src, d=dst: d.copy_(s, non_blocking=True))
        measured.append(Link(link.a, link.b, link.kind, gbps, link.latency_us, link.shared))
    return Topology(name=f"{topology.name} (calibrated)", gpus=topology.gpus, links=measured)
