"""The transfer service of one node: resolves host tubes (copies between tiers come later)."""

from __future__ import annotations

import nats.js.errors

from gpufaas.shared import subjects
from gpufaas.shared.errors import NotFound
from gpufaas.shared.messages import ResolveReply, ResolveRequest, Tube, decode_json
from gpufaas.shared.service import Service
from gpufaas.shared.shm import host_path


class TransferService(Service):
    """Knows where this node's tubes live and makes them resident where asked."""

    name = "transfer"

    async def on_start(self) -> None:
        await self.serve(
            subjects.node(self.config.node_id, self.name, subjects.TRANSFER_RESOLVE),
            ResolveRequest,
            self.resolve,
        )

    async def resolve(self, req: ResolveRequest) -> ResolveReply:
        """Find a tube of the caller's tenant and its host file; another tenant's is 'not found'."""
        missing = NotFound(f"tube {req.tube_id!r} not found", field="tube")
        if req.tier != "host":
            raise NotFound(f"tier {req.tier} is not available on this node yet", field="tier")
        try:
            entry = await self.buckets.tubes.get(req.tube_id)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            raise missing from None
        except ValueError:  # not a valid key: cannot be one of ours
            raise missing from None
        if entry.value is None:
            raise missing
        tube = decode_json(entry.value, Tube)
        if tube.tenant != req.tenant:
            raise missing
        path = host_path(self.config.shm_dir, tube)
        return ResolveReply(tube=tube, path=str(path))
