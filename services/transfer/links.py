"""How long a copy takes on this node's links, for simulated GPUs (the link model).

Until the planner lands this is the direct host→GPU link of the topology file; the
times it returns are modelled, never measured.
"""

from __future__ import annotations

from gpufaas.shared.devices import NodeDevices


class LinkTimer:
    """Modelled copy times over a node's topology."""

    def __init__(self, devices: NodeDevices) -> None:
        self.links = {}
        if devices.topology is not None:
            for link in devices.topology.links:
                self.links[(link.a, link.b)] = link
                self.links[(link.b, link.a)] = link

    def host_to_gpu(self, gpu: str, nbytes: int) -> tuple[float, str]:
        """(seconds, route) of a host→GPU copy over the GPU's own PCIe link."""
        link = self.links.get(("host", gpu))
        if link is None:
            return 0.0, f"host->{gpu}"
        return link.latency_us * 1e-6 + nbytes / (link.gbps * 1e9), f"host->{gpu} ({link.kind})"
