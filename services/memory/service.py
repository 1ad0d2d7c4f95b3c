"""The memory service of one node: reports device capacity (pools and eviction come later)."""

from __future__ import annotations

from gpufaas.shared import subjects
from gpufaas.shared.config import Config
from gpufaas.shared.devices import NodeDevices, parse_devices
from gpufaas.shared.messages import CapacityReply, CapacityRequest, DeviceInfo
from gpufaas.shared.service import Service


class MemoryService(Service):
    """Owns the node's device list: probes once at start-up and reports it."""

    name = "memory"

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.node_devices: NodeDevices = parse_devices(config.devices, config.topology)

    def devices(self) -> list[DeviceInfo]:
        return self.node_devices.devices

    async def on_start(self) -> None:
        await self.serve(
            subjects.node(self.config.node_id, self.name, subjects.MEMORY_CAPACITY),
            CapacityRequest,
            self.capacity,
        )

    async def capacity(self, _: CapacityRequest) -> CapacityReply:
        return CapacityReply(node=self.config.node_id, devices=self.node_devices.devices)
