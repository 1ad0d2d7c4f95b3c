"""Where a function's instance goes: locality first (GPU-enabled FaaS, Tetris).

Prefer a node that already has a warm instance of the function; else the node where the
largest share of the model's tensors is already resident (θ, from the tensor store), so
a new instance starts without loading weights; else the least loaded node that has room
for what is left to load. Pure: the scheduler gathers the facts, this orders them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gpufaas.shared.errors import ResourceExhausted, Unavailable


@dataclass(frozen=True, slots=True)
class NodeView:
    """What the scheduler knows of one live node for one function."""

    node: str
    warm: bool  # an instance of the function is loaded there
    theta: float  # resident bytes of the model / model bytes, 0..1
    bytes_to_load: int  # model bytes not yet resident there
    functions: int  # instances placed there (the load)
    free_bytes: int | None  # room on its GPU; None when unknown (no GPU, or not reported)


def choose(views: Sequence[NodeView]) -> str:
    """The node to place on: warm, then highest θ, then least loaded, among those with room.

    Raises ``Unavailable`` with no nodes, ``ResourceExhausted`` when none has room for what
    the model still needs to load.
    """
    if not views:
        raise Unavailable("no node with a worker is up")
    fits = [v for v in views if v.free_bytes is None or v.free_bytes >= v.bytes_to_load]
    if not fits:
        best = max(views, key=lambda v: v.free_bytes or 0)
        raise ResourceExhausted(
            f"no node has room for the model: the most free is {best.free_bytes} bytes on "
            f"{best.node}, which needs {best.bytes_to_load} more",
            field="model",
        )
    return min(fits, key=lambda v: (not v.warm, -round(v.theta, 6), v.functions, v.node)).node
