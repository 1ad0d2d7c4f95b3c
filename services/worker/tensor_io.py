"""A worker's request tensors in and out: inline bytes (read as they are, costing nothing),
or tubes through the node's transfer service (read where they are, written as host tubes
or adopted onto the GPU)."""

from __future__ import annotations

import asyncio
import contextlib

from gpufaas.shared import subjects
from gpufaas.shared.errors import InvalidArgument, NotFound, ResourceExhausted
from gpufaas.shared.identity import is_gpu
from gpufaas.shared.messages import (
    AdoptReply,
    AdoptRequest,
    EnsureReply,
    EnsureRequest,
    Placement,
    TensorPayload,
    Tube,
    WorkerRunRequest,
)
from gpufaas.shared.paths import read_file
from gpufaas.shared.rpc import request
from gpufaas.shared.service import Service
from gpufaas.shared.shm import placement_file, write_tube
from gpufaas.worker.instances import Instance
from gpufaas.worker.runners import Output


class TensorIO:
    """Reads a request's inputs and makes its outputs for one lane of a worker process
    (see ``lanes``)."""

    def __init__(self, service: Service, *, gpu: str | None, backend: str) -> None:
        self.service = service  # its NATS connection, KV and config
        self.config = service.config
        # The lane's simulated GPU (compute over the host pages): the tier a workflow's
        # intermediates are kept on and read from in place.
        self.sim_tier = gpu if backend == "sim" else None

    async def inputs(
        self, req: WorkerRunRequest, inst: Instance
    ) -> dict[str, tuple[list[int], bytes]]:
        """The raw bytes and shape of each input ``inst``'s runner takes, by name."""
        given = {p.name: p for p in req.inputs}
        out: dict[str, tuple[list[int], bytes]] = {}
        for spec in inst.runner.inputs:
            p = given.get(spec.name)
            if p is None:
                raise InvalidArgument(
                    f"input {spec.name!r} is missing", field=f"inputs[{spec.name}]"
                )
            out[spec.name] = (p.shape, await self._payload_bytes(p, req.spec.tenant))
        return out

    async def _payload_bytes(self, p: TensorPayload, tenant: str) -> bytes:
        if p.data is not None:
            return p.data
        if p.tube is None:
            raise InvalidArgument(
                f"input {p.name!r} has neither data nor a tube", field=f"inputs[{p.name}]"
            )
        # Resident on this node's host tier: a no-op for a tube written on this machine,
        # a chunked copy from the node that holds it otherwise. A workflow intermediate
        # this lane's simulated GPU holds is read where it is (compute is on the CPU),
        # with no round trip to the transfer service unless its copy moved meanwhile; one
        # another GPU of this node holds is copied GPU to GPU onto this lane's (over
        # NVLink when a route exists), never through the host.
        tube, node = p.tube, self.config.node_id
        local = [pl for pl in tube.placements if pl.node == node and pl.tier == self.sim_tier]
        if local and tube.tenant == tenant:
            with contextlib.suppress(FileNotFoundError):  # swapped out: ensure finds it
                data = await asyncio.to_thread(self._read_copy, local[0], tube)
                if len(data) == tube.nbytes:
                    return data
        on_gpu = any(pl.node == node and is_gpu(pl.tier) for pl in tube.placements)
        here = await self._ensure(
            tube.id, tenant, self.sim_tier if on_gpu and self.sim_tier else "host"
        )
        try:
            data = await asyncio.to_thread(self._read_copy, here.placement, here.tube)
        except FileNotFoundError:  # the GPU's copy was evicted (swapped to host) meanwhile
            here = await self._ensure(tube.id, tenant, "host")
            data = await asyncio.to_thread(self._read_copy, here.placement, here.tube)
        if len(data) < here.tube.nbytes:
            raise NotFound(f"tube {tube.id} is truncated", field=f"inputs[{p.name}]")
        return data

    def _read_copy(self, placement: Placement, tube: Tube) -> bytes:
        """The bytes of a tube's copy: its range of the file (a whole tube file, or a block
        of a pool segment at its offset)."""
        # The placement names the file: checked to lie in its tier's directory under the
        # shm root, and read without following a link.
        path = placement_file(self.config.shm_dir, placement, tube.id)
        if path is None:
            raise InvalidArgument("the input's copy is not a file here", field="segment")
        return read_file(path, tube.nbytes, placement.offset)

    async def _ensure(self, tube_id: str, tenant: str, tier: str) -> EnsureReply:
        return await request(
            self.service.nc,
            subjects.node(self.config.node_id, "transfer", subjects.TRANSFER_ENSURE),
            EnsureRequest(tube_id=tube_id, tenant=tenant, tier=tier),
            EnsureReply,
            timeout=self.config.request_timeout_s,
            what="transfer service of this node",
        )

    async def output(
        self, name: str, out: Output, tenant: str, intermediate: bool = False
    ) -> TensorPayload:
        """An output inline when small (a workflow's intermediate too: it travels in the
        reply and the next step's dispatch, with no tube, adopt or KV write), else as a
        host tube; a big intermediate is adopted onto this lane's (simulated) GPU tier when
        there is room, so the next step on this node reads it where it is."""
        if len(out.data) <= self.config.inline_threshold:
            data = bytes(out.data)  # small: into the message
            return TensorPayload(name=name, datatype=out.datatype, shape=out.shape, data=data)  # type: ignore[arg-type]
        tube = await asyncio.to_thread(
            write_tube,
            self.config.shm_dir,
            self.config.node_id,
            tenant,
            datatype=out.datatype,
            shape=out.shape,
            data=out.data,
        )
        if intermediate and self.sim_tier is not None:
            try:
                adopted = await request(
                    self.service.nc,
                    subjects.node(self.config.node_id, "transfer", subjects.TRANSFER_ADOPT),
                    AdoptRequest(tube=tube, tier=self.sim_tier),
                    AdoptReply,
                    timeout=self.config.request_timeout_s,
                    what="transfer service of this node",
                )
                tube = adopted.tube
            except ResourceExhausted:  # no room on the GPU: it stays a host tube
                await self.service.kv.tubes.put(tube.id, tube)
        else:
            await self.service.kv.tubes.put(tube.id, tube)
        return TensorPayload(name=name, datatype=out.datatype, shape=out.shape, tube=tube)  # type: ignore[arg-type]
